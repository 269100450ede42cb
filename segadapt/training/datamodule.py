"""LightningDataModule for one fold of a ``dataset.json`` (see :func:`segadapt.data.fold_datasets`).

Batches:

* train: ``sampling='slice'`` -- 2D slices ``image (B, C, H, W)``, ``label (B, 1, H, W)`` and ``view``
  (B,) (0 sagittal, 1 coronal, 2 axial) for the multi-view UNet; ``'patch'`` -- patches
  ``(B, C, *patch_size)`` for 3D (or 2D-image) networks. ``B = batch_size * samples_per_volume``.
* validation / test: one whole preprocessed volume per batch (volumes differ in size after the
  foreground crop), ``image (1, C, *spatial)`` and ``label (1, 1, *spatial)`` as MetaTensors (affine
  kept for spacing and volumes), plus ``case_id``; :attr:`SegDataModule.val_pipeline` maps predictions
  back onto each case's file grid.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
from monai.data import DataLoader, Dataset

from segadapt.data import (
    PreprocessConfig,
    fold_datasets,
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.preprocess = PreprocessConfig.from_dict(dict(preprocess or {}))
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    @property
    def in_channels(self) -> int:
        """Network input channels: image channels in ``dataset.json`` x CT windows (or 1)."""
        return load_dataset_json(self.hparams.dataset_json).channels * self.preprocess.in_channels

    def setup(self, stage: Optional[str] = None) -> None:
        if self.val_set is not None:
            return
        h = self.hparams
        self.train_set, self.val_set = fold_datasets(
            h.dataset_json, h.fold, self.preprocess, n_folds=h.n_folds, seed=h.split_seed, sampling=h.sampling,
            splits_path=h.splits_path, cache_workers=h.cache_workers,
        )

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

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
