"""The training schedule from the data: ``trainer.max_steps``, ``pretrain.max_steps``, ``optim.warmup_steps``,
``selection.every_n_steps`` and ``selection.patience`` when a config says ``auto``.

The rule (written for any dataset; the reasons are in ``docs/training.md``)::

    n_train   = training cases of the largest fold in the split the job uses (segadapt's splits file, an nnU-Net
                splits_final.json, the inner splits file of ``segadapt auto``; made as the run will make it when
                absent), less its inner split, then at most ``max_train_cases`` (:func:`fold_training_cases`): the
                folds of one cross-validation train the same steps, so the report pools them as one setting
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
from segadapt.data.splits import fold_cases, load_or_create_splits, training_and_inner

PASSES = 25                  # times each training voxel is sampled (the hand-set recipes: 20, 25 and 31 passes)
MIN_STEPS = 250              # the schedule the adapters' learning rates were chosen at (docs/hippocampus.md)
MIN_PRETRAIN_STEPS = 600     # from random init: the features themselves must be learnt
MAX_STEPS = 250_000          # nnU-Net's 1000 epochs x 250 iterations
MIN_WARMUP, WARMUP_FRACTION = 10, 0.03
VALIDATIONS, SELECTION_ROUND = 6, 25


@dataclass(frozen=True)
class FoldCases:
    """The training cases the schedule counts: those of `fold`, the largest fold of the split (`split`: its file,
    `folds` folds): `fold_train` in the split, `inner` of them held out for model selection, `trained` the rest after
    ``max_train_cases``."""

    split: str
    fold: int
    fold_train: int
    inner: int
    trained: int
    folds: int = 1

    def describe(self) -> str:
        cut = "" if self.trained == self.fold_train - self.inner else f", {self.trained} after max_train_cases"
        largest = f"the largest of its {self.folds} folds, " if self.folds > 1 else ""
        return (f"{self.trained} training cases (fold {self.fold} of {self.split}, {largest}{self.fold_train} "
                f"training cases, {self.inner} of them the inner split{cut})")


def fold_training_cases(dataset_json: str | os.PathLike, n_folds: int, seed: int, fold: int, inner_fraction: float,
                        max_train_cases: int | None = None, splits_path: str | None = None) -> FoldCases:
    """The training cases the schedule counts for a job of `fold`: those of the split's fold that trains on the
    most cases (the first such fold), counted as the data module cuts it
    (:func:`segadapt.data.datasets.fold_datasets_with_inner`: fold, inner split, ``max_train_cases``), so that every
    fold of one cross-validation gets the same schedule. A split not written yet is made as the run makes it (the
    label volumes are read) and not written. `fold` is checked against the split."""
    description = load_dataset_json(dataset_json)
    splits = load_or_create_splits(description, n_folds, seed, splits_path, write=False)
    fold_cases(description, splits, fold)  # the job's own fold exists
    counted = []
    for k in range(len(splits.folds)):
        train, _ = fold_cases(description, splits, k)
        trained, inner = training_and_inner(train, inner_fraction, max_train_cases, seed, k)
        counted.append(FoldCases(splits.path.name, k, len(train), len(inner), len(trained), len(splits.folds)))
    return max(counted, key=lambda c: (c.trained, -c.fold))


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
