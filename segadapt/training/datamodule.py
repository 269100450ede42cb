"""LightningDataModule for one fold of a ``dataset.json`` (see :func:`segadapt.data.fold_datasets`).

Batches:

* train: ``sampling='slice'`` -- 2D slices ``image (B, C, H, W)``, ``label (B, 1, H, W)`` and ``view``
  (B,) (0 sagittal, 1 coronal, 2 axial) for the multi-view UNet; ``'patch'`` -- patches
  ``(B, C, *patch_size)`` for 3D (or 2D-image) networks. ``B = batch_size * samples_per_volume``.
* validation / test: one whole preprocessed volume per batch (volumes differ in size after the
  foreground crop), ``image (1, C, *spatial)`` and ``label (1, 1, *spatial)`` as MetaTensors (affine
  kept for spacing and volumes), plus ``case_id``; :attr:`SegDataModule.val_pipeline` maps predictions
  back onto each case's file grid.

Model selection without leakage (``inner_fraction`` > 0): part of the fold's *training* patients form an
inner validation split (:func:`segadapt.data.inner_split`). While fitting, validation runs on those inner
cases only; ``trainer.validate`` / ``trainer.test`` score the fold's validation cases (and the inner cases
inside :meth:`SegDataModule.inner_validation`). Without an inner split nothing is validated while fitting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from monai.data import DataLoader, Dataset

from segadapt.data import (
    PreprocessConfig,
    fold_datasets_with_inner,
    load_dataset_json,
)


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
        splits_path: optional splits file (default beside ``dataset.json``).
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
        inner_fraction: float = 0.0,
        max_train_cases: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.preprocess = PreprocessConfig.from_dict(dict(preprocess or {}))
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.inner_set: Optional[Dataset] = None
        self._inner_outside_fit = False

    @property
    def in_channels(self) -> int:
        """Network input channels: image channels in ``dataset.json`` x CT windows (or 1)."""
        return load_dataset_json(self.hparams.dataset_json).channels * self.preprocess.in_channels

    def setup(self, stage: Optional[str] = None) -> None:
        if self.val_set is not None:
            return
        h = self.hparams
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
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size if train else 1,
            shuffle=train,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

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
        return self._loader(self.val_set, train=False)
