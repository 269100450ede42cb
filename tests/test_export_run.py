"""Exports of a real (tiny) run: a default-preset conv_lora DynUNet adapted on phantoms for two steps.

PEFT: the exported adapter on the exported base (the ConvTranspose layers merged into it) loads with
``peft.PeftModel.from_pretrained`` and computes what segadapt computes. MONAI bundle: run by
``python -m monai.bundle run`` on phantom scans, it writes the masks ``segadapt predict`` writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as monai_run
from torch import nn

from segadapt.adapters import adapted_layers, set_active_adapter
from segadapt.adapters.peft import PEFT_CONFIG_FILE
from segadapt.data import PreprocessConfig, make_phantom_dataset
from segadapt.io import save_safetensors
from segadapt.export.bundle import BUNDLE_FILES, INFERENCE_CONFIG, METADATA, MODEL_FILE, export_bundle, network_def, preprocessing
from segadapt.export.cli import main
from segadapt.export.common import load_run_for_export
from segadapt.export.merged import PEFT_BASE_FILE, export_peft, load_merged
from segadapt.inference import Predictor
from segadapt.models import build_model
from segadapt.training import RunConfig, fit_run

KWARGS = {"in_channels": 3, "out_channels": 1, "kernel_size": [3, 3, 3], "strides": [1, 2, 2], "filters": [4, 8, 16]}
TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
           "num_sanity_val_steps": 0, "log_every_n_steps": 1, "check_val_every_n_epoch": 10_000, "max_steps": 2}


def _fit(root: Path, preprocess: dict, name: str, model: str = "dynunet", model_kwargs: dict = KWARGS,
         adapter: object = None, fold: int = 0) -> Path:
    dataset = make_phantom_dataset(root / "data", "sah", 4, 0, (24, 24, 16), [220 / 24, 220 / 24, 10.0])
    kwargs = {**model_kwargs, "in_channels": PreprocessConfig(**preprocess).in_channels}
    torch.manual_seed(0)
    base = build_model(model, **kwargs)
    base_file = save_safetensors(root / "base.safetensors", {k: v.clone() for k, v in base.state_dict().items()})
    module = {"model": model, "model_kwargs": kwargs, "adapter": adapter or {"method": "conv_lora", "rank": 2},
              "preset": "all_conv", "lr": 3e-2, "base_checkpoint": str(base_file), "roi_size": [16, 16, 16]}
    data = {"dataset_json": str(dataset), "fold": fold, "n_folds": 2, "batch_size": 1, "sampling": "patch",
            "preprocess": PreprocessConfig(patch_size=[16, 16, 16], samples_per_volume=1, augment=False,
                                           **preprocess).to_dict()}
    run = root / name
    fit_run(RunConfig(run, {"experiment": "t", "method": adapter or "conv_lora", "fold": fold}, module, data, TRAINER, eval_base=False))
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Default CT preprocessing (three HU windows as channels, foreground crop), no resampling."""
    return _fit(tmp_path_factory.mktemp("export_run"), {}, "run")


@pytest.fixture(scope="module")
def mri_run(tmp_path_factory) -> Path:
    """The 'mri' intensity mode (MONAI's NormalizeIntensityd) with resampling to 12 x 12 x 8 mm."""
    return _fit(tmp_path_factory.mktemp("export_mri"), {"intensity": "mri", "target_spacing": [12.0, 12.0, 8.0]}, "run")


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory) -> Path:
    """MONAI's UNet with two output channels (softmax, argmax: the other postprocessing branch)."""
    kwargs = {"out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
    return _fit(tmp_path_factory.mktemp("export_unet"), {}, "run", "unet3d", kwargs)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A DynUNet tuned in full (model.safetensors, no adapter)."""
    return _fit(tmp_path_factory.mktemp("export_full"), {}, "run", adapter="full")


def test_predict_averages_the_fold_networks_of_full_runs(full_run):
    """Several full runs in one ``segadapt predict``: each fold's own network, probabilities averaged
    (p = (p_0 + p_1) / 2, against each run predicted alone); a merged export of a full run is its network."""
    other = _fit(full_run.parent, {}, "run_fold1", adapter="full", fold=1)  # the same base and data
    scan = str(sorted((full_run.parent / "data" / "imagesTr").glob("*.nii.gz"))[0])
    alone = [Predictor.from_runs([r], device="cpu").predict(scan).probabilities for r in (full_run, other)]
    assert np.abs(alone[0] - alone[1]).max() > 1e-3  # two folds, two networks
    ensemble = Predictor.from_runs([full_run, other], device="cpu")
    assert len(ensemble.networks) == 2 and "2 fold networks" in ensemble.description
    np.testing.assert_allclose(ensemble.predict(scan).probabilities, (alone[0] + alone[1]) / 2, atol=1e-6)


def test_merged_export_of_a_full_run_is_its_network(full_run, tmp_path):
    main([str(full_run), "--merged", str(tmp_path / "merged.safetensors")])
    net, _ = load_run_for_export(full_run)
    x = torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_merged(tmp_path / "merged.safetensors")(x), net(x), atol=0, rtol=0)


def test_peft_export_of_a_default_preset_run_loads_in_peft_and_matches(run, tmp_path):
    """PEFT's own load, forward and merge_and_unload, with every warning an error, compute segadapt's network:
    the layers PEFT cannot merge (ConvTranspose; the 1x1x1 Conv3d head, which PEFT's merge takes for a 1x1
    Conv2d) are in the exported base, and DynUNet's second names (skip_layers) load without 'missing keys'."""
    net, config = load_run_for_export(run)
    transposed = [n for n, layer in adapted_layers(net) if isinstance(layer.base_layer, nn.ConvTranspose3d)]
    pointwise = [n for n, layer in adapted_layers(net) if isinstance(layer.base_layer, nn.Conv3d)
                 and layer.base_layer.kernel_size == (1, 1, 1)]
    assert transposed and pointwise  # the default preset adapts the up-sampling ConvTranspose layers and the head
    with pytest.warns(UserWarning, match="PEFT cannot hold") as caught:
        folder = export_peft(net, tmp_path / "peft", architecture=config["module"], source=config["module"]["base_checkpoint"])
    assert all(n in str(caught[0].message) for n in transposed + pointwise)
    written = json.loads((folder / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    assert written["base_model_name_or_path"] == str((folder / PEFT_BASE_FILE).resolve())
    assert not any(n in written["target_modules"] for n in transposed + pointwise)

    peft = pytest.importorskip("peft")
    x = torch.randn(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x)
        set_active_adapter(net, None)
        unadapted = net(x)
        set_active_adapter(net, "default")
        assert (expected - unadapted).abs().max() > 1e-3  # two steps moved the adapter
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PEFT's load warns on missing keys: an error here
            reference = peft.PeftModel.from_pretrained(load_merged(folder / PEFT_BASE_FILE), folder).eval()
            torch.testing.assert_close(reference(x), expected, atol=1e-5, rtol=1e-5)
            merged = reference.merge_and_unload()
            torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in key for key in merged.state_dict())


def _bundle_masks(bundle: Path, scans: list[str], out: Path, threshold: float) -> dict[str, nib.Nifti1Image]:
    """The bundle run on the scans by ``monai.bundle.run`` (what ``python -m monai.bundle run --config_file ...``
    calls; in this process: a subprocess would spend half a minute importing torch and MONAI on a busy CI machine);
    the written masks by scan name."""
    monai_run(config_file=str(bundle / INFERENCE_CONFIG), bundle_root=str(bundle), datalist=scans, output_dir=str(out),
              threshold=threshold)
    assert torch.is_grad_enabled()  # the bundle's finalize gives autograd back to the calling process
    return {Path(s).name.split(".")[0]: nib.load(out / f"{Path(s).name.split('.')[0]}_seg.nii.gz") for s in scans}


@pytest.mark.parametrize("which", ["run", "mri_run", "unet_run"])
def test_the_bundle_runs_in_monai_and_matches_segadapt_predict(which, request, tmp_path):
    run = request.getfixturevalue(which)
    bundle = export_bundle(run, tmp_path / "bundle")
    assert {p.relative_to(bundle) for p in bundle.rglob("*") if p.is_file()} == set(BUNDLE_FILES)
    inference = json.loads((bundle / INFERENCE_CONFIG).read_text(encoding="utf-8"))
    network = "UNet" if which == "unet_run" else "DynUNet"
    assert inference["network_def"]["_target_"] == network and inference["inferer"]["roi_size"] == [16, 16, 16]
    assert inference["bundle_root"] == str(bundle.resolve())
    # the 'mri' intensity is MONAI's NormalizeIntensityd: that bundle needs no segadapt; three CT windows stacked
    # as channels have no MONAI transform (segadapt's CTWindowd)
    assert ("segadapt" in json.dumps(inference)) == (which != "mri_run")
    metadata = json.loads((bundle / METADATA).read_text(encoding="utf-8"))
    image = metadata["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == (1 if which == "mri_run" else 3)
    if which == "mri_run":  # the training images' range (fingerprint.json), else the CT windows' span
        cases = json.loads((run / "fingerprint.json").read_text(encoding="utf-8"))["cases"]
        assert image["value_range"] == [min(c["image_intensity"][0]["min"] for c in cases),
                                        max(c["image_intensity"][0]["max"] for c in cases)]
    else:
        assert image["value_range"] == [-800.0, 2000.0]  # the default windows (40, 80) (80, 200) (600, 2800)
    # model.pt is the plain MONAI network's state dict: it loads strictly into network_def
    plain = ConfigParser(inference).get_parsed_content("network_def")
    plain.load_state_dict(torch.load(bundle / MODEL_FILE, weights_only=True))

    scans = sorted(str(p) for p in (run.parent / "data" / "imagesTr").glob("*.nii.gz"))[:2]
    # a threshold (between two of the first scan's probabilities: no ties) that 20% of its voxels pass: a two-step
    # network's masks at 0.5 may be empty; the bundle takes it as an override of its `threshold` (two classes: argmax)
    values = np.unique(Predictor.from_runs([run], device="cpu").predict(scans[0]).probabilities[0])
    k = int(0.8 * len(values))
    threshold = float(values[k] + values[k + 1]) / 2 if which != "unet_run" else 0.5
    masks = _bundle_masks(bundle, scans, tmp_path / "out", threshold)
    predictor = Predictor.from_runs([run], device="cpu", threshold=threshold)
    for scan in scans:
        ours = predictor.predict(scan)
        theirs = masks[Path(scan).name.split(".")[0]]
        assert ours.mask.any() and not ours.mask.all()
        np.testing.assert_array_equal(np.asarray(theirs.dataobj), ours.mask)  # voxel for voxel
        np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-5)


def _threshold(predictor: Predictor, scan: str) -> float:
    """A threshold between two of the scan's probabilities (no ties: the bundle keeps p >= t, predict p > t)
    that 20% of its voxels pass (a two-step network's masks at 0.5 may be empty)."""
    values = np.unique(predictor.predict(scan).probabilities[0])
    k = int(0.8 * len(values))
    return float(values[k] + values[k + 1]) / 2


@pytest.mark.parametrize("which", ["run", "demo", "full_run"])
def test_monai_command_runs_the_bundle_from_another_folder_and_matches_segadapt_predict(which, request, demo_runs, tmp_path,
                                                                                      monkeypatch):
    """``python -m monai.bundle run --config_file DIR/configs/inference.json`` from a working folder elsewhere:
    bundle_root is the bundle's folder, and the masks are segadapt predict's, voxel for voxel -- for a DynUNet
    adapter run, the demo's multi-view UNet (segadapt's network class) and a run tuned in full. The demo's bundle
    runs through the real command in a subprocess (the import of segadapt's class by a fresh MONAI included);
    the others through ``monai.bundle.run``, what that command calls, with the same arguments in this process."""
    run = demo_runs[0] if which == "demo" else request.getfixturevalue(which)
    data = run.parents[3] / "data" / "sah" if which == "demo" else run.parent / "data"
    bundle = tmp_path / "bundle"
    main([str(run), "--bundle", str(bundle)])
    scans = sorted(str(p) for p in (data / "imagesTr").glob("*.nii.gz"))[:2]
    folder = tmp_path / "scans"
    folder.mkdir()
    for scan in scans:
        (folder / Path(scan).name).symlink_to(scan)
    predictor = Predictor.from_runs([run], device="cpu")
    threshold = _threshold(predictor, scans[0])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    arguments = {"config_file": str(bundle / INFERENCE_CONFIG), "dataset_dir": str(folder), "output_dir": str(tmp_path / "out"),
                 "threshold": threshold}
    if which == "demo":
        done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *(f"--{k}={v}" for k, v in arguments.items())],
                              cwd=elsewhere, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                              capture_output=True, text=True, encoding="utf-8", errors="replace")
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        monkeypatch.chdir(elsewhere)
        monai_run(**arguments)
    assert not any(elsewhere.iterdir())  # nothing written in the working folder
    predictor = Predictor.from_runs([run], device="cpu", threshold=threshold)
    for scan in scans:
        ours = predictor.predict(scan)
        theirs = nib.load(tmp_path / "out" / f"{Path(scan).name.split('.')[0]}_seg.nii.gz")
        assert ours.mask.any() and not ours.mask.all()
        np.testing.assert_array_equal(np.asarray(theirs.dataobj), ours.mask)  # voxel for voxel
        np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-5)


@pytest.mark.parametrize("preprocess", [
    {"intensity": "ct", "windows": [[40.0, 80.0]]},
    {"intensity": "ct_zscore", "clip_range": [[-100.0, 300.0]], "norm_mean": [100.0], "norm_std": [50.0]},
    {"intensity": "zscore"},
    {"intensity": "mri"},
])
def test_the_bundle_preprocessing_is_monai_only_where_monai_computes_the_same(preprocess, tmp_path):
    """One CT window, one clipped z-score channel, a z-score without background and 'mri' are MONAI transforms in
    the bundle, and give segadapt's preprocessed image bit for bit."""
    from segadapt.data import inference_transforms
    from segadapt.data.files import save_nifti

    cfg = PreprocessConfig(**preprocess)
    scan = save_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).normal(50, 300, (12, 10, 8)).astype(np.float32),
                      np.diag([0.8, 0.8, 2.5, 1.0]))
    steps = preprocessing(cfg, 1)
    assert "segadapt" not in json.dumps(steps)
    theirs = ConfigParser({"p": steps}).get_parsed_content("p")({"image": str(scan)})["image"]
    ours = inference_transforms(cfg, 1)({"image": str(scan), "case_id": "scan"})["image"]
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs.as_tensor(), ours.as_tensor(), atol=0, rtol=0)


def test_bundle_network_defs_are_the_builders_networks():
    """network_def builds, through MONAI's config parser, the network segadapt's builder builds (same
    parameters, same outputs); segadapt's own networks go through segadapt's builder; nnunet (its plans folder) is refused."""
    x = torch.randn(1, 2, 16, 16, 16)
    for model, kwargs in [("unet3d", {"in_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 1}),
                          ("dynunet", {"in_channels": 2, "kernel_size": [3, [1, 3, 3], 3], "strides": [1, [1, 2, 2], 2],
                                       "filters": [4, 8, 16], "deep_supervision": False})]:
        torch.manual_seed(0)
        ours = build_model(model, **kwargs).eval()
        theirs = ConfigParser({"net": network_def(model, kwargs)}).get_parsed_content("net").eval()
        theirs.load_state_dict(ours.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), ours(x), atol=0, rtol=0)
    kwargs = {"in_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0}
    torch.manual_seed(0)
    ours = build_model("multiview_unet", **kwargs).eval()  # segadapt's own class, through its builder
    theirs = ConfigParser({"net": network_def("multiview_unet", kwargs)}).get_parsed_content("net").eval()
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(theirs.predict_volume(x), ours.predict_volume(x), atol=0, rtol=0)
    torch.manual_seed(0)  # a ViT segmenter: its pretrained encoder file is not needed (model.pt holds every weight)
    vit = {"encoder": "vit_tiny_patch16_224", "in_channels": 2, "img_size": 32, "encoder_weights": "/no/such/file"}
    ours = build_model("vit_seg", **{**vit, "encoder_weights": None}).eval()
    definition = network_def("vit_seg", vit)
    assert "encoder_weights" not in definition
    theirs = ConfigParser({"net": definition}).get_parsed_content("net").eval()
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        image = torch.randn(1, 2, 32, 32)
        torch.testing.assert_close(theirs(image), ours(image), atol=0, rtol=0)
    with pytest.raises(ValueError, match="model 'nnunet' cannot be a MONAI bundle.*--nnunet"):
        network_def("nnunet", {})


def test_export_command_writes_a_bundle_and_the_merged_network(run, tmp_path, capsys):
    """DynUNet shares its blocks between two attributes (skip_layers): the merged file still saves and loads."""
    main([str(run), "--bundle", str(tmp_path / "b"), "--merged", str(tmp_path / "merged.safetensors")])
    assert (tmp_path / "b" / MODEL_FILE).is_file() and "MONAI bundle: " in capsys.readouterr().out
    net, _ = load_run_for_export(run)
    x = torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_merged(tmp_path / "merged.safetensors")(x), net(x), atol=1e-5, rtol=1e-5)
