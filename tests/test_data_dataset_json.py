"""dataset.json: loading, validation errors naming the entry, writing with relative paths."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from segadapt.data import load_dataset_json, load_test_cases, write_dataset_json
from segadapt.data.files import save_nifti


def _case_files(root: Path, name: str) -> dict[str, object]:
    value = zlib.crc32(name.encode()) % 30000  # one image per case: identical images are refused as duplicates
    image = save_nifti(root / "images" / f"{name}.nii.gz", np.full((4, 4, 4), value, np.int16), np.eye(4))
    label = save_nifti(root / "labels" / f"{name}.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    return {"image": image, "label": label, "case_id": name}


def _write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_round_trip_relative_paths_and_patient_ids(tmp_path):
    cases = [_case_files(tmp_path / "raw", f"c{i}") for i in range(3)]
    cases[1]["patient_id"] = "p0"
    cases[2]["patient_id"] = "p0"
    path = write_dataset_json(tmp_path / "meta" / "dataset.json", "toy", cases, {0: "background", 1: "blood"})
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["training"][0]["image"] == "../raw/images/c0.nii.gz"  # relative to the json's folder
    assert raw["numTraining"] == 3
    desc = load_dataset_json(path)
    assert desc.name == "toy" and desc.labels == {0: "background", 1: "blood"} and desc.channels == 1
    assert [c.case_id for c in desc.cases] == ["c0", "c1", "c2"]
    assert [c.patient_id for c in desc.cases] == ["c0", "p0", "p0"]
    assert desc.cases[0].image == (tmp_path / "raw/images/c0.nii.gz").resolve()
    assert desc.case("c2").as_dict()["label"] == str((tmp_path / "raw/labels/c2.nii.gz").resolve())
    assert desc.label_values == (0, 1)


def test_decathlon_file_without_case_id_uses_image_name(tmp_path):
    _case_files(tmp_path, "spleen_2")
    path = _write(tmp_path / "dataset.json", {
        "name": "Task09", "labels": {"0": "background", "1": "spleen"}, "modality": {"0": "CT"},
        "training": [{"image": "./images/spleen_2.nii.gz", "label": "./labels/spleen_2.nii.gz"}]})
    assert load_dataset_json(path).cases[0].case_id == "spleen_2"


@pytest.mark.parametrize(
    ("training", "error", "message"),
    [
        ([], ValueError, "empty dataset"),
        ([{"image": "images/a.nii.gz", "case_id": "a"}], ValueError, "entry 0 has no 'label'"),
        ([{"image": "images/a.nii.gz", "label": "labels/a.nii.gz", "case_id": "a"},
          {"image": "images/b.nii.gz", "label": "labels/b.nii.gz", "case_id": "a"}],
         ValueError, "duplicate case_id 'a' in training entries 0 and 1"),
        ([{"image": "images/a.nii.gz", "label": "labels/missing.nii.gz", "case_id": "a"}],
         FileNotFoundError, "case 'a' (entry 0): label not found: "),
    ],
)
def test_bad_entries_name_the_entry(tmp_path, training, error, message):
    for name in ("a", "b"):
        _case_files(tmp_path, name)
    path = _write(tmp_path / "dataset.json", {"labels": {"0": "bg"}, "training": training})
    with pytest.raises(error) as info:
        load_dataset_json(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_bad_files_and_fields(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset description not found"):
        load_dataset_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dataset_json(bad)
    with pytest.raises(ValueError, match="'labels' keys must be integers"):
        load_dataset_json(_write(tmp_path / "d1.json", {"labels": {"bg": 0}, "training": []}))
    with pytest.raises(ValueError, match="'labels' must be a non-empty mapping"):
        load_dataset_json(_write(tmp_path / "d2.json", {"training": []}))
    with pytest.raises(ValueError, match="'training' must be a list"):
        load_dataset_json(_write(tmp_path / "d3.json", {"labels": {"0": "bg"}}))


@pytest.mark.parametrize("how", ["same path", "symlink", "byte copy"])
def test_duplicate_images_are_refused_naming_both_cases(tmp_path, how):
    """Two case ids reading one image (the same path, a symlink to it, or a byte-identical copy) would land in
    two folds of the volume-stratified split (trained on in one, validated on in the other): refused."""
    for name in ("a", "b"):
        _case_files(tmp_path, name)
    second = {"same path": "images/a.nii.gz", "symlink": "images/link.nii.gz", "byte copy": "images/copy.nii.gz"}[how]
    if how == "symlink":
        (tmp_path / second).symlink_to(tmp_path / "images/a.nii.gz")
    elif how == "byte copy":
        (tmp_path / second).write_bytes((tmp_path / "images/a.nii.gz").read_bytes())
    path = _write(tmp_path / "dataset.json", {"labels": {"0": "bg", "1": "x"}, "training": [
        {"image": "images/a.nii.gz", "label": "labels/a.nii.gz", "case_id": "first"},
        {"image": "images/b.nii.gz", "label": "labels/b.nii.gz", "case_id": "other"},
        {"image": second, "label": "labels/b.nii.gz", "case_id": "again"}]})
    with pytest.raises(ValueError) as info:
        load_dataset_json(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "case 'again' and case 'first'" in message
    assert ("byte-identical copy" in message) == (how == "byte copy")


def test_test_case_copying_a_training_image_is_refused(tmp_path):
    """The test split shares the check: a test image that is a copy of a training image is refused."""
    for name in ("a", "b", "t"):
        _case_files(tmp_path, name)
    (tmp_path / "images/t.nii.gz").write_bytes((tmp_path / "images/b.nii.gz").read_bytes())
    path = _write(tmp_path / "dataset.json", {"labels": {"0": "bg"}, "training": [
        {"image": "images/a.nii.gz", "label": "labels/a.nii.gz", "case_id": "a"},
        {"image": "images/b.nii.gz", "label": "labels/b.nii.gz", "case_id": "b"}],
        "test": [{"image": "images/t.nii.gz", "label": "labels/t.nii.gz", "case_id": "t"}]})
    with pytest.raises(ValueError, match=r"test case 't' and case 'b' \(a training case\) are one image"):
        load_test_cases(path)
