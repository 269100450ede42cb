"""dataset.json: loading, validation errors naming the entry, writing with relative paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segadapt.data import load_dataset_json, write_dataset_json
from segadapt.data.files import save_nifti


def _case_files(root: Path, name: str) -> dict[str, object]:
    image = save_nifti(root / "images" / f"{name}.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))
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
