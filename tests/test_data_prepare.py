"""datasets/prepare_*.py on the real sample data (DRIVE, the abdominal CT) laid out like each public set."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segadapt.data import PreprocessConfig, load_dataset_json, remap_label_file, val_transforms
from segadapt.data.files import save_nifti

SCRIPTS = Path(__file__).resolve().parents[1] / "datasets"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_drive(shared_data, tmp_path):
    path = _script("prepare_drive")(["--root", str(shared_data / "drive"), "--out", str(tmp_path),
                                     "--sets", "training"])
    description = load_dataset_json(path)
    assert len(description.cases) == 20 and description.channels == 3 and description.labels[1] == "vessel"
    cfg = PreprocessConfig(intensity="rgb", spatial_dims=2, orientation="RA", crop_foreground=False,
                           patch_size=[64, 64])
    case = val_transforms(cfg, description.label_values, description.channels)(description.cases[0].as_dict())
    assert case["image"].shape == (3, 565, 584) and case["label"].shape == (1, 565, 584)
    assert 0.0 <= float(case["image"].min()) and float(case["image"].max()) <= 1.0
    assert set(np.unique(case["label"].numpy())) == {0.0, 1.0} and 0.05 < float(case["label"].mean()) < 0.2


@pytest.fixture()
def abdomen(shared_data):
    folder = shared_data / "ct_abdomen_totalseg"
    return folder / "ct.nii.gz", folder / "seg_total.nii.gz"


def _check_ct_case(description, expected_voxels):
    cfg = PreprocessConfig(windows=[[40, 400]])
    case = val_transforms(cfg, description.label_values)(description.cases[0].as_dict())
    assert case["image"].shape[0] == 1 and case["image"].shape == case["label"].shape
    assert int(case["label"].sum()) == expected_voxels  # orientation/crop keep every labelled voxel


def test_decathlon_task(abdomen, tmp_path):
    ct, seg = abdomen
    task = tmp_path / "Task09_Spleen"
    (task / "imagesTr").mkdir(parents=True)
    (task / "imagesTr" / "spleen_1.nii.gz").symlink_to(ct)
    remap_label_file(seg, task / "labelsTr" / "spleen_1.nii.gz", {1: 1})  # TotalSegmentator 1 = spleen
    (task / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": "./imagesTr/spleen_1.nii.gz", "label": "./labelsTr/spleen_1.nii.gz"}],
        "test": []}), encoding="utf-8")
    path = _script("prepare_decathlon")(["--root", str(task), "--out", str(tmp_path / "out")])
    description = load_dataset_json(path)
    assert [c.case_id for c in description.cases] == ["spleen_1"] and description.labels == {0: "background",
                                                                                             1: "spleen"}
    assert description.cases[0].image == (task / "imagesTr" / "spleen_1.nii.gz").resolve()
    spleen = int((np.asarray(nib.load(seg).dataobj) == 1).sum())
    assert spleen > 100
    _check_ct_case(description, spleen)


def test_bhsd_subtype_selection(abdomen, tmp_path):
    ct, seg = abdomen
    (tmp_path / "BHSD" / "images").mkdir(parents=True)
    (tmp_path / "BHSD" / "images" / "ID_0001.nii.gz").symlink_to(ct)
    # Organ labels standing in for subtypes: spleen -> 4 (subarachnoid), liver -> 2 (intraparenchymal).
    remap_label_file(seg, tmp_path / "BHSD" / "ground truths" / "ID_0001.nii.gz", {1: 4, 5: 2})
    main = _script("prepare_bhsd")
    all_path = main(["--root", str(tmp_path / "BHSD"), "--out", str(tmp_path / "all")])
    assert load_dataset_json(all_path).labels[4] == "subarachnoid"
    path = main(["--root", str(tmp_path / "BHSD"), "--out", str(tmp_path / "sah"), "--classes", "subarachnoid"])
    description = load_dataset_json(path)
    assert description.name == "bhsd_subarachnoid" and description.labels == {0: "background", 1: "subarachnoid"}
    assert description.cases[0].label == (tmp_path / "sah" / "labelsTr" / "bhsd_ID_0001.nii.gz").resolve()
    _check_ct_case(description, int((np.asarray(nib.load(seg).dataobj) == 1).sum()))


def test_ct_ich_layout(abdomen, tmp_path):
    ct, seg = abdomen
    image = nib.load(ct)
    save_nifti(tmp_path / "ct-ich" / "ct_scans" / "049.nii", np.asarray(image.dataobj), image.affine)
    mask = (np.asarray(nib.load(seg).dataobj) == 5).astype(np.uint8) * 255  # a copy with 0/255 masks
    save_nifti(tmp_path / "ct-ich" / "masks" / "049.nii", mask, image.affine)
    path = _script("prepare_ct_ich")(["--root", str(tmp_path / "ct-ich"), "--out", str(tmp_path / "out"),
                                      "--binarize"])
    description = load_dataset_json(path)
    assert [c.case_id for c in description.cases] == ["ich_049"]
    _check_ct_case(description, int((mask > 0).sum()))
    with pytest.raises(ValueError, match=r"no label in .*masks for \['050\.nii'\]"):
        save_nifti(tmp_path / "ct-ich" / "ct_scans" / "050.nii", np.zeros((2, 2, 2), np.int16), np.eye(4))
        _script("prepare_ct_ich")(["--root", str(tmp_path / "ct-ich"), "--out", str(tmp_path / "out2")])
