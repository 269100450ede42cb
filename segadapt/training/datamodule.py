"""LightningDataModule for one fold of a ``dataset.json`` (see :func:`segadapt.data.fold_datasets`).

Batches:

* train: ``sampling='slice'`` -- 2D slices ``image (B, C, H, W)``, ``label (B, 1, H, W)`` and ``view``
  (B,) (0 sagittal, 1 coronal, 2 axial) for the multi-view UNet; ``'patch'`` -- patches
  ``(B, C, *patch_size)`` for 3D (or 2D-image) networks. ``B = batch_size * samples_per_volume``.
* validation / test: one whole preprocessed volume per batch (volumes differ in size after the
  foreground crop), ``image (1, C, *spatial)`` and ``label (1, 1, *spatial)`` as MetaTensors (affine
  kept for spacing and volumes), plus ``case_id``; :attr:`SegDataModule.val_pipeline` maps predictions
  back onto each case's file grid.

Training samples (one process; under DDP a shuffled epoch split over the ranks) are a function of the global step: batch t holds the cases at positions
``(t mod E) * B ..`` of the permutation of epoch ``t // E`` (E batches of B per epoch, permutation seeded
with (seed, fold, epoch)), each drawn through the random transforms seeded with (seed, fold, t, j), and
torch / numpy / python RNGs are reseeded with (seed, fold, t) before step t. A run resumed at step t from
a checkpoint therefore draws what the uninterrupted run draws, whatever it did before.

Model selection without leakage (``inner_fraction`` > 0): part of the fold's *training* patients form an
inner validation split (:func:`segadapt.data.inner_split`). While fitting, validation runs on those inner
cases only; ``trainer.validate`` / ``trainer.test`` score the fold's validation cases (and the inner cases
inside :meth:`SegDataModule.inner_validation`). Without an inner split nothing is validated while fitting.
``trainer.test`` scores the dataset's labelled test split (:func:`segadapt.data.build_test_set`; refused
without one), never a fold's cases.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from monai.data import DataLoader, Dataset
from torch.utils.data import Sampler

from segadapt.data import (
    PreprocessConfig,
    build_test_set,
    fold_datasets_with_inner,
    load_dataset_json,
)
from segadapt.data.cache import CACHED_DATASETS, track_meta
from segadapt.data.dataset_json import size_unit


class SegDataModule(pl.LightningDataModule):
    """Train/validation data of fold `fold` of a k-fold, patient-grouped split of `dataset_json`.

    Args:
        dataset_json: path to the dataset description.
        fold: which fold is held out for validation (0 .. n_folds - 1).
        n_folds: number of folds; the split file beside the dataset is created once and re-read.
        split_seed: seed of the split.
        preprocess: :class:`~segadapt.data.PreprocessConfig` fields (plain values).
        sampling: ``'slice'`` (multi-view 2D) or ``'patch'`` (3D / 2D-image patches).
        batch_size: training volumes per batch (each gives ``samples_per_volume`` samples).
        num_workers: data-loader worker processes.
        cache_workers: threads that fill the memory cache.
        splits_path: optional splits file, e.g. an nnU-Net ``splits_final.json`` (default: see
            :func:`segadapt.data.load_or_create_splits`).
        seed: seed of the training samples (see the module docstring).
        inner_fraction: share of the fold's training patients held out as the inner validation split
            (model selection); 0: none.
        max_train_cases: train on at most this many of the remaining training cases (the first N of a
            permutation seeded by (split_seed, fold): nested subsets for a learning curve); None: all.
    """

    def __init__(
        self,
        dataset_json: str,
        fold: int = 0,
        n_folds: int = 3,
        split_seed: int = 0,
        preprocess: Optional[dict] = None,
        sampling: str = "slice",
        batch_size: int = 2,
        num_workers: int = 0,
        cache_workers: int = 1,
        splits_path: Optional[str] = None,
        seed: int = 0,
        inner_fraction: float = 0.0,
        max_train_cases: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.preprocess = PreprocessConfig.from_dict(dict(preprocess or {}))
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.inner_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self._inner_outside_fit = False

    @property
    def in_channels(self) -> int:
        """Network input channels: image channels in ``dataset.json`` x CT windows (or 1)."""
        return load_dataset_json(self.hparams.dataset_json).channels * self.preprocess.in_channels

    @property
    def size_unit(self) -> str:
        """Unit of the lesion sizes in the metrics: 'mL', 'mm^2' (2D) or 'px' (2D files without spacing)."""
        return size_unit(load_dataset_json(self.hparams.dataset_json), self.preprocess.spatial_dims)

    def setup(self, stage: Optional[str] = None) -> None:
        h = self.hparams
        if stage == "test":  # the test split only: a dataset without one is refused before anything is built
            if self.test_set is None:
                self.test_set = build_test_set(h.dataset_json, self.preprocess, h.cache_workers)
            return
        if self.val_set is not None:
            return
        self.train_set, self.val_set, self.inner_set = fold_datasets_with_inner(
            h.dataset_json, h.fold, self.preprocess, n_folds=h.n_folds, seed=h.split_seed, sampling=h.sampling,
            splits_path=h.splits_path, cache_workers=h.cache_workers, inner_fraction=h.inner_fraction,
            max_train_cases=h.max_train_cases,
        )

    @property
    def inner_case_ids(self) -> list[str]:
        """The case ids of the inner validation split (empty without one); after setup."""
        return [] if self.inner_set is None else [d["case_id"] for d in self.inner_set.data]

    @contextmanager
    def inner_validation(self) -> Iterator[None]:
        """Within this block ``trainer.validate`` scores the inner cases (e.g. the untuned network's inner Dice)."""
        self.setup()
        if self.inner_set is None:
            raise ValueError("this data module has no inner validation split (inner_fraction is 0)")
        self._inner_outside_fit = True
        try:
            yield
        finally:
            self._inner_outside_fit = False

    @property
    def val_pipeline(self):
        """The validation transforms (``monai.transforms.Compose``), for ``Invertd``; None before setup."""
        return None if self.val_set is None else self.val_set.transform

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        h = self.hparams
        workers = {"num_workers": h.num_workers, "persistent_workers": h.num_workers > 0}
        if not train:
            return DataLoader(dataset, batch_size=1, **workers)
        if getattr(self, "trainer", None) is not None and self.trainer.world_size > 1:
            # DDP: Lightning's DistributedSampler splits each shuffled epoch over the ranks (it cannot wrap the
            # step-seeded sampler, whose length changes with the resume step); step-exact resume is single-process.
            return DataLoader(dataset, batch_size=h.batch_size, shuffle=True, **workers)
        sampler = StepSampler(len(dataset), h.batch_size, (h.seed, h.fold), self._global_step)
        return DataLoader(SeededItems(dataset), batch_size=h.batch_size, sampler=sampler, **workers)

    def _global_step(self) -> int:
        trainer = getattr(self, "trainer", None)
        return 0 if trainer is None else trainer.global_step

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Before training step t: torch, numpy and python RNGs reseeded from (seed, fold, t) (e.g. dropout)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            seed = int(np.random.SeedSequence([self.hparams.seed, self.hparams.fold, trainer.global_step]).generate_state(1)[0])
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """The inner cases while fitting (none without an inner split) or inside :meth:`inner_validation`;
        otherwise the fold's validation cases."""
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if fitting or self._inner_outside_fit:
            return [] if self.inner_set is None else self._loader(self.inner_set, train=False)
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """The labelled test split of the dataset (see :meth:`setup`)."""
        if self.test_set is None:
            self.setup("test")
        return self._loader(self.test_set, train=False)


class StepSampler(Sampler):
    """One epoch of training items from the epoch that global step ``first_step()`` falls in, on: the epoch
    ``e = t // E`` (``E = ceil(n / batch_size)`` batches) visits the items in the order of a permutation
    seeded with ``(*key, e)``; item j of batch t comes with the transform seed drawn from ``(*key, t, j)``.
    Started at step t mid-epoch, it yields the rest of that epoch (as Lightning runs it when resuming).

    Yields ``(item index, transform seed)`` pairs for :class:`SeededItems`.
    """

    def __init__(self, n_items: int, batch_size: int, key: tuple[int, ...], first_step: Callable[[], int]) -> None:
        self.n, self.batch_size, self.key, self.first_step = n_items, batch_size, tuple(int(k) for k in key), first_step

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        batches = math.ceil(self.n / self.batch_size)
        epoch, batch = divmod(self.first_step(), batches)
        order = np.random.default_rng([*self.key, epoch]).permutation(self.n)
        for position in range(batch * self.batch_size, self.n):
            step, j = divmod(position, self.batch_size)
            seed = np.random.SeedSequence([*self.key, epoch * batches + step, j]).generate_state(1)[0]
            yield int(order[position]), int(seed)


class SeededItems(torch.utils.data.Dataset):
    """``dataset[(index, seed)]``: item `index` of `dataset` with its transforms' random state set from `seed`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        # the random transforms without metadata (the training step drops it): on the phantom an item's
        # augmentation took 2.3-3.4x longer (slices), 1.3x (3D patches) with it, with equal values
        plain = isinstance(self.dataset, CACHED_DATASETS)  # their deterministic part keeps it (track_meta)
        with one_thread(), track_meta(False) if plain else nullcontext():
            self.dataset.transform.set_random_state(seed=seed)
            return self.dataset[index]


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 inside (the training steps' count restored after). An item's random
    transforms are many small tensor operations, which more threads only slow down: on the phantom the whole
    augmentation of an item took 7x longer at 2 threads than at 1, with the same values (element-wise
    operations, crops and interpolation; no float sum changes with the thread count)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
