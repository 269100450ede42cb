"""Patient-level k-fold splits, stratified by lesion volume, written once beside the dataset.

``load_or_create_splits(dataset_json, n_folds, seed)`` writes ``splits_<k>fold_seed<seed>.json`` next to
``dataset.json`` the first time and re-reads it on every later run, so "fold 0" always means the same
patients even if the splitting code or the library versions change. All scans of one ``patient_id`` land
in the same fold.

File format: nnU-Net's ``splits_final.json``, a list with one ``{"train": [...], "val": [...]}`` per fold
(case ids), so a fold means the same patients in both tools (copy the file to
``nnUNet_preprocessed/<Dataset>/splits_final.json``). An nnU-Net study's own ``splits_final.json`` is used
as it is when it is given (``path``, ``data.splits_path``) or found, in this order: beside ``dataset.json``,
then ``$nnUNet_preprocessed/<dataset folder name>/splits_final.json``; its folds decide (``n_folds`` must
equal their number). Files in segadapt's earlier format (``{"n_folds", "seed", "folds": [{"val": ...}]}``)
are still read.

Stratification (what scikit-learn's ``StratifiedGroupKFold`` does for classes, done here for a continuous
volume, which it does not support): patients are sorted by mean lesion volume (ties broken by a seeded
shuffle) and dealt out in blocks of k, each block in a seeded random fold order, so every fold gets one
patient from each volume stratum and fold sizes differ by at most one patient.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segadapt.io import write_json

from .dataset_json import CaseEntry, DatasetDescription, load_dataset_json
from .loading import CaseError
from .readers import make_loader


@dataclass(frozen=True)
class Splits:
    """Validation case ids of each fold, as stored in the splits file at `path`."""

    path: Path
    n_folds: int
    seed: int
    folds: tuple[tuple[str, ...], ...]
    volumes_ml: Mapping[str, float] | None = None
    """Lesion volume per case when the split was just made (what :func:`save_splits` writes)."""

    def _check(self, fold: int) -> None:
        if not isinstance(fold, (int, np.integer)) or not 0 <= fold < self.n_folds:
            raise ValueError(
                f"fold {fold!r} out of range: {self.path} has {self.n_folds} folds (0..{self.n_folds - 1})"
            )

    def val_ids(self, fold: int) -> tuple[str, ...]:
        self._check(fold)
        return self.folds[fold]

    def train_ids(self, fold: int) -> tuple[str, ...]:
        self._check(fold)
        return tuple(c for i, f in enumerate(self.folds) if i != fold for c in f)


def lesion_volume_ml(label_path: str | os.PathLike) -> float:
    """Foreground volume (label > 0) of a label file in millilitres: count * |det(affine[:3, :3])| / 1000."""
    try:
        label = make_loader("label")({"label": str(label_path)})["label"]
    except Exception as e:
        raise CaseError(f"cannot read label {label_path}: {type(e).__name__}: {e}") from e
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(label.affine, dtype=np.float64)[:-1, :-1])))
    return float((label > 0).sum()) * voxel_mm3 / 1000.0


def make_splits(
    cases: Sequence[CaseEntry], volumes_ml: Mapping[str, float], n_folds: int, seed: int
) -> list[list[str]]:
    """Validation case ids per fold: patients grouped, stratified by mean lesion volume, seeded.

    Raises:
        ValueError: fewer than 2 folds, or more folds than patients.
    """
    patients: dict[str, list[str]] = {}
    for case in cases:
        patients.setdefault(case.patient_id, []).append(case.case_id)
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if n_folds > len(patients):
        raise ValueError(f"cannot make {n_folds} folds from {len(patients)} patients ({len(cases)} cases)")
    rng = np.random.default_rng(seed)
    ids = sorted(patients)
    ids = [ids[i] for i in rng.permutation(len(ids))]
    ids.sort(key=lambda p: float(np.mean([volumes_ml[c] for c in patients[p]])))  # stable: shuffle breaks ties
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    for start in range(0, len(ids), n_folds):
        for patient, fold in zip(ids[start:start + n_folds], rng.permutation(n_folds)):
            folds[fold].extend(sorted(patients[patient]))
    return [sorted(f) for f in folds]


NNUNET_SPLITS_FILE = "splits_final.json"


def default_splits_path(description: DatasetDescription, n_folds: int, seed: int) -> Path:
    return description.root / f"splits_{n_folds}fold_seed{seed}.json"


def find_nnunet_splits(description: DatasetDescription) -> Path | None:
    """An nnU-Net ``splits_final.json`` beside ``dataset.json`` or in ``$nnUNet_preprocessed/<folder name>/``."""
    candidates = [description.root / NNUNET_SPLITS_FILE]
    if os.environ.get("nnUNet_preprocessed"):
        candidates.append(Path(os.environ["nnUNet_preprocessed"]) / description.root.name / NNUNET_SPLITS_FILE)
    return next((p for p in candidates if p.is_file()), None)


def nnunet_splits(splits: Splits, description: DatasetDescription) -> list[dict[str, list[str]]]:
    """The folds in nnU-Net's ``splits_final.json`` format: ``[{"train": [...], "val": [...]}, ...]`` (sorted ids)."""
    ids = sorted(c.case_id for c in description.cases)
    return [{"train": [c for c in ids if c not in set(val)], "val": sorted(val)} for val in splits.folds]


def save_splits(splits: Splits, description: DatasetDescription) -> Path:
    """Write a split made by ``load_or_create_splits(..., write=False)`` to its file (nnU-Net's format)."""
    return write_json(splits.path, nnunet_splits(splits, description))


def _read_folds(path: Path, ids: set[str], n_folds: int, seed: int) -> tuple[tuple[str, ...], ...]:
    """Validation ids per fold of a splits file (nnU-Net's list, or segadapt's earlier format)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(doc, list):
            folds = tuple(tuple(f["val"]) for f in doc)
            trains = [set(f["train"]) for f in doc]
        else:
            folds = tuple(tuple(f["val"]) for f in doc["folds"])
            trains = None
            stored_k, stored_seed = int(doc["n_folds"]), int(doc["seed"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"splits file {path} is unreadable ({e}); delete it to re-split") from e
    named = re.fullmatch(r"splits_(\d+)fold_seed(-?\d+)\.json", path.name)  # segadapt's file names carry k and seed
    if trains is not None and named:
        stored_k, stored_seed = int(named[1]), int(named[2])
    if (trains is None or named) and (stored_k, stored_seed) != (n_folds, seed):
        raise ValueError(f"splits file {path} holds {stored_k} folds with seed {stored_seed}, asked for {n_folds} "
                         f"with seed {seed}")
    if len(folds) != n_folds:
        raise ValueError(f"splits file {path} holds {len(folds)} folds, asked for {n_folds}: set data.n_folds="
                         f"{len(folds)} to use them")
    stored = [c for f in folds for c in f]
    if len(stored) != len(set(stored)):
        twice = sorted({c for c in stored if stored.count(c) > 1})
        raise ValueError(f"splits file {path}: cases {twice[:10]} are validation cases of several folds (segadapt "
                         "needs folds that partition the cases)")
    if set(stored) != ids:
        raise ValueError(
            f"splits file {path} does not match the dataset: cases added {sorted(ids - set(stored))[:10]}, "
            f"removed {sorted(set(stored) - ids)[:10]}; delete the splits file to re-split (fold membership will change)"
        )
    for fold, (val, train) in enumerate(zip(folds, trains or [])):
        if train != ids - set(val):
            raise ValueError(f"splits file {path}: fold {fold}'s 'train' is not every case outside its 'val' "
                             f"(differs by {sorted(train ^ (ids - set(val)))[:10]})")
    return folds


def load_or_create_splits(
    dataset: str | os.PathLike | DatasetDescription,
    n_folds: int = 5,
    seed: int = 0,
    path: str | os.PathLike | None = None,
    write: bool = True,
) -> Splits:
    """Read the splits file for (`n_folds`, `seed`), creating it first if absent.

    Args:
        dataset: a ``dataset.json`` path or a loaded description.
        path: where the splits file lives; default: an nnU-Net ``splits_final.json`` if one is found
            (:func:`find_nnunet_splits`), else ``<dataset folder>/splits_<k>fold_seed<seed>.json`` (pass another
            path when the dataset folder is read-only).
        write: False: a new split is returned unwritten (:func:`save_splits` writes it once the cases
            passed their checks).

    Raises:
        ValueError: the stored file disagrees with the dataset (cases added or removed, other k/seed,
            a patient's cases in several folds), or see :func:`make_splits`.
    """
    description = dataset if isinstance(dataset, DatasetDescription) else load_dataset_json(dataset)
    if path is None:
        path = find_nnunet_splits(description) or default_splits_path(description, n_folds, seed)
    path = Path(path)
    ids = {c.case_id for c in description.cases}
    if not path.exists():
        volumes = {c.case_id: lesion_volume_ml(c.label) for c in description.cases}
        try:
            folds = make_splits(description.cases, volumes, n_folds, seed)
        except ValueError as e:
            raise ValueError(f"{description.path}: {e}") from None
        made = Splits(path, n_folds, seed, tuple(tuple(f) for f in folds), volumes)
        if not write:
            return made
        save_splits(made, description)
    try:
        folds = _read_folds(path, ids, n_folds, seed)
    except ValueError as e:
        raise ValueError(str(e).replace("the dataset", str(description.path))) from None
    _check_patients(description, folds, path)
    return Splits(path, n_folds, seed, folds)


def _check_patients(description: DatasetDescription, folds: Sequence[Sequence[str]], path: Path) -> None:
    """Raise if a patient's cases sit in more than one fold (patient ids may change after the split)."""
    fold_of = {case: i for i, fold in enumerate(folds) for case in fold}
    spread: dict[str, dict[int, list[str]]] = {}
    for case in description.cases:
        spread.setdefault(case.patient_id, {}).setdefault(fold_of[case.case_id], []).append(case.case_id)
    for patient, by_fold in spread.items():
        if len(by_fold) > 1:
            where = ", ".join(f"fold {f} {sorted(c)}" for f, c in sorted(by_fold.items()))
            raise ValueError(
                f"splits file {path} puts patient {patient!r} in {len(by_fold)} folds: {where}; patient ids in "
                f"{description.path} changed after the split? delete the splits file to re-split"
            )


def fold_cases(
    description: DatasetDescription, splits: Splits, fold: int
) -> tuple[list[CaseEntry], list[CaseEntry]]:
    """(train cases, validation cases) of `fold`, in dataset order."""
    val = set(splits.val_ids(fold))
    return [c for c in description.cases if c.case_id not in val], [c for c in description.cases if c.case_id in val]


def _fold_rng(seed: int, fold: int, stream: int) -> np.random.Generator:
    """The generator of one (split seed, fold) pair; `stream` keeps the inner split and the subset apart."""
    return np.random.default_rng([int(seed), int(fold), stream])


def inner_split(
    train: Sequence[CaseEntry], fraction: float, seed: int, fold: int
) -> tuple[list[CaseEntry], list[CaseEntry]]:
    """(remaining training cases, inner validation cases) carved from a fold's training cases `train`.

    Patients are grouped as in the outer split (all scans of a patient fall on one side): a seeded
    permutation of the patients (generator seeded by (`seed`, `fold`)) is cut after
    ``min(max(1, round(fraction * P)), P - 1)`` patients, P the number of patients in `train`, so both
    sides hold at least one patient. ``fraction == 0`` returns ``(train, [])``. Both lists keep `train`'s order.

    Raises:
        ValueError: `fraction` outside [0, 1), or a positive fraction with fewer than 2 patients.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"inner_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(train), []
    patients = sorted({c.patient_id for c in train})
    if len(patients) < 2:
        raise ValueError(f"fold {fold}: cannot carve an inner validation split from {len(patients)} training "
                         "patient(s) (set inner_fraction to 0)")
    n_inner = min(max(1, round(fraction * len(patients))), len(patients) - 1)
    order = _fold_rng(seed, fold, 0).permutation(len(patients))
    inner = {patients[i] for i in order[:n_inner]}
    return [c for c in train if c.patient_id not in inner], [c for c in train if c.patient_id in inner]


def subset_cases(cases: Sequence[CaseEntry], n: int | None, seed: int, fold: int) -> list[CaseEntry]:
    """The first `n` cases of a seeded permutation of `cases` (generator seeded by (`seed`, `fold`)), in `cases`'
    order; all of them when `n` is None or at least ``len(cases)``. The permutation depends on `cases` only, so the
    subsets of one fold are nested (5 within 10 within 20): a learning curve adds cases, it never swaps them.

    Raises:
        ValueError: `n` < 1.
    """
    if n is None or n >= len(cases):
        return list(cases)
    if n < 1:
        raise ValueError(f"max_train_cases must be at least 1, got {n}")
    keep = set(_fold_rng(seed, fold, 1).permutation(len(cases))[:n].tolist())
    return [c for i, c in enumerate(cases) if i in keep]


def training_and_inner(train_cases: Sequence[CaseEntry], inner_fraction: float, max_train_cases: int | None,
                       seed: int, fold: int) -> tuple[list[CaseEntry], list[CaseEntry]]:
    """(trained, inner): a fold's training cases as a run cuts them, the inner split first
    (:func:`inner_split`), then the rest cut to `max_train_cases` (:func:`subset_cases`), so every point of a
    learning curve shares the inner cases."""
    rest, inner = inner_split(train_cases, inner_fraction, seed, fold)
    return subset_cases(rest, max_train_cases, seed, fold), inner
