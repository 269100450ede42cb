"""Dataset builders: MONAI ``Dataset`` / ``CacheDataset`` / ``PersistentDataset`` by ``cfg.cache``.

Caches hold the output of the deterministic part of a pipeline (up to its first random transform):

* ``'none'``: ``Dataset``, every item read and preprocessed on every visit.
* ``'memory'``: ``CacheDataset``, every case preprocessed once when the dataset is built.
* ``'disk'``: :class:`~segadapt.data.cache.SafePersistentDataset` (a ``PersistentDataset`` whose files are
  safetensors + JSON, never pickles; an unreadable or tampered file is rebuilt) under
  ``<cfg.cache_dir>/<dataset name>-<cfg.cache_key()>``; an item's cache file is keyed by its paths, each file's size and modification time and the case checks of the
  pipeline's :class:`LoadCased` (label values, channels, affine tolerance), so a changed config gets a
  fresh folder and a replaced file or changed check is re-read. Files appear atomically, and only after
  the case passed its checks. Cache hits are MetaTensors with their affine and meta, like first reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

from monai.data import CacheDataset, Dataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose

from .cache import SafePersistentDataset
from .config import PreprocessConfig
from .dataset_json import CaseEntry, DatasetDescription, load_dataset_json
from .loading import LoadCased
from .splits import fold_cases, load_or_create_splits
from .transforms import patch_train_transforms, slice_train_transforms, val_transforms

SAMPLINGS = ("patch", "slice")


def disk_cache_dir(cfg: PreprocessConfig, name: str) -> Path:
    """Folder of the disk cache for dataset `name` under `cfg` (changes whenever ``cfg.cache_key()`` does)."""
    return Path(cfg.cache_dir) / f"{name}-{cfg.cache_key()}"


def _case_checks(transform: Compose) -> dict | None:
    """The settings of the pipeline's :class:`LoadCased` (what a cached case was checked against)."""
    for step in transform.flatten().transforms:
        if isinstance(step, LoadCased):
            return {"keys": list(step.keys), "label_values": step.label_values, "channels": step.channels,
                    "spatial_dims": step.spatial_dims, "affine_tolerance": step.affine_tolerance}
    return None


def _item_hash(item: Mapping[str, object], checks: Mapping[str, object] | None = None) -> bytes:
    """Cache-file key: the item's fields, (size, mtime) of its image and label files, and the case `checks`."""
    state = dict(item)
    for key in ("image", "label"):
        if key in item:
            stat = os.stat(str(item[key]))
            state[f"{key}_stat"] = (stat.st_size, stat.st_mtime_ns)
    if checks is not None:
        state["case_checks"] = dict(checks)
    return pickle_hashing(state)


def build_dataset(
    cases: Sequence[CaseEntry | Mapping[str, str]],
    transform: Compose,
    cfg: PreprocessConfig,
    name: str = "dataset",
    cache_workers: int | None = 1,
) -> Dataset:
    """A MONAI dataset over `cases` with `transform`, cached as ``cfg.cache`` says.

    Args:
        cases: :class:`CaseEntry` items or MONAI data dicts ({'image', 'label', 'case_id', ...}).
        name: dataset name, part of the disk-cache folder.
        cache_workers: threads that fill a memory cache (None: one per CPU).
    """
    data = [c.as_dict() if isinstance(c, CaseEntry) else dict(c) for c in cases]
    if cfg.cache == "none":
        return Dataset(data, transform)
    if cfg.cache == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=cache_workers, progress=False)
    return SafePersistentDataset(data, transform, cache_dir=disk_cache_dir(cfg, name),
                                 hash_func=partial(_item_hash, checks=_case_checks(transform)))


def fold_datasets(
    dataset: str | os.PathLike | DatasetDescription,
    fold: int,
    cfg: PreprocessConfig,
    n_folds: int = 5,
    seed: int = 0,
    sampling: str = "patch",
    splits_path: str | os.PathLike | None = None,
    cache_workers: int | None = 1,
) -> tuple[Dataset, Dataset]:
    """(train, validation) datasets of `fold` of a ``dataset.json``.

    Train items are patches (``sampling='patch'``) or multi-view 2D slices (``'slice'``); validation
    items are whole preprocessed volumes with labels. Splits come from :func:`load_or_create_splits`.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    description = dataset if isinstance(dataset, DatasetDescription) else load_dataset_json(dataset)
    splits = load_or_create_splits(description, n_folds, seed, splits_path)
    train_cases, val_cases = fold_cases(description, splits, fold)
    train_pipeline = patch_train_transforms if sampling == "patch" else slice_train_transforms
    args = (cfg, description.label_values, description.channels)
    return (
        build_dataset(train_cases, train_pipeline(*args), cfg, description.name, cache_workers),
        build_dataset(val_cases, val_transforms(*args), cfg, description.name, cache_workers),
    )
