"""The training schedule from the data: ``trainer.max_steps``, ``pretrain.max_steps``, ``optim.warmup_steps``,
``selection.every_n_steps`` and ``selection.patience`` when a config says ``auto``.

The rule (written for any dataset; the reasons are in ``docs/training.md``)::

    n_train   = training cases of the job's fold in the split it uses (segadapt's splits file, an nnU-Net
                splits_final.json, the inner splits file of ``segadapt auto``; made as the run will make it when
                absent), less its inner split, then at most ``max_train_cases`` (:func:`fold_training_cases`)
    coverage  = max(1, median volume voxels / sample voxels)   samples that tile one volume (a patch or a slice)
    steps     = ceil(PASSES x n_train x coverage / samples per step),
                at least MIN_STEPS (adapting) or MIN_PRETRAIN_STEPS (from random init), at most MAX_STEPS
    warm-up   = max(MIN_WARMUP, round(WARMUP_FRACTION x steps))
    selection = every max(25, 25 x round(steps / (25 x VALIDATIONS))) steps: about VALIDATIONS inner validations
    patience  = ceil(validations / 2): stop when the inner Dice has not improved for half the schedule

The learning rates are not planned: they stay per adapter family in ``configs/adapter/*.yaml``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from segadapt.data.dataset_json import load_dataset_json
from segadapt.data.splits import fold_cases, inner_split, load_or_create_splits, subset_cases

PASSES = 25                  # times each training voxel is sampled (the hand-set recipes: 20, 25 and 31 passes)
MIN_STEPS = 250              # the schedule the adapters' learning rates were chosen at (docs/hippocampus.md)
MIN_PRETRAIN_STEPS = 600     # from random init: the features themselves must be learnt
MAX_STEPS = 250_000          # nnU-Net's 1000 epochs x 250 iterations
MIN_WARMUP, WARMUP_FRACTION = 10, 0.03
VALIDATIONS, SELECTION_ROUND = 6, 25


@dataclass(frozen=True)
class FoldCases:
    """The training cases of one job's fold: `fold_train` in the split (`split`: its file), `inner` of them held
    out for model selection, `trained` the rest after ``max_train_cases``."""

    split: str
    fold: int
    fold_train: int
    inner: int
    trained: int

    def describe(self) -> str:
        cut = "" if self.trained == self.fold_train - self.inner else f", {self.trained} after max_train_cases"
        return (f"{self.trained} training cases (fold {self.fold} of {self.split}: {self.fold_train} training "
                f"cases, {self.inner} of them the inner split{cut})")


def fold_training_cases(dataset_json: str | os.PathLike, n_folds: int, seed: int, fold: int, inner_fraction: float,
                        max_train_cases: int | None = None, splits_path: str | None = None) -> FoldCases:
    """The cases a run of `fold` trains on, counted in its own split as the data module cuts it
    (:func:`segadapt.data.datasets.fold_datasets_with_inner`: fold, inner split, ``max_train_cases``). A split
    not written yet is made as the run makes it (the label volumes are read) and not written."""
    description = load_dataset_json(dataset_json)
    splits = load_or_create_splits(description, n_folds, seed, splits_path, write=False)
    train, _ = fold_cases(description, splits, fold)
    rest, inner = inner_split(train, inner_fraction, seed, fold)
    trained = subset_cases(rest, max_train_cases, seed, fold)
    return FoldCases(splits.path.name, fold, len(train), len(inner), len(trained))


def coverage(median_shape: Sequence[int], sample_shape: Sequence[int]) -> float:
    """Samples that tile one median volume: its voxels / the sample's (a 2D slice counts its pixels), at least 1."""
    return max(1.0, math.prod(median_shape) / math.prod(sample_shape))


def planned_steps(n_train: int, samples_per_volume: float, samples_per_step: int, pretraining: bool = False) -> int:
    """ceil(PASSES x n_train x samples_per_volume / samples_per_step) within [floor, MAX_STEPS] (module doc)."""
    if samples_per_step < 1 or n_train < 1:
        raise ValueError(f"cannot plan a schedule for {n_train} training cases at {samples_per_step} samples per step")
    steps = math.ceil(PASSES * n_train * samples_per_volume / samples_per_step)
    return min(max(steps, MIN_PRETRAIN_STEPS if pretraining else MIN_STEPS), MAX_STEPS)


@dataclass(frozen=True)
class StepSchedule:
    """Warm-up, inner validation interval and patience of a job of `max_steps` steps (the module doc's rule)."""

    max_steps: int
    warmup_steps: int
    every_n_steps: int
    patience: int

    @classmethod
    def of(cls, max_steps: int) -> StepSchedule:
        warmup = max(MIN_WARMUP, round(WARMUP_FRACTION * max_steps))
        every = max(SELECTION_ROUND, SELECTION_ROUND * round(max_steps / (SELECTION_ROUND * VALIDATIONS)))
        validations = max(1, max_steps // every)
        return cls(int(max_steps), warmup, every, max(1, math.ceil(validations / 2)))
