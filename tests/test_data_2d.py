"""The 2D data path: DRIVE from its configs, infinity in config values, areas in 2D, each data group's own
sampling, and 2D orientation without MONAI's 3D-only warning."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from monai.data import MetaTensor
from monai.transforms import Orientationd
from omegaconf import OmegaConf
from PIL import Image

from segadapt.data import load_dataset_json, write_dataset_json
from segadapt.data.config import parse_number
from segadapt.data.files import save_nifti, save_png
from segadapt.data.dataset_json import dataset_spatial_dims, size_unit
from segadapt.data.transforms import ImageOrientationd
from segadapt.runs import read_metrics, read_run_config
from segadapt.training import case_metrics, train
from segadapt.training.metrics import bin_labels
from segadapt.training.report import runs_size_unit
from segadapt.training.report import write_report
from segadapt.training.config import TrainConfig, datamodule_args, module_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _compose(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


def _prepare_drive():
    spec = importlib.util.spec_from_file_location("prepare_drive", REPO / "datasets" / "prepare_drive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def drive3(shared_data, tmp_path_factory) -> Path:
    """DRIVE laid out as the public set with three images per subset, prepared as configs/data/drive*.yaml
    expect: <data>/drive (three test images), <data>/drive_source (three training images)."""
    root, data = tmp_path_factory.mktemp("DRIVE"), tmp_path_factory.mktemp("data")
    for subset in ("training", "test"):
        for folder, pattern in (("images", "*.tif"), ("1st_manual", "*.gif")):
            (root / subset / folder).mkdir(parents=True)
            for file in sorted((shared_data / "drive" / subset / folder).glob(pattern))[:3]:
                (root / subset / folder / file.name).symlink_to(file)
    prepare = _prepare_drive()
    prepare(["--root", str(root), "--out", str(data / "drive"), "--sets", "test"])
    prepare(["--root", str(root), "--out", str(data / "drive_source"), "--sets", "training"])
    return data


def test_drive_config_end_to_end(drive3, tmp_path, shared_data):
    """experiment=drive model=unet2d, no other data or model override: the base is pretrained on the source
    images, adapted on the target, scored on the whole image; areas in pixels (PNG has no spacing)."""
    cfg = _compose("experiment=drive", "model=unet2d", "adapter=lora_c", f"paths.data={drive3}",
                   f"paths.runs={tmp_path}", "data.n_folds=3", "source.n_folds=3", "selection.inner_fraction=0",
                   "pretrain.max_steps=2", "trainer.max_steps=2", "trainer.enable_progress_bar=false", "eval_base=false",
                   "data.preprocess.samples_per_volume=2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg)
    assert not [w for w in caught if "axcodes" in str(w.message)]
    run = tmp_path / "drive" / "unet2d" / "lora_c" / "fold0"
    base = tmp_path / "base" / "drive_source_unet2d"
    for folder in (run, base):
        config = read_run_config(folder)
        assert config["datamodule"]["sampling"] == "patch"
        assert config["datamodule"]["preprocess"]["spatial_dims"] == 2
        assert config["module"]["roi_size"] == [64, 64]
        assert json.loads((folder / "plan.json").read_text())["orientation"] == "RA"
    metrics = read_metrics(run)
    assert metrics["size_unit"] == "px" and metrics["volume_bins"] == [">=0 px"]
    (case,) = result["cases"]
    number = case["case_id"].split("_")[1]
    manual = np.asarray(Image.open(shared_data / "drive" / "test" / "1st_manual" / f"{number}_manual1.gif").convert("L"))
    assert case["true_px"] == float((manual > 127).sum())  # the vessel area in pixels, from the raw file
    assert 0.0 <= case["dice"] <= 1.0
    assert runs_size_unit([metrics]) == "px"
    paths = write_report(tmp_path / "drive")
    assert "HD95 (px)" in paths["markdown"].read_text(encoding="utf-8")
    assert "dice_bin[>=0 px]" in paths["csv"].read_text(encoding="utf-8").splitlines()[0]


@pytest.mark.parametrize("text, expected", [
    (".inf", math.inf), ("inf", math.inf), ("Infinity", math.inf), ("+.Inf", math.inf), ("-inf", -math.inf),
    ("-.inf", -math.inf), ("1.5", 1.5), (" 2 ", 2.0), (3, 3.0), (float("inf"), math.inf),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("bad", ["infinite", "abc", "", None, True, [1]])
def test_parse_number_refuses(bad):
    with pytest.raises(ValueError, match="volume_bins_ml"):
        parse_number(bad, "volume_bins_ml")


@pytest.mark.parametrize("edge", [".inf", "inf", "Infinity"])
def test_inf_bins_from_the_command_line(edge):
    """`data.volume_bins_ml=[0,.inf]` (Hydra leaves '.inf' a string, YAML leaves 'inf' one) passes the type
    check and reaches the module as a float; a word that is no number is still refused."""
    overrides = [f"data.volume_bins_ml=[0,5,{edge}]"]
    cfg = _compose(*overrides)
    TrainConfig.from_cfg(cfg)
    args = module_args(cfg, cfg["data"], 1, None, {"spec": "scratch", "lr": 1e-3})
    assert args["volume_bins_ml"] == [0.0, 5.0, math.inf]
    with pytest.raises(ValueError, match=r"volume_bins_ml\[2\]"):
        TrainConfig.from_cfg(_compose("data.volume_bins_ml=[0,5,lots]"))


def test_area_in_mm2_for_2d_and_ml_for_3d():
    mask = torch.zeros(8, 10)
    mask[2:5, 3:7] = 1  # 12 pixels
    affine = torch.diag(torch.tensor([0.5, 0.25, 7.0, 1.0], dtype=torch.float64))  # 0.125 mm^2 per pixel
    row = case_metrics(mask, mask, affine)
    assert row["true_mm2"] == pytest.approx(12 * 0.5 * 0.25) and row["pred_mm2"] == row["true_mm2"]  # named by unit
    volume = torch.zeros(4, 4, 4)
    volume[:2, :3, :1] = 1  # 6 voxels of 0.5 x 0.25 x 7 mm
    assert case_metrics(volume, volume, affine)["true_ml"] == pytest.approx(6 * 0.5 * 0.25 * 7.0 / 1000.0)
    assert bin_labels([0, 10, math.inf], "mm^2") == ["0-10 mm^2", ">=10 mm^2"]


def test_size_unit_and_spatial_dims_follow_the_files(tmp_path):
    """PNG: 2D in pixels; a 2D NIfTI (with a spacing): mm^2; volumes: mL."""
    png = {"image": save_png(tmp_path / "a.png", np.full((4, 4), 9, np.uint8)),
           "label": save_png(tmp_path / "a_seg.png", np.eye(4, dtype=np.uint8)), "case_id": "a"}
    images = write_dataset_json(tmp_path / "png" / "dataset.json", "p", [png], {0: "bg", 1: "fg"}, {0: "gray"})
    nifti = {"image": save_nifti(tmp_path / "b.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4)),
             "label": save_nifti(tmp_path / "b_seg.nii.gz", np.ones((4, 4, 4), np.uint8), np.eye(4)), "case_id": "b"}
    volumes = write_dataset_json(tmp_path / "nii" / "dataset.json", "v", [nifti], {0: "bg", 1: "fg"}, {0: "MRI"})
    assert dataset_spatial_dims(load_dataset_json(images)) == 2 and size_unit(load_dataset_json(images), 2) == "px"
    assert dataset_spatial_dims(load_dataset_json(volumes)) == 3 and size_unit(load_dataset_json(volumes), 3) == "mL"
    assert size_unit(load_dataset_json(volumes), 2) == "mm^2"


def _drive_as_planned(group: str) -> list[str]:
    """The values the plan gives DRIVE's `auto` ones (configs/data/drive.yaml; its 8-bit RGB PNG files)."""
    planned = {"intensity": "rgb", "spatial_dims": 2, "orientation": "RA", "target_spacing": "null"}
    return [f"{group}.preprocess.{key}={value}" for key, value in planned.items()]


def test_source_and_target_sample_as_their_own_data():
    """A 2D ViT with a 2D target (DRIVE) and a 3D source (the phantom volumes): the source trains on axial
    slices of its volumes, the target on 2D patches, each with its own inference window; the same holds the
    other way round, whatever the model's sampling is for volumes."""
    cfg = _compose("model=vit_seg", "data=drive", *_drive_as_planned("data"))
    source, target = cfg["source"], cfg["data"]
    assert datamodule_args(cfg, source, Path("s.json"), 0)["sampling"] == "slice"
    assert datamodule_args(cfg, target, Path("t.json"), 0)["sampling"] == "patch"
    tuning = {"spec": "scratch", "lr": 1e-3}
    assert module_args(cfg, source, 3, None, tuning)["roi_size"] == source["preprocess"]["slice_size"]
    assert module_args(cfg, target, 3, None, tuning)["roi_size"] == target["preprocess"]["patch_size"]
    cfg = _compose("model=unet3d", "data@source=drive_source", "data.preprocess.patch_size=[32,32,16]",
                   *_drive_as_planned("source"))
    assert datamodule_args(cfg, cfg["source"], Path("s.json"), 0)["sampling"] == "patch"
    assert datamodule_args(cfg, cfg["data"], Path("t.json"), 0)["sampling"] == "patch"
    cfg = _compose("model=multiview_unet", "data@source=drive_source", *_drive_as_planned("source"))
    assert datamodule_args(cfg, cfg["source"], Path("s.json"), 0)["sampling"] == "patch"
    assert datamodule_args(cfg, cfg["data"], Path("t.json"), 0)["sampling"] == "slice"


def test_2d_orientation_inverts_without_the_3d_warning():
    """A 2D image stored flipped along its first axis (affine x -> -x): reoriented to RA as MONAI's
    Orientationd does, and inverted back onto the stored array without 'axcodes' warnings."""
    array = torch.arange(12.0).reshape(1, 3, 4)
    affine = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    forward = ImageOrientationd("image", axcodes="RA")
    reference = Orientationd("image", axcodes="RA")
    out = forward({"image": MetaTensor(array.clone(), affine=affine)})["image"]
    expected = reference({"image": MetaTensor(array.clone(), affine=affine)})["image"]
    assert torch.equal(out.as_tensor(), expected.as_tensor()) and torch.equal(out.as_tensor()[0], array[0].flip(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = forward.inverse({"image": out})["image"]
    assert not [w for w in caught if "axcodes" in str(w.message)]
    assert torch.equal(back.as_tensor(), array) and torch.equal(back.affine, affine)


def test_3d_orientation_inverts_as_monai():
    array = torch.arange(24.0).reshape(1, 2, 3, 4)
    affine = torch.tensor([[0.0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]], dtype=torch.float64)
    ours, monai = ImageOrientationd("image", axcodes="RAS"), Orientationd("image", axcodes="RAS")
    a = ours({"image": MetaTensor(array.clone(), affine=affine)})
    b = monai({"image": MetaTensor(array.clone(), affine=affine)})
    assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
    back_a, back_b = ours.inverse(a)["image"], monai.inverse(b)["image"]
    assert torch.equal(back_a.as_tensor(), back_b.as_tensor()) and torch.equal(back_a.affine, back_b.affine)
    assert torch.equal(back_a.as_tensor(), array)
