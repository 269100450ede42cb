"""Predict checks inputs against the run's training data (fingerprint.json): modality, spacing and intensity
warnings, resampling to the training spacing and back onto the input's grid."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
from run_fixtures import fit_scratch_unet
from scipy.ndimage import map_coordinates

from segadapt.data import load_dataset_json
from segadapt.data.files import save_nifti
from segadapt.plan.fingerprint import fingerprint
from segadapt.inference import Predictor, predict_to_folder
from segadapt.inference.domain import TrainingDomain
from segadapt.inference.predictor import run_domain
from segadapt.runs import FINGERPRINT_FILE


def fake_fingerprint(modality: str, spacings, ranges) -> dict:
    """A fingerprint as segadapt.plan.fingerprint.fingerprint writes it, with the fields the domain reads."""
    cases = [{"spacing": list(s), "image_intensity": [{"percentile_00_5": lo, "percentile_99_5": hi}]}
             for s, (lo, hi) in zip(spacings, ranges)]
    return {"version": 2, "dataset": "d", "modality": {"0": modality}, "labels": {"0": "background", "1": "lesion"},
            "cases": cases}


MRI = TrainingDomain.from_fingerprint(fake_fingerprint("MRI", [(1, 1, 1), (1, 1, 1.2), (1, 1, 1.1)],
                                                       [(0, 500), (2, 700), (1, 100000)]))
CT = TrainingDomain.from_fingerprint(fake_fingerprint("CT", [(3.45, 3.45, 5)] * 2, [(-1024, 1500), (-1000, 1400)]))


def test_domain_summarises_the_fingerprint():
    assert MRI.spacing_median == [1, 1, 1.1] and MRI.spacing_min == [1, 1, 1] and MRI.spacing_max == [1, 1, 1.2]
    # 1st / 99th percentile over the cases, linear between sorted cases: 0 + 0.02 x 1, 700 + 0.98 x (100000 - 700)
    assert MRI.intensity_range == [[pytest.approx(0.02), pytest.approx(98014)]]
    assert MRI.intensity_slack == [pytest.approx(0.1 * (700 - 1))]  # a typical case's range, not the outlier's
    assert MRI.foreground_labels == {1: "lesion"}


def test_the_training_range_is_robust_to_one_case_at_another_scale():
    """101 MRI cases in [0, 800] and one at 4.783e5 (as in MSD hippocampus): the range ends at the 99th percentile
    of the cases' 99.5 percentiles (about 800), not at the outlier."""
    ranges = [(i % 7, 700 + i) for i in range(101)] + [(6, 478300)]
    domain = TrainingDomain.from_fingerprint(fake_fingerprint("MRI", [(1, 1, 1)] * 102, ranges))
    # sorted 99.5 percentiles 700 .. 800, 478300: position 0.99 x 101 = 99.99 -> 799 + 0.99 x (800 - 799)
    assert domain.intensity_range == [[0, pytest.approx(799.99)]]
    image = np.random.default_rng(0).uniform(0, 4000, (1, 20, 20, 10))  # 2x the upper end is allowed (arbitrary units)
    (message,) = [m for m in domain.check(image * 100, [1, 1, 1]) if m.startswith("intensities")]
    assert "training [0, 800" in message and "4.783e+05" not in message
    assert not [m for m in domain.check(image / 4000 * 1500, [1, 1, 1]) if m.startswith("intensities")]


def test_checks_on_modality_spacing_and_intensities():
    rng = np.random.default_rng(0)
    mri = rng.uniform(0, 600, (1, 20, 20, 10))
    ct = np.concatenate([np.full(400, -1000.0), rng.uniform(-100, 1500, 3600)]).reshape(1, 20, 20, 10)
    assert MRI.check(mri, [1, 1, 1]) == []
    assert CT.check(ct, [3.45, 3.45, 5]) == []
    (message,) = MRI.check(ct + 1000, [1, 1, 1], dicom_modality="CT")  # the DICOM tag decides, not the values
    assert message.startswith("modality mismatch: the input's DICOM Modality is CT")
    assert MRI.check(mri, [1, 1, 1], dicom_modality="MR") == []  # DICOM's MR is dataset.json's MRI
    found = MRI.check(ct, [1, 1, 1])  # a CT in HU into an MRI model: guessed from the air, and below the range
    assert len(found) == 2 and "a CT in HU?" in found[0] and found[1].startswith("intensities outside the training range")
    (message,) = CT.check(mri, [3.45, 3.45, 5])  # no air: not a CT in HU
    assert "not a CT in HU?" in message
    # spacing: more than 2x off the median on some axis (here 3 mm vs 5 mm is not; 2 mm vs 5 mm is)
    assert CT.check(ct, [3, 3, 3]) == []
    (message,) = CT.check(ct, [3, 3, 2])
    assert "more than 2x off the training spacing 3.45x3.45x5 mm on axis 2" in message
    (message,) = CT.check(ct, [7, 3.45, 5])
    assert "on axis 0" in message
    # intensities: beyond the range + slack (0.1 x 2424 HU) on either side
    assert CT.check(np.where(ct > 1000, 1600.0, ct), [3.45, 3.45, 5]) == []
    (message,) = CT.check(np.where(ct > 1000, 2000.0, ct), [3.45, 3.45, 5])
    assert "channel 0 0.5-99.5 percentiles [-1000, 2000], training [-1024, 1499]" in message  # 1400 + 0.99 x 100


def test_resampling_only_outside_the_training_spacings():
    assert MRI.resample_spacing([1, 1, 1.15]) is None  # inside [min, max] per axis: its own grid, as in training
    assert MRI.resample_spacing([1, 1, 1.5]) == [1, 1, 1.1]
    assert CT.resample_spacing([3, 3, 3]) == [3.45, 3.45, 5]


def test_fit_run_stores_the_datasets_fingerprint(demo_runs):
    stored = json.loads((demo_runs[0] / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    dataset = read_dataset(demo_runs[0])
    assert stored == json.loads(json.dumps(fingerprint(dataset)))  # the run's own (target) dataset
    assert stored["modality"] == {"0": "CT"} and stored["n_cases"] == 3


def read_dataset(run):
    from segadapt.runs import read_run_config

    return read_run_config(run)["datamodule"]["dataset_json"]


def test_a_finer_scan_is_resampled_to_the_training_spacing_and_back(demo_runs, tmp_path, caplog):
    predictor = Predictor.from_runs(demo_runs[:1], device="cpu")
    case = load_dataset_json(read_dataset(demo_runs[0])).cases[0]
    image = nib.load(case.image)
    own = predictor.predict(case.image)
    assert own.warnings == [] and own.resampled_to is None  # the training data's own kind of scan
    # The same head on a 3x finer grid: fine voxel 3i is voxel i (the same centre), linear in between.
    coarse = np.asarray(image.dataobj, dtype=np.float32)
    grid = np.meshgrid(*[np.arange(3 * n - 2) / 3 for n in coarse.shape], indexing="ij")
    fine = map_coordinates(coarse, grid, order=1)
    np.testing.assert_array_equal(fine[::3, ::3, ::3], coarse)
    affine = image.affine @ np.diag([1 / 3, 1 / 3, 1 / 3, 1])
    path = save_nifti(tmp_path / "in" / "fine.nii.gz", fine, affine)
    with caplog.at_level(logging.WARNING, logger="segadapt.inference.predictor"):
        (row,) = predict_to_folder(predictor, path, tmp_path / "out", progress=False)
    spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "segadapt.inference.predictor"]
    assert message.startswith(f"{path}: spacing") and "more than 2x off" in message
    assert row["warnings"] == message.split(": ", 1)[1]
    mask = nib.load(row["mask"])
    assert mask.shape == fine.shape and np.allclose(mask.affine, affine)
    # Resampled to the training spacing the network sees the original scan, so on the shared voxel centres the
    # mask is the original's (without resampling it would see a 3x larger head)
    predicted = np.asarray(mask.dataobj)
    assert own.mask.any() and (predicted[::3, ::3, ::3] == own.mask).mean() > 0.999
    assert np.allclose(predictor.predict(path).resampled_to, spacing)


def test_a_run_without_fingerprint_warns_once_and_checks_nothing(demo_runs, tmp_path, caplog):
    run = tmp_path / "old_run"
    run.mkdir()
    for f in demo_runs[0].iterdir():
        if f.is_file() and f.name != FINGERPRINT_FILE:
            (run / f.name).write_bytes(f.read_bytes())
    with caplog.at_level(logging.WARNING, logger="segadapt.inference.predictor"):
        assert run_domain(run) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{run} has no fingerprint.json (a run from before segadapt stored it): inputs are not checked against "
        "the training data's modality, spacing and intensities"]


def test_2d_images_report_their_lesion_area_in_mm2(tmp_path, capsys):
    """A tiny real 2D run (MONAI UNet, spatial_dims 2): predict gives mm^2 = pixels x |det A| (0.5 x 0.25 mm)."""
    from segadapt.data import write_dataset_json
    from segadapt.inference.cli import main

    affine = np.diag([0.5, 0.25, 1.0, 1.0])
    cases = []
    for i in range(2):
        image = np.zeros((32, 32), np.float32)
        image[4 + i: 20, 6:26] = 100.0
        image[8:14, 10:18] = 300.0
        cases.append({"case_id": f"c{i}", "image": save_nifti(tmp_path / f"i{i}.nii.gz", image, affine),
                      "label": save_nifti(tmp_path / f"l{i}.nii.gz", (image > 200).astype(np.uint8), affine)})
    dataset = write_dataset_json(tmp_path / "dataset.json", "flat", cases, {0: "background", 1: "spot"}, {0: "MRI"})
    run = tmp_path / "run"
    preprocess = {"intensity": "mri", "spatial_dims": 2, "orientation": "RA", "patch_size": [32, 32],
                  "samples_per_volume": 1, "augment": False}
    fit_scratch_unet(run, dataset, "flat", {"in_channels": 1, "out_channels": 1, "channels": [4, 8], "strides": [2],
                                            "spatial_dims": 2}, preprocess, [32, 32], max_steps=30, lr=0.01)
    rows = main(["--run", str(run), "--input", str(cases[0]["image"]), "--output", str(tmp_path / "out")])
    (row,) = rows
    mask = nib.load(row["mask"])
    pixels = int(np.count_nonzero(np.asarray(mask.dataobj)))
    assert mask.shape == (32, 32) and 0 < pixels < 32 * 32
    assert row["lesion_voxels"] == pixels and row["lesion_volume_ml"] == "" and row["voxel_ml"] == ""
    assert float(row["lesion_area_mm2"]) == pytest.approx(pixels * 0.5 * 0.25)
    printed = capsys.readouterr().out
    assert f"lesion area {row['lesion_area_mm2']} mm^2 ({pixels} voxels" in printed
    assert f"1 scan(s), total lesion area {pixels * 0.125:.2f} mm^2" in printed


def test_a_ct_series_without_rescale_tags_is_warned_about(demo_runs, shared_data, tmp_path):
    """The CT DICOM series written as a scanner storing unsigned values (HU + 1024) without RescaleSlope /
    RescaleIntercept: its Modality tag says CT, but the values hold no air in HU, and predict says so."""
    import hashlib

    import pydicom

    source = shared_data / "ct_abdomen_totalseg" / "ct_dicom"
    if not source.is_dir():
        pytest.skip(f"{source} not found")
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in source.iterdir()}
    series = tmp_path / "ct_unsigned"
    series.mkdir()
    for file in sorted(source.iterdir()):
        ds = pydicom.dcmread(file)
        ds.decompress()
        stored = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept) + 1024  # HU + 1024
        assert stored.min() >= 0
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 16, 15
        for tag in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if tag in ds:
                delattr(ds, tag)
        ds.save_as(series / file.name)
    predictor = Predictor.from_runs(demo_runs, device="cpu")
    (row,) = predict_to_folder(predictor, series, tmp_path / "out", progress=False)
    assert "not a CT in HU? (DICOM Modality CT: stored values without RescaleSlope/RescaleIntercept?)" in row["warnings"]
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in source.iterdir()} == before


def test_an_abdominal_ct_into_the_head_ct_model_is_warned_about(demo_runs, shared_data, tmp_path):
    """Same modality, intensities in range: the intensity histogram tells the abdomen from the head."""
    scan = shared_data / "ct_abdomen_totalseg" / "ct.nii.gz"
    if not scan.is_file():
        pytest.skip(f"{scan} not found")
    (row,) = predict_to_folder(Predictor.from_runs(demo_runs, device="cpu"), scan, tmp_path / "out", progress=False)
    (message,) = [m for m in row["warnings"].split("; ") if m.startswith("intensity histogram")]
    assert "another body region or kind of image than phantom_sah?" in message
    assert "modality" not in row["warnings"] and "intensities outside" not in row["warnings"]
