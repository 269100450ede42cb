"""Inference: masks on the input's grid (NIfTI RAS / non-RAS, real CT, DICOM), fold ensemble, merged export,
folders and the CSV, bad inputs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from segadapt.adapters import AdapterConfig, adapter_names, inject, save_adapter
from segadapt.data import inference_transforms, load_dataset_json, make_loader
from segadapt.data.files import save_nifti
from segadapt.export.cli import main as export_main
from segadapt.export.merged import export_merged, load_merged
from segadapt import cli
from segadapt.inference import Predictor, predict_to_folder
from segadapt.inference.cli import main
from segadapt.inference.inputs import find_inputs
from segadapt.inference.writers import CSV_FILE
from segadapt.models import MultiViewUNet, preset_targets
from segadapt.runs import read_run_config
from segadapt.training import load_run


@pytest.fixture(scope="module")
def ensemble(demo_runs) -> Predictor:
    return Predictor.from_runs(demo_runs, device="cpu")


@pytest.fixture(scope="module")
def scans(ensemble) -> list:
    """The demo target phantom's images (RAS, anisotropic 4.6 x 4.6 x 6.7 mm)."""
    return [case.image for case in load_dataset_json(ensemble.config["datamodule"]["dataset_json"]).cases]


@pytest.fixture(scope="module")
def resampling(demo_runs) -> Predictor:
    """One fold's adapter, with the run's preprocessing changed to resample to 4 mm (inverted on the way back)."""
    config = read_run_config(demo_runs[0])
    config["datamodule"]["preprocess"]["target_spacing"] = [4.0, 4.0, 4.0]
    return Predictor(config, [demo_runs[0] / "adapter.safetensors"], device="cpu")


def preprocessed(predictor: Predictor, path) -> torch.Tensor:
    return inference_transforms(predictor.preprocess, predictor.channels)({"image": str(path)})["image"][None].as_tensor()


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_nifti_outputs_match_the_input_grid_ras_and_non_ras(ensemble, scans, tmp_path):
    source = nib.load(scans[0])
    ras, affine = np.asarray(source.dataobj), source.affine
    assert len(set(np.round(np.linalg.norm(affine[:3, :3], axis=0), 3))) > 1  # anisotropic
    # The same head stored another way: array axes (i, j, k) -> old (X-1-i, k, j), i.e. L, S, A.
    other = np.ascontiguousarray(ras[::-1].transpose(0, 2, 1))
    reindex = np.array([[-1, 0, 0, ras.shape[0] - 1], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    inputs = tmp_path / "inputs"
    save_nifti(inputs / "ras.nii.gz", ras, affine)
    save_nifti(inputs / "lsa.nii.gz", other, affine @ reindex)
    assert nib.aff2axcodes(affine @ reindex) == ("L", "S", "A")

    rows = predict_to_folder(ensemble, inputs, tmp_path / "out", probabilities=True, progress=False)
    assert [r["input"] for r in rows] == [str(inputs / "lsa.nii.gz"), str(inputs / "ras.nii.gz")]
    outputs = {}
    for name in ("ras", "lsa"):
        given = nib.load(inputs / f"{name}.nii.gz")
        mask, prob = nib.load(tmp_path / "out" / f"{name}_mask.nii.gz"), nib.load(tmp_path / "out" / f"{name}_probabilities.nii.gz")
        for image in (mask, prob):
            assert image.shape == given.shape
            np.testing.assert_allclose(image.affine, given.affine, atol=1e-6)
        assert mask.get_data_dtype() == np.uint8
        outputs[name] = (np.asarray(mask.dataobj), np.asarray(prob.dataobj))
        np.testing.assert_array_equal(outputs[name][0], outputs[name][1] > ensemble.threshold)
    # World-consistent: the non-RAS prediction is the RAS one stored the other way.
    np.testing.assert_allclose(outputs["lsa"][1], outputs["ras"][1][::-1].transpose(0, 2, 1), atol=1e-5)
    assert 0 < outputs["ras"][0].sum() < outputs["ras"][0].size  # a non-trivial mask, so the check has teeth
    # CSV: lesion volume = voxels x |det A| / 1000, read back from the written masks.
    for row in read_csv(tmp_path / "out" / CSV_FILE):
        written = nib.load(row["mask"])
        expected = np.count_nonzero(np.asarray(written.dataobj)) * abs(np.linalg.det(written.affine[:3, :3])) / 1000
        assert float(row["lesion_volume_ml"]) == pytest.approx(expected, rel=1e-3, abs=1e-3)
        assert int(row["members"]) == 3


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct_dicom"])
def test_real_ct_and_dicom_series_come_back_on_their_grid(resampling, shared_data, name, tmp_path):
    scan = shared_data / "ct_abdomen_totalseg" / name
    if not scan.exists():
        pytest.skip(f"{scan} not found")
    assert find_inputs(scan) == [scan]
    loaded = make_loader("image")({"image": str(scan)})["image"]  # RAS affine as the readers give it
    rows = predict_to_folder(resampling, scan, tmp_path, progress=False)
    mask = nib.load(rows[0]["mask"])
    assert mask.shape == tuple(loaded.shape[1:])
    np.testing.assert_allclose(mask.affine, loaded.affine.numpy(), atol=1e-4)
    if name.endswith(".nii.gz"):
        np.testing.assert_array_equal(mask.affine, nib.load(scan).affine)
    voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000
    assert float(rows[0]["lesion_volume_ml"]) == pytest.approx(np.count_nonzero(np.asarray(mask.dataobj)) * voxel_ml, abs=1e-3)


def test_ensemble_is_the_mean_of_the_single_adapter_probabilities(ensemble, demo_runs, scans):
    singles = [Predictor.from_runs([run], device="cpu") for run in demo_runs]
    members = [single.predict(scans[1]).probabilities for single in singles]
    mean = ensemble.predict(scans[1]).probabilities
    np.testing.assert_allclose(mean, np.mean(members, axis=0), atol=1e-6)
    assert max(np.abs(m - mean).max() for m in members) > 1e-3  # the folds really differ
    # Folding the adapter into the weights (what the predictor does) = the adapted network as trained.
    module, _ = load_run(demo_runs[0])
    image = preprocessed(ensemble, scans[1])
    torch.testing.assert_close(singles[0].predict_probabilities(image), module.predict_probabilities(image), atol=1e-5, rtol=0)


def test_merged_export_reproduces_the_adapted_predictions(demo_runs, scans, tmp_path):
    single = Predictor.from_runs(demo_runs[:1], device="cpu")
    image = preprocessed(single, scans[0])
    adapted = single.predict_probabilities(image)
    path = export_merged(single.module.net, tmp_path / "merged.safetensors", architecture=single.config["module"])
    assert adapter_names(single.module.net) == ["m0"]  # the predictor's network is untouched
    torch.testing.assert_close(single.predict_probabilities(image), adapted, atol=0, rtol=0)
    # Bare architecture, plain load_state_dict: no adapter code involved.
    plain = MultiViewUNet(**single.config["module"]["model_kwargs"])
    plain.load_state_dict(load_file(path))
    with torch.no_grad():
        merged = plain.eval().predict_volume(image, slice_batch_size=64)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(load_merged(path).predict_volume(image), merged, atol=0, rtol=0)
    export_main([str(demo_runs[0]), "--merged", str(tmp_path / "cli.safetensors")])  # python -m segadapt.export
    from_cli = load_file(tmp_path / "cli.safetensors")
    assert all(torch.equal(from_cli[k], v) for k, v in load_file(path).items())
    base = Predictor(single.config, device="cpu").predict_probabilities(image)
    assert (merged - base).abs().max() > 1e-3  # the adapter changed the function


def test_a_folder_with_a_bad_scan_stops_there_and_keeps_only_complete_outputs(ensemble, scans, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(scans[0], inputs / "a_good.nii.gz")
    (inputs / "b_broken.nii.gz").write_bytes(b"not a NIfTI file")
    with pytest.raises(ValueError, match="b_broken.nii.gz"):
        predict_to_folder(ensemble, inputs, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_good_mask.nii.gz", CSV_FILE]
    assert [r["input"] for r in read_csv(tmp_path / "out" / CSV_FILE)] == [str(inputs / "a_good.nii.gz")]


def test_inputs_are_found_by_type(tmp_path):
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.nrrd", "a.nii.gz", "c.MHA", "d.PNG", "e.tif", "notes.txt", ".hidden.nii.gz"):
        (folder / name).write_bytes(b"x")
    assert [p.name for p in find_inputs(folder)] == ["a.nii.gz", "b.nrrd", "c.MHA", "d.PNG", "e.tif"]
    assert find_inputs(folder / "b.nrrd") == [folder / "b.nrrd"]
    with pytest.raises(ValueError, match="notes.txt is not a supported scan"):
        find_inputs(folder / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no NIfTI, NRRD, MHA/MHD, PNG, JPEG, BMP or TIFF file or DICOM series folder in"):
        find_inputs(folder / "sub")


def test_an_ensemble_refuses_runs_with_another_preprocessing_or_an_unfinished_run(demo_runs, tmp_path):
    other = tmp_path / "fold9"
    shutil.copytree(demo_runs[1], other)
    config = (other / "config.yaml").read_text(encoding="utf-8")
    (other / "config.yaml").write_text(config.replace("crop_foreground: true", "crop_foreground: false"), encoding="utf-8")
    with pytest.raises(ValueError, match="differ in datamodule.preprocess"):
        Predictor.from_runs([demo_runs[0], other])
    (other / "config.yaml").write_text(config, encoding="utf-8")
    (other / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="fold9 has no adapter.safetensors"):
        Predictor.from_runs([demo_runs[0], other])


@pytest.fixture()
def other_base_adapter(tmp_path):
    """An adapter file made on a smaller multi-view UNet (another base)."""
    net = MultiViewUNet(in_channels=3, channels=(4, 8), strides=(2,), num_res_units=0)
    inject(net, AdapterConfig(method="cp_lora", rank=2, targets=preset_targets(net, "all_conv")))
    return save_adapter(net, tmp_path / "other" / "adapter.safetensors")


@pytest.mark.parametrize("case", ["unreadable", "wrong_type", "other_base", "missing_run_config", "missing_input"])
def test_bad_inputs_give_clear_errors_and_write_nothing(case, demo_runs, scans, other_base_adapter, tmp_path, capsys):
    out = tmp_path / "out"
    broken = tmp_path / "in" / "broken.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"\x1f\x8b not really gzip")
    (tmp_path / "no_run").mkdir()
    argv, expected = {
        "unreadable": (["--run", str(demo_runs[0]), "--input", str(broken)], f"cannot use input {broken}"),
        "wrong_type": (["--run", str(demo_runs[0]), "--input", str(demo_runs[0] / "config.yaml")], "is not a supported scan"),
        "other_base": (["--adapters", str(other_base_adapter), "--run-config", str(demo_runs[0]), "--input", str(scans[0])],
                       "was made for another base model: module"),
        "missing_run_config": (["--run", str(tmp_path / "no_run"), "--input", str(scans[0])], "no config.yaml"),
        "missing_input": (["--run", str(demo_runs[0]), "--input", str(tmp_path / "nothing.nii.gz")], "input not found"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_segadapt_predict_writes_masks_probabilities_and_volumes(demo_runs, scans, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for scan in scans[:2]:
        shutil.copy(scan, inputs)
    cli.main(["predict", "--run", *map(str, demo_runs), "--input", str(inputs), "--output", str(tmp_path / "out"),
              "--probabilities", "--threshold", "0.3", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "3 adapter(s)" in printed and "2 scan(s)" in printed
    rows = read_csv(tmp_path / "out" / CSV_FILE)
    assert [Path(r["input"]).name for r in rows] == [Path(s).name for s in scans[:2]]
    for row in rows:
        mask, prob = np.asarray(nib.load(row["mask"]).dataobj), np.asarray(nib.load(row["probabilities"]).dataobj)
        np.testing.assert_array_equal(mask, prob > 0.3)
        assert f"lesion volume {row['lesion_volume_ml']} mL" in printed
