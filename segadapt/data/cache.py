"""Disk-cache item files that can hold no code: safetensors for the arrays, JSON for everything else.

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
import warnings
from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, PersistentDataset
from safetensors import safe_open

from .files import save_safetensors

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


def save_item(path: str | os.PathLike, item: Mapping[str, object]) -> Path:
    """Write a preprocessed item (see the module docstring) to `path`, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(item, tensors))
    return save_safetensors(path, tensors, {"format": FORMAT, "format_version": FORMAT_VERSION, "tree": tree})


def load_item(path: str | os.PathLike) -> dict:
    """The item :func:`save_item` wrote to `path`; raises ValueError for any other file (nothing is executed)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} file")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        item = _decode(json.loads(metadata["tree"]), tensors)
    except Exception as error:  # safetensors, JSON and missing-reference errors alike
        raise ValueError(f"disk cache file {path} is unreadable: {type(error).__name__}: {error}") from None
    if not isinstance(item, dict):
        raise ValueError(f"disk cache file {path} does not hold a data item")
    return item


class SafePersistentDataset(PersistentDataset):
    """MONAI ``PersistentDataset`` whose cache files are :func:`save_item` files, never pickles.

    Same keys (``hash_func`` of the item + the transform hash) and the same split of the pipeline
    (deterministic part cached, random part rerun); a cache file that cannot be read as an item is
    rebuilt (with a warning), so a tampered file is overwritten, never run.
    """

    def _cachecheck(self, item_transformed):
        if self.cache_dir is None:
            return self._pre_transform(deepcopy(item_transformed))
        path = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}{SUFFIX}"
        if path.is_file():
            try:
                return load_item(path)
            except ValueError as error:
                warnings.warn(f"{error}; rebuilding it", stacklevel=2)
        item = self._pre_transform(deepcopy(item_transformed))  # keep the hashed original unchanged
        try:
            save_item(path, item)
        except PermissionError:  # a read-only cache folder: run uncached, like MONAI
            pass
        return item
