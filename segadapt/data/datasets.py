"""Dataset builders: MONAI ``Dataset`` / ``CacheDataset`` / ``PersistentDataset`` by ``cfg.cache``.

Caches hold the output of the deterministic part of a pipeline (up to its first random transform):

* ``'none'``: ``Dataset``, every item read and preprocessed on every visit.
* ``'memory'``: :class:`~segadapt.data.cache.SharedCacheDataset` (a ``CacheDataset``), every case preprocessed
  once per process: the datasets of every fold and run of a local sweep share one store of cases.
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
from typing import NamedTuple, Optional

from monai.data import Dataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose, RandomizableTrait

from .cache import SafePersistentDataset, SharedCacheDataset
from .config import PreprocessConfig
from .dataset_json import CaseEntry, DatasetDescription, load_dataset_json, load_test_cases
from .loading import LoadCased
from .splits import fold_cases, load_or_create_splits, save_splits, training_and_inner
from .pipelines import patch_train_transforms, slice_train_transforms, val_transforms

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
            files = item[key] if isinstance(item[key], (list, tuple)) else [item[key]]
            stats = [os.stat(str(f)) for f in files]
            state[f"{key}_stat"] = [(s.st_size, s.st_mtime_ns) for s in stats] if len(stats) > 1 else \
                (stats[0].st_size, stats[0].st_mtime_ns)
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
    checks = _case_checks(transform)
    if cfg.cache == "memory":
        deterministic = tuple(type(t).__name__ for t in transform.flatten().transforms
                              [:transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait))])
        scope = (name, cfg.cache_key(), repr(checks), deterministic)
        return SharedCacheDataset(data, transform, scope, partial(_item_hash, checks=None), cache_workers,
                                  description=f"preprocessing {name}")
    return SafePersistentDataset(data, transform, cache_dir=disk_cache_dir(cfg, name),
                                 hash_func=partial(_item_hash, checks=checks))


class FoldDatasets(NamedTuple):
    """Datasets of one fold: `train` (what the network trains on), `val` (the fold's held-out cases) and
    `inner` (model selection: cases carved from the fold's training cases; None without an inner split)."""

    train: Dataset
    val: Dataset
    inner: Optional[Dataset]


def fold_datasets_with_inner(
    dataset: str | os.PathLike | DatasetDescription,
    fold: int,
    cfg: PreprocessConfig,
    n_folds: int = 5,
    seed: int = 0,
    sampling: str = "patch",
    splits_path: str | os.PathLike | None = None,
    cache_workers: int | None = 1,
    inner_fraction: float = 0.0,
    max_train_cases: Optional[int] = None,
) -> FoldDatasets:
    """(train, validation, inner) datasets of `fold` of a ``dataset.json``.

    The fold's training cases are split first (:func:`~segadapt.data.splits.inner_split`, `inner_fraction`
    of the patients become the inner cases), then the rest is cut to `max_train_cases`
    (:func:`~segadapt.data.splits.subset_cases`: the first N of a seeded permutation), so every point of a
    learning curve shares the inner and the validation cases. Train items are patches (``sampling='patch'``)
    or multi-view 2D slices (``'slice'``); validation and inner items are whole preprocessed volumes with
    labels, through one and the same pipeline. Splits come from :func:`load_or_create_splits`.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    description = dataset if isinstance(dataset, DatasetDescription) else load_dataset_json(dataset)
    splits = load_or_create_splits(description, n_folds, seed, splits_path, write=False)
    train_cases, val_cases = fold_cases(description, splits, fold)
    train_cases, inner_cases = training_and_inner(train_cases, inner_fraction, max_train_cases, seed, fold)
    train_pipeline = patch_train_transforms if sampling == "patch" else slice_train_transforms
    args = (cfg, description.label_values, description.channels)
    evaluation = val_transforms(*args)
    datasets = FoldDatasets(
        build_dataset(train_cases, train_pipeline(*args), cfg, description.name, cache_workers),
        build_dataset(val_cases, evaluation, cfg, description.name, cache_workers),
        build_dataset(inner_cases, evaluation, cfg, description.name, cache_workers) if inner_cases else None,
    )
    if splits.volumes_ml is not None:  # a new split: written only once every case passed its checks
        if cfg.cache != "memory" or max_train_cases is not None:  # else building the caches checked every case
            check = next(t for t in evaluation.transforms if isinstance(t, LoadCased))
            for case in description.cases:
                check(case.as_dict())
        save_splits(splits, description)
    return datasets


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
    """(train, validation) datasets of `fold` of a ``dataset.json``: every training case of the fold trains
    (:func:`fold_datasets_with_inner` without an inner split)."""
    train, val, _ = fold_datasets_with_inner(dataset, fold, cfg, n_folds, seed, sampling, splits_path, cache_workers)
    return train, val


def build_test_set(dataset_json: str | os.PathLike, cfg: PreprocessConfig, cache_workers: int | None = 1) -> Dataset:
    """Whole labelled volumes of the dataset's test split (:func:`~segadapt.data.dataset_json.load_test_cases`)
    through the validation pipeline. Raises ValueError when the dataset has no labelled test split."""
    description = load_dataset_json(dataset_json)
    cases = load_test_cases(description.path)
    if not cases:
        raise ValueError(f"{description.path} has no labelled test split (a 'test' list of {{image, label}} entries, "
                         "or imagesTs/ with labelsTs/ beside it): `segadapt test` would score training cases; use "
                         "`segadapt validate` for the fold's validation cases")
    pipeline = val_transforms(cfg, description.label_values, description.channels)
    return build_dataset(cases, pipeline, cfg, f"{description.name}-test", cache_workers)
