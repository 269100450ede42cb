"""Caches of preprocessed cases: a memory cache shared by every dataset of the process, and disk-cache
item files that can hold no code.

**Shared memory cache** (:class:`SharedCacheDataset`, ``cache: memory``): MONAI's ``CacheDataset`` whose
items come from one process-wide store, :data:`CASES`, keyed like the disk cache (dataset name, the
preprocessing config's ``cache_key()``, the case's files with their size and modification time, and the
case checks). Every fold and method of a local sweep (one process) reuses the cases that any earlier run
preprocessed: a case goes through the deterministic pipeline once per process (``CASES.builds`` counts
it); MONAI hands each epoch a copy of the cached item, so runs cannot change what the next one reads.

**Disk-cache item files** (:class:`SafePersistentDataset`, ``cache: disk``): safetensors for the arrays,
JSON for everything else.

MONAI's ``PersistentDataset`` pickles each preprocessed item (``torch.save``) and unpickles it on the
next run, so a file planted in the cache folder would run code on ``setup()``; ``weights_only=True``
refuses MetaTensors. Here an item -- a dict of MetaTensors (array, affine, meta dict, the transform
trace that ``Invertd`` needs), tensors, numpy arrays and plain values -- is split into its arrays,
stored as safetensors tensors ``t0, t1, ...``, and a JSON tree in the file's header metadata that
refers to them::

    {"__metatensor__": {"data": "t0", "meta": {...}, "ops": [...]}}   {"__ndarray__": "t3"}
    {"__tensor__": "t4"}   {"__tuple__": [...]}   str / int / float / bool / None / list / dict

Reading parses JSON and tensors only; a file that is not such a file (a planted pickle, a truncated
write, another format) is reported by :func:`load_item` and rebuilt by :class:`SafePersistentDataset`.
MONAI's string enums (``SpaceKeys.RAS``, ``MetaKeys`` keys) come back as the equal plain strings.
"""

from __future__ import annotations

import json
import os
import threading
from multiprocessing.pool import ThreadPool
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, MetaTensor, PersistentDataset, get_track_meta, set_track_meta
from monai.transforms.utils import reset_ops_id
from safetensors import safe_open
from tqdm import tqdm

from segadapt.io import file_digest, save_safetensors

FORMAT = "segadapt-cache-item"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"


def _encode(value: object, tensors: dict[str, torch.Tensor]) -> object:
    """JSON tree of `value`; its arrays are appended to `tensors` (name -> tensor) and referred to by name."""

    def store(tensor: torch.Tensor) -> str:
        name = f"t{len(tensors)}"
        tensors[name] = tensor.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return name

    if isinstance(value, MetaTensor):
        return {"__metatensor__": {"data": store(value.as_tensor()), "meta": _encode(dict(value.meta), tensors),
                                   "ops": _encode(list(value.applied_operations), tensors)}}
    if isinstance(value, torch.Tensor):
        return {"__tensor__": store(value)}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": store(torch.from_numpy(np.array(value, order="C")))}  # ascontiguousarray makes 0-d 1-d
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"cannot cache a dict with non-string keys {[k for k in value if not isinstance(k, str)]}")
        return {str(k): _encode(v, tensors) for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, str):
        return str(value)  # a StrEnum becomes its (equal) plain string
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise TypeError(f"cannot cache a value of type {type(value).__name__}")


def _decode(tree: object, tensors: Mapping[str, torch.Tensor]) -> object:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__metatensor__" in tree:
        parts = tree["__metatensor__"]
        return MetaTensor(tensors[parts["data"]], meta=_decode(parts["meta"], tensors),
                          applied_operations=_decode(parts["ops"], tensors))
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return tensors[tree["__ndarray__"]].numpy()
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    return {k: _decode(v, tensors) for k, v in tree.items()}


def item_source(data: Mapping[str, object]) -> dict:
    """What a cached item was made from: the case id and, per path key ('image', 'label'), each file's resolved
    path and SHA-256 (:func:`~segadapt.io.file_digest`, hashed once per process and file state)."""
    files = {}
    for key in ("image", "label"):
        if key in data:
            paths = data[key] if isinstance(data[key], (list, tuple)) else [data[key]]
            files[key] = [[str(os.path.realpath(p)), file_digest(p)] if isinstance(p, (str, os.PathLike)) else None
                          for p in paths]  # None: not a file (an array handed in directly)
    return {"case_id": str(data.get("case_id")), "files": files}


def save_item(path: str | os.PathLike, item: Mapping[str, object], source: Mapping[str, object] | None = None) -> Path:
    """Write a preprocessed item (see the module docstring) to `path`, atomically, with its `source`
    (:func:`item_source`) in the header."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(item, tensors))
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "tree": tree, "source": json.dumps(source)}
    return save_safetensors(path, tensors, metadata)


def load_item(path: str | os.PathLike, source: Mapping[str, object] | None = None) -> dict:
    """The item :func:`save_item` wrote to `path`; raises ValueError for any other file (nothing is executed), and,
    given the expected `source`, for an item made from another case or other file contents."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} file")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        item = _decode(json.loads(metadata["tree"]), tensors)
        stored = json.loads(metadata.get("source", "null"))
    except Exception as error:  # safetensors, JSON and missing-reference errors alike
        raise ValueError(f"disk cache file {path} is unreadable: {type(error).__name__}: {error}") from None
    if not isinstance(item, dict):
        raise ValueError(f"disk cache file {path} does not hold a data item")
    if source is not None and stored != json.loads(json.dumps(source)):
        made_from = stored.get("case_id") if isinstance(stored, dict) else None
        raise ValueError(f"disk cache file {path} was made from case {made_from!r} or other file contents, not from "
                         f"case {source.get('case_id')!r} as it is now")
    return item


@contextmanager
def track_meta(on: bool) -> Iterator[None]:
    """MONAI's metadata tracking (``monai.data.set_track_meta``) set to `on` inside the block, restored after.
    Off, MONAI transforms return plain tensors with the same values (each MetaTensor operation otherwise copies
    the metadata and records the transform)."""
    before = get_track_meta()
    set_track_meta(on)
    try:
        yield
    finally:
        set_track_meta(before)


class SafePersistentDataset(PersistentDataset):
    """MONAI ``PersistentDataset`` whose cache files are :func:`save_item` files, never pickles.

    Same keys (``hash_func`` of the item + the transform hash) and the same split of the pipeline
    (deterministic part cached, random part rerun); a cache file that cannot be read as an item, or that was
    made from another case or other file contents (:func:`item_source`: a file copied under another case's
    name), is rebuilt (with a warning), so a tampered file is overwritten, never run or used.
    """

    def _cachecheck(self, item_transformed):
        with track_meta(True):  # the deterministic part (loading, resampling) needs the metadata, and caches it
            return self._cached_or_built(item_transformed)

    def _cached_or_built(self, item_transformed):
        if self.cache_dir is None:
            return self._pre_transform(deepcopy(item_transformed))
        path = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}{SUFFIX}"
        source = item_source(item_transformed)
        if path.is_file():
            try:
                return load_item(path, source)
            except ValueError as error:
                warnings.warn(f"{error}; rebuilding it", stacklevel=2)
        item = self._pre_transform(deepcopy(item_transformed))  # keep the hashed original unchanged
        try:
            save_item(path, item, source)
        except PermissionError:  # a read-only cache folder: run uncached, like MONAI
            pass
        return item


class MemoryStore:
    """Process-wide memory of values built once: key -> value (e.g. a preprocessed case, the output of a
    pipeline's deterministic part). ``builds`` counts the values computed (not found), ``hits`` those reused."""

    def __init__(self) -> None:
        self._items: dict[Hashable, object] = {}
        self._lock = threading.Lock()
        self.builds = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get_or_build(self, key: Hashable, build: Callable[[], object]) -> object:
        with self._lock:
            if key in self._items:
                self.hits += 1
                return self._items[key]
        item = build()  # outside the lock: the fill threads preprocess different cases in parallel
        with self._lock:
            self.builds += 1
            return self._items.setdefault(key, item)

    def clear(self) -> None:
        """Forget every value (and reset the counters)."""
        with self._lock:
            self._items.clear()
            self.builds = self.hits = 0


CASES = MemoryStore()  # preprocessed cases


class SharedCacheDataset(CacheDataset):
    """MONAI ``CacheDataset`` (every case cached) whose items live in :data:`CASES`, shared with every other
    dataset of the process that has the same `scope` (dataset name + preprocessing key) and pipeline.

    Args:
        data, transform: as ``CacheDataset``.
        scope: what besides the case decides the cached item (e.g. ``(name, cfg.cache_key())``).
        key_func: the case's part of the key (e.g. its fields and its files' size and mtime).
        progress: a progress bar while cases are preprocessed (none when all were cached already).
    """

    def __init__(self, data, transform, scope: Hashable, key_func: Callable[[Mapping], Hashable],
                 cache_workers: int | None = 1, progress: bool = True, description: str = "preprocessing") -> None:
        self.scope, self.key_func, self.description = scope, key_func, description
        self.show_progress = progress
        super().__init__(data, transform, cache_rate=1.0, num_workers=cache_workers, progress=False)

    def _key(self, idx: int) -> Hashable:
        return (self.scope, self.key_func(self.data[idx]))

    def _fill_cache(self, indices=None) -> list:
        indices = list(range(self.cache_num)) if indices is None else list(indices)
        missing = sum(self._key(i) not in CASES for i in indices)
        if not (self.show_progress and missing):
            return super()._fill_cache(indices)
        # disable=None: no bar when stderr is not a terminal (logs, pipes: the one-line error stays one line)
        with tqdm(total=len(indices), desc=f"{self.description} ({missing} new)", leave=False,
                  disable=None) as bar, \
                ThreadPool(self.num_workers) as pool:
            items = []
            for item in pool.imap(self._load_cache_item, indices):
                items.append(item)
                bar.update()
            return items

    def _load_cache_item(self, idx: int):
        # reset_ops_id (as MONAI's PersistentDataset does): the transform trace of a shared item names no
        # transform instance, so Invertd through any dataset's equal pipeline accepts it
        return CASES.get_or_build(self._key(idx),
                                  lambda: reset_ops_id(super(SharedCacheDataset, self)._load_cache_item(idx)))


# datasets whose items come from a cache of their deterministic part, computed with metadata (a memory-cache item
# is built at setup; a disk-cache item in _cachecheck): their random part may run without it (track_meta(False))
CACHED_DATASETS = (SharedCacheDataset, SafePersistentDataset)
