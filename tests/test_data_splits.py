"""Patient-level k-fold splits: deterministic, grouped, stratified, written once and re-read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segadapt.data import (
    CaseEntry,
    fold_cases,
    inner_split,
    lesion_volume_ml,
    load_dataset_json,
    load_or_create_splits,
    make_splits,
    subset_cases,
    write_dataset_json,
)
from segadapt.data.files import save_nifti

SPACING = np.diag([2.0, 2.0, 5.0, 1.0])  # 20 mm^3 voxels


def _dataset(root, volumes_voxels, patients=None):
    cases = []
    for i, n in enumerate(volumes_voxels):
        label = np.zeros((10, 10, 6), np.uint8)
        label.flat[:n] = 1
        case = {"image": save_nifti(root / f"img{i}.nii.gz", np.full((10, 10, 6), i, np.int16), SPACING),
                "label": save_nifti(root / f"lbl{i}.nii.gz", label, SPACING), "case_id": f"c{i:02d}"}
        if patients is not None:
            case["patient_id"] = patients[i]
        cases.append(case)
    return write_dataset_json(root / "dataset.json", "toy", cases, {0: "background", 1: "lesion"})


def test_lesion_volume_in_millilitres(tmp_path):
    label = np.zeros((10, 10, 6), np.uint8)
    label[:5, :2, 0] = 1
    assert lesion_volume_ml(save_nifti(tmp_path / "l.nii.gz", label, SPACING)) == pytest.approx(10 * 20 / 1000)


def _entries(n_patients, scans_per_patient=1):
    return [CaseEntry(f"p{p}_s{s}", None, None, f"p{p}") for p in range(n_patients) for s in range(scans_per_patient)]


def test_make_splits_groups_patients_and_stratifies_by_volume():
    cases = _entries(14, scans_per_patient=2)
    volumes = {c.case_id: float(int(c.patient_id[1:]) ** 2) for c in cases}  # patient p has volume p^2
    folds = make_splits(cases, volumes, n_folds=3, seed=4)
    assert folds == make_splits(cases, volumes, n_folds=3, seed=4)
    assert folds != make_splits(cases, volumes, n_folds=3, seed=5)
    fold_of = {case: f for f, members in enumerate(folds) for case in members}
    assert sorted(fold_of) == sorted(c.case_id for c in cases)  # every case exactly once
    for p in range(14):
        assert fold_of[f"p{p}_s0"] == fold_of[f"p{p}_s1"]  # a patient's scans never straddle folds
    patient_counts = sorted(len(f) // 2 for f in folds)
    assert patient_counts[-1] - patient_counts[0] <= 1
    by_volume = [fold_of[f"p{p}_s0"] for p in range(14)]  # patients in volume order
    for start in range(0, 12, 3):
        assert len(set(by_volume[start:start + 3])) == 3  # each volume stratum spread over all folds


def test_make_splits_errors():
    with pytest.raises(ValueError, match="cannot make 5 folds from 4 patients"):
        make_splits(_entries(4), {f"p{p}_s0": 0.0 for p in range(4)}, n_folds=5, seed=0)
    with pytest.raises(ValueError, match="n_folds must be at least 2"):
        make_splits(_entries(4), {f"p{p}_s0": 0.0 for p in range(4)}, n_folds=1, seed=0)


def test_splits_file_is_written_once_and_reread(tmp_path):
    path = _dataset(tmp_path, [0, 3, 9, 27, 50, 5, 7], patients=["a", "a", "b", "c", "d", "e", "f"])
    splits = load_or_create_splits(path, n_folds=3, seed=1)
    assert splits.path == tmp_path / "splits_3fold_seed1.json"
    doc = json.loads(splits.path.read_text(encoding="utf-8"))  # nnU-Net's splits_final.json format
    assert [f["val"] for f in doc] == [list(f) for f in splits.folds]
    ids = [f"c{i:02d}" for i in range(7)]
    assert [f["train"] for f in doc] == [[c for c in ids if c not in f["val"]] for f in doc]
    # Re-read, not recomputed: a hand edit of the file (moving patient a's scans) is what later runs see.
    vals = [["c00", "c01", "c02"], ["c03", "c04"], ["c05", "c06"]]
    doc = [{"train": [c for c in ids if c not in v], "val": v} for v in vals]
    splits.path.write_text(json.dumps(doc), encoding="utf-8")
    again = load_or_create_splits(path, n_folds=3, seed=1)
    assert again.val_ids(0) == ("c00", "c01", "c02") and again.train_ids(0) == ("c03", "c04", "c05", "c06")
    train, val = fold_cases(load_dataset_json(path), again, 2)
    assert [c.case_id for c in val] == ["c05", "c06"] and [c.case_id for c in train] == ["c00", "c01", "c02", "c03",
                                                                                          "c04"]


def test_splits_errors(tmp_path):
    path = _dataset(tmp_path, [1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"dataset\.json: cannot make 5 folds from 4 patients \(4 cases\)"):
        load_or_create_splits(path, n_folds=5)
    splits = load_or_create_splits(path, n_folds=2, seed=0)
    for fold in (2, -1):
        message = rf"fold {fold} out of range: .*splits_2fold_seed0\.json has 2 folds \(0\.\.1\)"
        with pytest.raises(ValueError, match=message):
            splits.val_ids(fold)
    with pytest.raises(ValueError, match="holds 2 folds with seed 0, asked for 2 with seed 3"):
        load_or_create_splits(path, n_folds=2, seed=3, path=splits.path)
    _dataset(tmp_path, [1, 2, 3, 4, 5])  # a case added after the split was made
    with pytest.raises(ValueError, match=r"does not match .*dataset\.json: cases added \['c04'\], removed \[\]"):
        load_or_create_splits(path, n_folds=2, seed=0)


def test_stored_splits_are_rechecked_for_patients_across_folds(tmp_path):
    """patient_ids added to dataset.json after the split: a patient in two folds is an error, not a leak."""
    path = _dataset(tmp_path, [1, 2, 3, 4, 5, 6])
    splits = load_or_create_splits(path, n_folds=3, seed=0)
    a, b = splits.val_ids(0)[0], splits.val_ids(2)[0]
    same_fold = splits.val_ids(1)
    patients = [f"p{i}" for i in range(6)]
    for case in same_fold:  # one patient within one fold is fine
        patients[int(case[1:])] = "q"
    _dataset(tmp_path, [1, 2, 3, 4, 5, 6], patients=patients)
    assert load_or_create_splits(path, n_folds=3, seed=0).folds == splits.folds
    patients[int(a[1:])] = patients[int(b[1:])] = "p9"
    _dataset(tmp_path, [1, 2, 3, 4, 5, 6], patients=patients)
    message = (rf"splits file .*splits_3fold_seed0\.json puts patient 'p9' in 2 folds: fold 0 \['{a}'\], "
               rf"fold 2 \['{b}'\]; .*delete the splits file to re-split")
    with pytest.raises(ValueError, match=message):
        load_or_create_splits(path, n_folds=3, seed=0)


def test_inner_split_is_carved_from_training_patients_only():
    """The inner validation split groups a patient's scans, never holds a validation case of the fold, and is
    the same for the same (seed, fold)."""
    cases = _entries(10, scans_per_patient=2)
    folds = make_splits(cases, {c.case_id: 1.0 for c in cases}, n_folds=3, seed=0)
    for fold in range(3):
        train, val = [c for c in cases if c.case_id not in folds[fold]], [c for c in cases if c.case_id in folds[fold]]
        rest, inner = inner_split(train, 0.25, seed=0, fold=fold)
        val_patients = {c.patient_id for c in val}
        inner_patients, rest_patients = {c.patient_id for c in inner}, {c.patient_id for c in rest}
        assert not inner_patients & val_patients and not inner_patients & rest_patients
        assert sorted(c.case_id for c in rest + inner) == sorted(c.case_id for c in train)  # nothing lost
        n_patients = len({c.patient_id for c in train})
        assert len(inner_patients) == max(1, round(0.25 * n_patients)) and len(inner) == 2 * len(inner_patients)
        assert inner_split(train, 0.25, seed=0, fold=fold) == (rest, inner)  # deterministic
    train = [c for c in cases if c.case_id not in folds[0]]
    seeds = {tuple(c.case_id for c in inner_split(train, 0.25, seed=s, fold=0)[1]) for s in range(6)}
    assert len(seeds) > 1  # the seed decides which patients
    assert inner_split(train, 0.0, seed=0, fold=0) == (train, [])


def test_inner_split_sizes_and_errors():
    two = _entries(2)
    assert [len(part) for part in inner_split(two, 0.9, seed=0, fold=0)] == [1, 1]  # one patient stays to train
    assert [len(part) for part in inner_split(_entries(7), 0.01, seed=0, fold=0)] == [6, 1]  # at least one inner
    with pytest.raises(ValueError, match="cannot carve an inner validation split from 1 training patient"):
        inner_split(_entries(1, scans_per_patient=3), 0.2, seed=0, fold=1)
    with pytest.raises(ValueError, match=r"inner_fraction must be in \[0, 1\), got 1.0"):
        inner_split(two, 1.0, seed=0, fold=0)


def test_subset_cases_are_nested_and_seeded():
    cases = _entries(20)
    sizes = [subset_cases(cases, n, seed=3, fold=1) for n in (5, 10, 20, 50)]
    assert [len(s) for s in sizes] == [5, 10, 20, 20]
    for small, large in zip(sizes, sizes[1:]):
        assert set(small) <= set(large)  # a learning curve only adds cases
    assert sizes[0] == subset_cases(cases, 5, seed=3, fold=1)
    assert sizes[0] != subset_cases(cases, 5, seed=3, fold=2)
    assert sizes[1] == [c for c in cases if c in sizes[1]]  # the input order is kept
    assert subset_cases(cases, None, seed=0, fold=0) == cases
    with pytest.raises(ValueError, match="max_train_cases must be at least 1"):
        subset_cases(cases, 0, seed=0, fold=0)
