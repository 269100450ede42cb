"""Fingerprint and plan (nnU-Net's rules) on synthetic volumes with known values; the new normalisations."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from segadapt.cli import main as cli_main
from segadapt.data import PreprocessConfig, pair_cases_by_name, val_transforms, write_dataset_json
from segadapt.data.config import PIPELINE_VERSION
from segadapt.data.files import save_nifti
from segadapt.plan import fingerprint as fingerprint_module
from segadapt.plan import Plan, load_or_make_plan, make_plan
from segadapt.plan.fingerprint import border_background, fingerprint
from segadapt.plan.topology import fit_patch, pooling_topology
from segadapt.data.transforms import CTZScored, ZScored
from segadapt.models.dynunet import build_dynunet
from segadapt.models.unet import build_unet

LABELS = {0: "background", 1: "lesion", 2: "core"}


def write_dataset(folder, volumes, modality="MRI"):
    """volumes: list of (image, label, spacing) -> dataset.json with diagonal (RAS) affines."""
    cases = []
    for i, (image, label, spacing) in enumerate(volumes):
        affine = np.diag([*spacing, 1.0])
        affine[0, 3] = i  # one origin per case: cases with equal arrays are not byte-identical (duplicates)
        cases.append({"image": save_nifti(folder / "imagesTr" / f"c{i}.nii.gz", image.astype(np.float32), affine),
                      "label": save_nifti(folder / "labelsTr" / f"c{i}.nii.gz", label.astype(np.uint8), affine),
                      "case_id": f"c{i}"})
    return write_dataset_json(folder / "dataset.json", "synthetic", cases, LABELS, {0: modality})


# Four cases: air 17 around a 16 x 16 x 8 body (value 50) holding a 4^3 label-1 box of value 100 * (k + 1)
# and a 2^3 label-2 box inside it; spacings chosen so the median is (1, 1, 1.75).
SPACINGS = [(1.0, 1.0, 1.5), (1.0, 1.0, 2.0), (1.2, 1.2, 2.5), (0.8, 0.8, 1.0)]


def body_case(k, spacing, air=17.0):
    image = np.full((20, 20, 12), air)
    image[2:18, 2:18, 2:10] = 50.0
    image[6:10, 6:10, 3:7] = 100.0 * (k + 1)
    label = np.zeros(image.shape)
    label[6:10, 6:10, 3:7] = 1
    label[7:9, 7:9, 4:6] = 2
    return image, label, spacing


@pytest.fixture()
def body_set(tmp_path):
    return write_dataset(tmp_path / "body", [body_case(k, s) for k, s in enumerate(SPACINGS)])


def test_border_background_needs_ninety_percent_of_the_faces():
    cube = np.full((10, 10, 10), 17.0)
    cube[4, 4, 4] = 3.0  # inside: irrelevant
    assert border_background(cube) == 17.0
    cube[0, 1:8, 1:8] = 5.0  # 49 of the 600 face entries: 91.8% remain 17
    assert border_background(cube) == 17.0
    cube[0, 1:9, 1:9] = 5.0  # 64 of 600: 89.3%
    assert border_background(cube) is None


def test_fingerprint_of_known_volumes(body_set):
    fp = fingerprint(body_set)
    assert fp["n_cases"] == 4 and fp["modality"] == {"0": "MRI"} and fp["modality_declared"]
    for case, spacing, k in zip(fp["cases"], SPACINGS, range(4)):
        assert case["spacing"] == pytest.approx(spacing)
        assert case["shape"] == [20, 20, 12] and case["crop_shape"] == [16, 16, 8]
        assert case["background"] == [17.0]
        stats = case["intensity"][0]
        assert stats["mean"] == stats["median"] == stats["min"] == stats["max"] == 100.0 * (k + 1)
        assert stats["std"] == 0.0
        voxel_ml = np.prod(spacing) / 1000
        assert case["label_volume_ml"] == pytest.approx({"1": 56 * voxel_ml, "2": 8 * voxel_ml})
    # 10^4 samples per case of a constant: exactly the values 100, 200, 300, 400 in equal numbers.
    stats = fp["intensity"][0]
    assert stats["mean"] == pytest.approx(250.0)
    assert stats["std"] == pytest.approx(np.sqrt((150**2 + 50**2 + 50**2 + 150**2) / 4))
    assert stats["median"] == pytest.approx(250.0)
    assert (stats["min"], stats["max"]) == (100.0, 400.0)
    assert (stats["percentile_00_5"], stats["percentile_99_5"]) == (100.0, 400.0)
    assert fp["background"] == [17.0]


def test_fingerprint_reads_cases_in_ras_order(tmp_path):
    image = np.zeros((8, 40, 44))  # array axes (i, j, k) point to (S, A, R)
    image[1:7, 5:30, 3:40] = (np.arange(8)[:, None, None] + 1)[1:7]  # S slab k holds k + 1
    label = (image > 4).astype(np.uint8)
    affine = np.array([[0, 0, 0.8, 0], [0, 0.9, 0, 0], [4.0, 0, 0, 0], [0, 0, 0, 1]])
    case = {"image": save_nifti(tmp_path / "i.nii.gz", image, affine), "case_id": "sar",
            "label": save_nifti(tmp_path / "l.nii.gz", label, affine)}
    fp = fingerprint(write_dataset_json(tmp_path / "dataset.json", "sar", [case], {0: "bg", 1: "x"}, {0: "MRI"}))
    (case,) = fp["cases"]
    assert case["spacing"] == pytest.approx([0.8, 0.9, 4.0]) and case["shape"] == [44, 40, 8]
    assert case["background"] == [0.0] and case["crop_shape"] == [37, 25, 6]
    assert case["label_volume_ml"]["1"] == pytest.approx(37 * 25 * 3 * 0.8 * 0.9 * 4.0 / 1000)
    assert case["intensity"][0]["mean"] == pytest.approx(6.0)  # values 5, 6, 7 over equal slabs


def test_plan_of_known_volumes(body_set):
    plan = make_plan(fingerprint(body_set))
    assert plan.target_spacing == pytest.approx([1.0, 1.0, 1.75]) and plan.anisotropic_axis is None
    assert plan.resample
    # round(crop 16 x 16 x 8 * spacing / target) per case: x 16, 16, 19, 13 and z 7, 9, 11, 5 -> medians.
    assert plan.median_shape == [16, 16, 8]
    assert plan.patch_size == [16, 16, 8] and plan.pools_per_axis == [2, 2, 1]
    assert plan.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 1]]
    assert plan.kernel_sizes == [[3, 3, 3]] * 3 and plan.filters == [32, 64, 128]
    assert plan.batch_size == 2  # 5% of 4 x 2048 voxels is far below one patch: the minimum
    assert plan.slice_size == [16, 16] and plan.slice_pools == 2 and plan.slice_filters == [32, 64, 128]
    assert plan.intensity == "zscore" and plan.background_value == [17.0]
    fields = plan.preprocess_fields()
    assert fields == {"intensity": "zscore", "target_spacing": [1.0, 1.0, 1.75], "orientation": "RAS",
                      "spatial_dims": 3, "patch_size": [16, 16, 8], "slice_size": [16, 16],
                      "background_value": [17.0]}
    PreprocessConfig(**fields)


def test_anisotropic_spacing_takes_the_tenth_percentile(tmp_path):
    volumes = []
    for z in (3.5, 4.0, 5.0, 5.0, 6.0):
        image = np.full((44, 44, 8), 0.0)
        image[2:42, 2:42, 1:7] = 60.0  # crop: 40 x 40 x 6
        label = np.zeros(image.shape)
        label[20:24, 20:24, 3:5] = 1
        volumes.append((image, label, (0.8, 0.8, z)))
    plan = make_plan(fingerprint(write_dataset(tmp_path, volumes)))
    # median z 5 > 3 x 0.8 and median 6 slices x 3 < 40: z gets percentile 10 of (3.5, 4, 5, 5, 6) = 3.7.
    assert plan.anisotropic_axis == 2 and plan.target_spacing == pytest.approx([0.8, 0.8, 3.7])
    assert plan.median_spacing == pytest.approx([0.8, 0.8, 5.0])
    # z: round(6 * (3.5, 4, 5, 5, 6) / 3.7) = 6, 6, 8, 8, 10 -> 8.
    assert plan.median_shape == [40, 40, 8]
    # Thick slices: z is neither pooled nor convolved (kernel 1) until x, y reach 3.2 mm.
    assert plan.kernel_sizes == [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
    assert plan.strides == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2]]
    assert plan.pools_per_axis == [3, 3, 1] and plan.patch_size == [40, 40, 8]
    assert any("anisotropy" in note for note in plan.notes)
    assert plan.background_value == [0.0]


def test_pooling_topology_matches_nnunet_on_hippocampus_sizes():
    pools, strides, kernels, padded = pooling_topology([1.0, 1.0, 1.0], [36, 50, 35])
    assert pools == [3, 3, 3] and padded == [40, 56, 40]
    assert strides == [[1, 1, 1]] + [[2, 2, 2]] * 3 and kernels == [[3, 3, 3]] * 4


def test_patch_shrinks_the_relatively_largest_axis_to_the_budget():
    # 40^3 (64000) > 30000: z, y, x drop to 32 by one divisor (8) each; 32^3 (32768) is still too large, so
    # z drops by the divisor of 24 (4): 28. 32 x 32 x 28 = 28672 fits.
    patch, pools, strides, kernels = fit_patch([1.0, 1.0, 1.0], [40, 40, 40], 30_000, 256.0**3)
    assert patch == [32, 32, 28] and pools == [3, 3, 2]
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    with pytest.raises(ValueError, match="too small"):
        fit_patch([1.0, 1.0, 1.0], [40, 40, 40], 1000, 256.0**3)


def test_batch_size_grows_with_the_budget_up_to_five_percent_of_the_dataset(body_set):
    fp = fingerprint(body_set)
    fp["cases"] = fp["cases"] * 50  # 200 cases of 2048 voxels: 5% = 20480 voxels = 10 patches
    assert make_plan(fp).batch_size == 10
    assert make_plan(fp, patch_voxels=4 * 2048).batch_size == 8  # 2 x budget / patch voxels


def test_ct_plan_clips_and_z_scores_with_the_dataset_statistics(tmp_path):
    rng = np.random.default_rng(0)
    volumes = []
    for low, box in ((-200, np.s_[4:20, 4:20, 2:8]), (200, np.s_[8:12, 8:12, 4:6])):  # 1536 and 32 labelled
        image = np.full((24, 24, 10), -1024.0)
        image[2:22, 2:22, 1:9] = rng.integers(low, low + 200, (20, 20, 8))
        label = np.zeros(image.shape)
        label[box] = 1
        volumes.append((image, label, (1.0, 1.0, 2.0)))
    dataset = write_dataset(tmp_path, volumes, modality="CT")
    fp = fingerprint(dataset)
    for case, (image, label, _) in zip(fp["cases"], volumes):
        values = image[label > 0]
        expected = {"mean": values.mean(), "std": values.std(), "median": np.median(values), "min": values.min(),
                    "max": values.max(), "percentile_00_5": np.percentile(values, 0.5),
                    "percentile_99_5": np.percentile(values, 99.5)}
        assert case["intensity"][0] == pytest.approx(expected)
    # 10^4 samples per case: both cases weigh alike (not by their labelled volume, 1536 vs 32 voxels).
    means = [image[label > 0].mean() for image, label, _ in volumes]
    second = [(image[label > 0] ** 2).mean() for image, label, _ in volumes]
    stats = fp["intensity"][0]
    assert stats["mean"] == pytest.approx(np.mean(means), abs=5.0)
    assert stats["std"] == pytest.approx(np.sqrt(np.mean(second) - np.mean(means) ** 2), rel=0.02)
    assert fp["background"] == [-1024.0]
    plan = make_plan(fp)
    assert plan.intensity == "ct_zscore"
    assert plan.clip_range == [[stats["percentile_00_5"], stats["percentile_99_5"]]]
    assert (plan.norm_mean, plan.norm_std) == ([stats["mean"]], [stats["std"]])
    cfg = PreprocessConfig(**plan.preprocess_fields())
    assert cfg.target_spacing is None  # every case is on the target grid already
    case = {"image": str(tmp_path / "imagesTr" / "c0.nii.gz"), "label": str(tmp_path / "labelsTr" / "c0.nii.gz")}
    out = val_transforms(cfg, label_values=(0, 1, 2))(case)["image"]
    body = volumes[0][0][2:22, 2:22, 1:9]  # the crop keeps HU > -500
    low, high = plan.clip_range[0]
    np.testing.assert_allclose(out[0].numpy(), (np.clip(body, low, high) - stats["mean"]) / stats["std"], atol=1e-5)
    windows = make_plan(fp, intensity="ct")  # HU windows as channels, when asked for
    assert windows.preprocess_fields()["windows"] == PreprocessConfig().windows
    assert "clip_range" not in windows.preprocess_fields()


def test_plan_of_2d_images(tmp_path):
    cases = []
    for i in range(3):
        image = np.zeros((70, 60))
        image[5:65, 5:55] = 10.0 + i  # 60 x 50 in a constant 0 border
        label = (image > 0).astype(np.uint8)
        affine = np.diag([0.5, 0.5, 1.0, 1.0])
        cases.append({"image": save_nifti(tmp_path / f"i{i}.nii.gz", image, affine), "case_id": f"c{i}",
                      "label": save_nifti(tmp_path / f"l{i}.nii.gz", label, affine)})
    dataset = write_dataset_json(tmp_path / "dataset.json", "flat", cases, {0: "bg", 1: "x"}, {0: "MRI"})
    plan = make_plan(fingerprint(dataset, spatial_dims=2))
    assert plan.orientation == "RA" and plan.target_spacing == pytest.approx([0.5, 0.5])
    assert plan.median_shape == [60, 50] and plan.background_value == [0.0]
    # 60 -> 30 -> 15 -> 8 -> 4 and 50 -> 25 -> 13 -> 7 (-> the lone axis 8 < 12 stops): 3 poolings, x 8.
    assert plan.patch_size == plan.slice_size == [64, 56] and plan.pools_per_axis == [3, 3]
    PreprocessConfig(**plan.preprocess_fields())


def test_ct_zscore_transform_by_hand():
    hu = MetaTensor(torch.tensor([-2000.0, -100.0, 100.0, 150.0, 300.0, 1000.0]).reshape(1, 6, 1, 1))
    out = CTZScored("image", [[-100.0, 300.0]], [100.0], [50.0])({"image": hu})["image"]
    np.testing.assert_allclose(out.flatten().numpy(), [-4, -4, 0, 1, 4, 4], atol=1e-6)


def test_zscore_transform_leaves_out_the_background_by_hand():
    image = torch.tensor([[17.0, 17.0 + 1e-5, 20.0, 24.0], [1.0, 2.0, 3.0, 4.0]]).reshape(2, 4, 1, 1)
    out = ZScored("image", [17.0, None])({"image": MetaTensor(image)})["image"]
    # channel 0: background 17 (and 17 + float rounding) -> 0; the rest: mean 22, std 2.
    np.testing.assert_allclose(out[0].flatten().numpy(), [0, 0, -1, 1], atol=1e-6)
    # channel 1: no background, plain z-score: mean 2.5, population std sqrt(1.25).
    np.testing.assert_allclose(out[1].flatten().numpy(), (np.arange(1, 5) - 2.5) / np.sqrt(1.25), atol=1e-6)
    with pytest.raises(ValueError, match="channel"):
        ZScored("image", [17.0])({"image": MetaTensor(image)})


def test_zscore_pipeline_crops_and_normalises_a_non_zero_background(body_set):
    plan = make_plan(fingerprint(body_set))
    cfg = PreprocessConfig(**{**plan.preprocess_fields(), "target_spacing": None})
    root = body_set.parent
    case = {"image": str(root / "imagesTr" / "c1.nii.gz"), "label": str(root / "labelsTr" / "c1.nii.gz")}
    out = val_transforms(cfg, label_values=(0, 1, 2))(case)["image"]
    body = body_case(1, SPACINGS[1])[0][2:18, 2:18, 2:10]  # air (17) cropped away
    np.testing.assert_allclose(out[0].numpy(), (body - body.mean()) / body.std(), atol=1e-5)


def test_config_validates_the_new_modes_and_keys_only_their_fields():
    with pytest.raises(ValueError, match="ct_zscore"):
        PreprocessConfig(intensity="ct_zscore")
    with pytest.raises(ValueError, match="low < high"):
        PreprocessConfig(intensity="ct_zscore", clip_range=[[300, -100]], norm_mean=[0], norm_std=[1])
    with pytest.raises(ValueError, match="norm_std"):
        PreprocessConfig(intensity="ct_zscore", clip_range=[[-100, 300]], norm_mean=[0], norm_std=[0])
    ct = dict(intensity="ct_zscore", clip_range=[[-100, 300]], norm_mean=[40], norm_std=[80])
    keys = {PreprocessConfig(**ct).cache_key(), PreprocessConfig(**{**ct, "norm_std": [81]}).cache_key(),
            PreprocessConfig(intensity="zscore").cache_key(),
            PreprocessConfig(intensity="zscore", background_value=[17]).cache_key()}
    assert len(keys) == 4
    assert PreprocessConfig(intensity="zscore", background_value=[17]).cache_key() == \
        PreprocessConfig(intensity="zscore", background_value=[17.0], clip_range=[[0, 1]]).cache_key()
    # The older modes keep their keys: the recipe from before the new fields existed.
    for cfg in (PreprocessConfig(), PreprocessConfig(intensity="mri", target_spacing=[1, 1, 2])):
        values = {"intensity": cfg.intensity, "target_spacing": cfg.target_spacing and [float(s) for s in
                  cfg.target_spacing], "orientation": "RAS", "spatial_dims": 3.0, "crop_foreground": True,
                  "foreground_threshold": -500.0}
        if cfg.intensity == "ct":
            values["windows"] = [[float(v) for v in w] for w in cfg.windows]
        text = json.dumps({"version": PIPELINE_VERSION, **values}, sort_keys=True)
        assert cfg.cache_key() == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_plan_round_trips_and_builds_its_networks(tmp_path, body_set):
    plan = make_plan(fingerprint(body_set), base_filters=4)
    assert Plan.from_json(plan.to_json(tmp_path / "plan.json")) == plan
    with pytest.raises(ValueError, match="unknown plan fields"):
        Plan.from_dict({**plan.to_dict(), "spacing": [1, 1, 1]})
    nets = plan.network_fields()
    assert nets["unet3d"] == {"channels": [4, 8, 16], "strides": [2, [2, 2, 1]]}
    x = torch.zeros(1, 1, *plan.patch_size)
    with torch.no_grad():
        assert build_dynunet(**nets["dynunet"]).eval()(x).shape == (1, 1, *plan.patch_size)
        assert build_unet(**nets["unet3d"]).eval()(x).shape == (1, 1, *plan.patch_size)
        unet2d = build_unet(spatial_dims=2, **nets["multiview_unet"]).eval()
        assert unet2d(torch.zeros(1, 1, *plan.slice_size)).shape == (1, 1, *plan.slice_size)


def test_load_or_make_plan_reads_the_cases_once_per_content(tmp_path, body_set, monkeypatch):
    calls = []
    real = fingerprint_module.fingerprint
    monkeypatch.setattr(fingerprint_module, "fingerprint", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_or_make_plan(body_set, tmp_path / "plans")
    again = load_or_make_plan(body_set, tmp_path / "plans")
    assert first == again and len(calls) == 1
    (folder,) = (tmp_path / "plans").iterdir()
    assert Plan.from_json(folder / "plan.json") == first and (folder / "fingerprint.json").is_file()
    assert load_or_make_plan(body_set, tmp_path / "plans", patch_voxels=4096).budget["patch_voxels"] == 4096
    assert len(calls) == 1  # new options: a new plan from the cached fingerprint
    image = body_set.parent / "imagesTr" / "c0.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    load_or_make_plan(body_set, tmp_path / "plans")
    assert len(calls) == 2 and len(list((tmp_path / "plans").iterdir())) == 2


def test_cli_writes_and_prints_the_plan(tmp_path, body_set, capsys):
    out = tmp_path / "out" / "plan.json"
    cli_main(["plan", str(body_set), "--out", str(out), "--patch-voxels", "8192"])
    printed = capsys.readouterr().out
    plan = Plan.from_json(out)
    assert plan.budget["patch_voxels"] == 8192 and (out.parent / "fingerprint.json").is_file()
    for name, value in plan.to_dict().items():
        if value is not None and name != "notes":
            assert f"{name}: {value}" in printed
    with pytest.raises(SystemExit) as error:
        cli_main(["plan", str(tmp_path / "missing.json"), "--out", str(tmp_path / "bad.json")])
    assert error.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_plan_of_real_hippocampus_mri(shared_data, tmp_path):
    root = shared_data / "hippocampus_msd"
    if not (root / "imagesTr").is_dir():
        pytest.skip(f"hippocampus set not found at {root}")
    cases = pair_cases_by_name(root / "imagesTr", root / "labelsTr")[:20]
    dataset = write_dataset_json(tmp_path / "dataset.json", "hippocampus", cases,
                                 {0: "background", 1: "anterior", 2: "posterior"}, {0: "MRI"})
    fp = fingerprint(dataset)
    plan = make_plan(fp)
    assert plan.target_spacing == [1.0, 1.0, 1.0] and not plan.resample
    # cropped MRI, tissue on the borders, no value below 0 and a few exact zeros (no signal) in most float cases
    zero_cases = [c for c in fp["cases"] if c["image_intensity"][0]["min"] == 0]
    assert len(zero_cases) > 10 and all(c["image_intensity"][0]["min"] >= 0 for c in fp["cases"])
    assert plan.intensity == "mri" and plan.background_value == [0.0]  # as experiment=hippocampus pins
    assert f"zeros in {len(zero_cases)} of 20 cases" in " ".join(plan.notes)
    assert all(m <= p <= 1.25 * m for p, m in zip(plan.patch_size, plan.median_shape))
    assert all(p % 2**n == 0 for p, n in zip(plan.patch_size, plan.pools_per_axis))
    assert all(s % 2**plan.slice_pools == 0 and s >= max(plan.median_shape) for s in plan.slice_size)
    volumes = [c["label_volume_ml"] for c in fp["cases"]]
    assert all(1.0 < v["1"] + v["2"] < 8.0 for v in volumes)  # a hippocampus: a few mL
    image = val_transforms(PreprocessConfig(**plan.preprocess_fields()), (0, 1, 2))(cases[0])["image"]
    assert float(image.mean()) == pytest.approx(0.0, abs=1e-4) and float(image.std()) == pytest.approx(1.0, abs=1e-3)


# ---- the no-signal value (background) and the intensity mode it decides --------------------------------------


def _plan_of(tmp_path, images, modality="MRI"):
    """make_plan of one-label-box cases built from `images` (spacing 1 mm)."""
    volumes = []
    for image in images:
        label = np.zeros(image.shape)
        label[8:12, 8:12, 4:8] = 1
        volumes.append((image, label, (1.0, 1.0, 1.0)))
    fp = fingerprint(write_dataset(tmp_path, volumes, modality))
    return fp, make_plan(fp)


def test_zero_floor_of_a_magnitude_image_is_no_signal_and_gives_mri(tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for _ in range(3):
        image = rng.uniform(5.0, 500.0, (20, 20, 12))  # tissue on every border: no border value
        image[3, 4, 5] = image[15, 2, 7] = 0.0  # isolated exact zeros, nothing below 0
        images.append(image)
    fp, plan = _plan_of(tmp_path, images)
    assert [c["background"] for c in fp["cases"]] == [[0.0]] * 3 and fp["background"] == [0.0]
    assert plan.intensity == "mri"
    assert "background_value" not in plan.preprocess_fields()
    assert "zeros in 3 of 3 cases" in plan.notes[0] and "'mri'" in plan.notes[0]


def test_constant_non_zero_border_is_the_background(tmp_path):
    rng = np.random.default_rng(1)
    images = []
    for _ in range(3):
        image = np.full((20, 20, 12), -0.8)  # a masked, pre-normalised MRI: the mask's value on the borders
        image[2:18, 2:18, 2:10] = rng.normal(0.5, 1.0, (16, 16, 8))
        image[5, 5, 5] = 0.0  # a zero inside: an intensity like any other
        images.append(image)
    fp, plan = _plan_of(tmp_path, images)
    assert fp["background"] == [pytest.approx(-0.8)] and plan.intensity == "zscore"
    assert PreprocessConfig(**plan.preprocess_fields()).background_value == [pytest.approx(-0.8)]


def test_zeros_inside_a_signed_image_are_not_background(tmp_path):
    """Pre-normalised MRI (values below 0, tissue on the borders) with exact zeros inside the anatomy."""
    rng = np.random.default_rng(2)
    images = []
    for _ in range(3):
        image = rng.normal(0.0, 1.0, (20, 20, 12))
        image[6:9, 6:9, 3:6] = 0.0  # 27 exact zeros: the mean, not air
        images.append(image)
    fp, plan = _plan_of(tmp_path, images)
    assert [c["background"] for c in fp["cases"]] == [[None]] * 3 and fp["background"] == [None]
    assert plan.intensity == "zscore" and plan.preprocess_fields()["background_value"] == [None]
    assert "whole volume" in " ".join(plan.notes)


@pytest.mark.parametrize("padding", [-1024.0, -2048.0, -3024.0])
def test_ct_padding_is_the_background_and_water_is_not(tmp_path, padding):
    rng = np.random.default_rng(3)
    images = []
    for _ in range(3):
        image = np.full((20, 20, 12), padding)
        image[2:18, 2:18, 2:10] = rng.integers(-100, 100, (16, 16, 8))
        image[4:7, 4:7, 4:7] = 0.0  # water: 0 HU inside the body
        images.append(image)
    fp, plan = _plan_of(tmp_path, images, modality="CT")
    assert fp["background"] == [padding] and plan.intensity == "ct_zscore"
    assert all(c["crop_shape"] == [16, 16, 8] for c in fp["cases"])
    # no constant border (noisy air around the body, no padding): no background, and still not 0
    noisy = [np.where(i == padding, rng.normal(-1000.0, 20.0, i.shape), i) for i in images]
    fp, _ = _plan_of(tmp_path / "noisy", noisy, modality="CT")
    assert fp["background"] == [None]


def test_real_pre_normalised_hippocampus_and_abdominal_ct(shared_data, tmp_path):
    """A z-scored copy of real hippocampus MRIs (values below 0, no zeros): 'zscore' over the whole volume; the
    abdominal CT (organ labels covering the body): nnU-Net's foreground clip, unchanged."""
    root = shared_data / "hippocampus_msd"
    if not (root / "imagesTr").is_dir():
        pytest.skip(f"hippocampus set not found at {root}")
    cases = []
    for case in pair_cases_by_name(root / "imagesTr", root / "labelsTr")[:6]:
        image = nib.load(case["image"])
        data = np.asarray(image.dataobj, dtype=np.float32)
        normalised = (data - data.mean()) / data.std() + 1e-3  # + 1e-3: no voxel lands on exactly 0
        cases.append({**case, "image": save_nifti(tmp_path / "norm" / Path(case["image"]).name, normalised,
                                                   image.affine)})
    dataset = write_dataset_json(tmp_path / "norm" / "dataset.json", "hippocampus_normalised", cases,
                                 {0: "background", 1: "anterior", 2: "posterior"}, {0: "MRI"})
    plan = make_plan(fingerprint(dataset))
    assert plan.intensity == "zscore" and plan.background_value == [None]

    ct = shared_data / "ct_abdomen_totalseg"
    labels = {int(k): v for k, v in json.loads((ct / "labels.json").read_text(encoding="utf-8")).items()}
    dataset = write_dataset_json(tmp_path / "ct" / "dataset.json", "abdomen",
                                 [{"image": ct / "ct.nii.gz", "label": ct / "seg_total.nii.gz", "case_id": "ct"}],
                                 {0: "background", **labels}, {0: "CT"})
    fp = fingerprint(dataset)
    plan = make_plan(fp)
    image = np.asarray(nib.load(ct / "ct.nii.gz").dataobj, dtype=np.float64)
    labelled = image[np.asarray(nib.load(ct / "seg_total.nii.gz").dataobj) > 0]
    low, high = np.percentile(labelled, (0.5, 99.5))
    body = image[image > -500]
    assert fp["body_intensity"][0]["share_in_foreground_range"] == pytest.approx(
        np.mean((body >= low) & (body <= high)), abs=0.01)
    assert plan.intensity == "ct_zscore" and "(nnU-Net)" in plan.notes[0]
    assert plan.clip_range[0] == pytest.approx([low, high], abs=15.0)  # 10^4 samples drawn with replacement
    assert plan.norm_mean[0] == pytest.approx(labelled.mean(), abs=10.0)


def test_ct_lesion_inside_anatomy_is_clipped_to_the_body(tmp_path):
    """Phantom head CT with haemorrhage: the lesion's percentiles hold < 25% of the body, so the clip and the
    z-score come from the body (HU > -500), which keeps brain, bone and blood apart."""
    from segadapt.data.phantom import make_phantom_dataset

    dataset = make_phantom_dataset(tmp_path, "tbi", 3, shape=[32, 32, 16], spacing=[6.9, 6.9, 10.0])
    fp = fingerprint(dataset)
    plan = make_plan(fp)
    images = [np.asarray(nib.load(tmp_path / "imagesTr" / f"tbi_{i:03d}.nii.gz").dataobj, np.float64) for i in range(3)]
    labels = [np.asarray(nib.load(tmp_path / "labelsTr" / f"tbi_{i:03d}.nii.gz").dataobj) > 0 for i in range(3)]
    lesion = np.concatenate([i[m] for i, m in zip(images, labels)])
    body = np.concatenate([i[i > -500] for i in images])
    low, high = np.percentile(lesion, (0.5, 99.5))
    share = np.mean((body >= low) & (body <= high))
    assert share < 0.25 and fp["body_intensity"][0]["share_in_foreground_range"] == pytest.approx(share, abs=0.02)
    assert plan.intensity == "ct_zscore" and "hold only" in plan.notes[0] and "body" in plan.notes[0]
    body_low, body_high = np.percentile(body, (0.5, 99.5))
    assert plan.clip_range[0] == pytest.approx([body_low, body_high], abs=30.0)
    assert plan.clip_range[0][0] < 0 < 1000 < plan.clip_range[0][1]  # fat and bone kept, not [55, 95]
    assert plan.norm_std[0] == pytest.approx(body.std(), rel=0.1)
    # a constant-free cropped output: brain (~30 HU) and bone (> 700 HU) stay apart after the intensity step
    case = {key: str(tmp_path / f"{key}sTr" / "tbi_000.nii.gz") for key in ("image", "label")}
    out = val_transforms(PreprocessConfig(**plan.preprocess_fields()), (0, 1))(case)
    assert len(np.unique(np.round(out["image"].numpy(), 3))) > 100
