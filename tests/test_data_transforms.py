"""Pipelines: windowing values, orientation/spacing/crop round trips, patch and slice sampling, config."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Randomizable
from omegaconf import OmegaConf

from segadapt.data import (
    CTWindowd,
    PreprocessConfig,
    inference_transforms,
    invert_transform,
    patch_train_transforms,
    slice_train_transforms,
    val_transforms,
)
from segadapt.data.files import save_nifti


def test_ct_windows_follow_the_formula():
    hu = torch.tensor([-1000.0, -800.0, 0.0, 20.0, 40.0, 80.0, 100.0, 600.0, 2000.0]).reshape(1, 9, 1, 1)
    windows = [[40, 80], [80, 200], [600, 2800]]
    out = CTWindowd("image", windows)({"image": MetaTensor(hu)})["image"]
    assert out.shape == (3, 9, 1, 1)
    for channel, (level, width) in enumerate(windows):
        expected = np.clip((hu.flatten().numpy() - (level - width / 2)) / width, 0, 1)
        np.testing.assert_allclose(out[channel].flatten().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), [0, 0, 0, 0.25, 0.5, 1, 1, 1, 1], atol=1e-6)


# A non-RAS (x flipped, y and z swapped), anisotropic input: array axes (i, j, k) point to (L, S, A).
INPUT_AFFINE = np.array([[-2.0, 0, 0, 40.0], [0, 0, 4.0, -30.0], [0, 2.0, 0, -20.0], [0, 0, 0, 1]])


@pytest.fixture()
def oblique_case(tmp_path):
    image = np.full((20, 16, 10), -1000.0, np.float32)
    image[3:17, 2:14, 2:8] = 30.0  # "head"
    label = np.zeros(image.shape, np.uint8)
    label[8, 5, 4] = 1
    label[9:11, 6:8, 5:7] = 1
    return {
        "image": str(save_nifti(tmp_path / "img.nii.gz", image, INPUT_AFFINE)),
        "label": str(save_nifti(tmp_path / "lbl.nii.gz", label, INPUT_AFFINE)),
        "case_id": "oblique",
    }, label


def test_orientation_spacing_and_crop_keep_world_positions(oblique_case):
    case, label = oblique_case
    cfg = PreprocessConfig(target_spacing=[1.0, 1.0, 2.0], windows=[[40, 80]])
    out = val_transforms(cfg, label_values=(0, 1))(case)
    affine = out["image"].affine.numpy()
    np.testing.assert_allclose(np.diag(affine)[:3], [1.0, 1.0, 2.0], atol=1e-6)  # RAS, target spacing
    np.testing.assert_allclose(affine[:3, :3] - np.diag(np.diag(affine)[:3]), 0, atol=1e-6)
    # Cropped to the head, 28 x 24 x 24 mm (x, y, z) -> 28 x 24 x 12 voxels, + 1 where bilinear blur crosses -500 HU.
    assert all(n <= s <= n + 1 for s, n in zip(out["image"].shape[1:], (28, 24, 12)))
    assert out["image"].shape == out["label"].shape and out["image"].shape[0] == 1
    # Every input voxel centre inside the crop lands on an output voxel centre with the same label value.
    indices = np.argwhere(np.ones(label.shape, bool))
    world = INPUT_AFFINE @ np.c_[indices, np.ones(len(indices))].T
    mapped = (np.linalg.inv(affine) @ world)[:3].T
    np.testing.assert_allclose(mapped, np.rint(mapped), atol=1e-4)
    mapped = np.rint(mapped).astype(int)
    inside = np.all((mapped >= 0) & (mapped < out["label"].shape[1:]), axis=1)
    got = out["label"][0].numpy()[tuple(mapped[inside].T)]
    np.testing.assert_array_equal(got, label[tuple(indices[inside].T)])
    assert got.sum() == label.sum()  # the whole lesion is inside the crop


def test_inversion_restores_the_input_grid_exactly(oblique_case):
    case, label = oblique_case
    cfg = PreprocessConfig(target_spacing=[1.0, 1.0, 2.0])  # integer refinement: nearest round trip is exact
    pipeline = inference_transforms(cfg)
    data = pipeline({"image": case["image"]})
    # A "prediction" on the preprocessed grid: the label pushed through the same geometry.
    data["pred"] = val_transforms(cfg)(case)["label"]
    restored = invert_transform(pipeline, keys="pred", nearest=True)(data)["pred"]
    assert restored.shape == (1, *label.shape)
    np.testing.assert_allclose(restored.affine.numpy(), INPUT_AFFINE, atol=1e-5)
    np.testing.assert_array_equal(restored[0].numpy(), label)


def test_patches_are_centred_on_lesions_when_positive_fraction_is_one(oblique_case):
    case, _ = oblique_case
    cfg = PreprocessConfig(target_spacing=[1.0, 1.0, 2.0], patch_size=[9, 9, 5], samples_per_volume=6,
                           positive_fraction=1.0, augment=False)
    pipeline = patch_train_transforms(cfg, label_values=(0, 1))
    pipeline.set_random_state(0)
    samples = pipeline(case)
    assert len(samples) == 6
    for sample in samples:
        assert sample["image"].shape == (3, 9, 9, 5) and sample["label"].shape == (1, 9, 9, 5)
        assert sample["label"][0, 4, 4, 2] == 1  # patch centre is a lesion voxel


@pytest.mark.parametrize(("axis", "view"), [("sagittal", 0), ("coronal", 1), ("axial", 2)])
def test_slices_come_from_the_chosen_view(oblique_case, axis, view):
    case, _ = oblique_case
    cfg = PreprocessConfig(target_spacing=[1.0, 1.0, 2.0], slice_size=[32, 20], slice_axes=[axis],
                           samples_per_volume=3, positive_fraction=1.0, augment=True)
    pipeline = slice_train_transforms(cfg, label_values=(0, 1))
    pipeline.set_random_state(1)
    for sample in pipeline(case):
        assert sample["view"] == view
        assert sample["image"].shape == (3, 32, 20) and sample["label"].shape == (1, 32, 20)
        assert sample["label"].sum() > 0


def test_slice_views_are_drawn_uniformly(oblique_case):
    case, _ = oblique_case
    cfg = PreprocessConfig(slice_size=[16, 16], samples_per_volume=1, augment=False)
    pipeline = slice_train_transforms(cfg)
    pipeline.set_random_state(2)
    views = [pipeline(case)[0]["view"] for _ in range(30)]
    assert set(views) == {0, 1, 2}


def _half_bright(tmp_path, axis):
    """A RAS volume (24, 20, 12) at 0 HU whose upper half along `axis` is 60 HU, lesion in the middle."""
    image = np.zeros((24, 20, 12), np.float32)
    image[(slice(None),) * axis + (slice(image.shape[axis] // 2, None),)] = 60.0
    label = np.zeros(image.shape, np.uint8)
    label[10:14, 8:12, 4:8] = 1
    return {"image": str(save_nifti(tmp_path / "img.nii.gz", image, np.eye(4))),
            "label": str(save_nifti(tmp_path / "lbl.nii.gz", label, np.eye(4))), "case_id": "half"}


@pytest.mark.parametrize(("view", "bright_axis", "flips"), [("sagittal", 1, False), ("axial", 0, True)])
def test_slice_flips_are_left_right_only(tmp_path, view, bright_axis, flips):
    """A sagittal slice (Y, Z) is never mirrored front to back; axial slices are mirrored left/right."""
    case = _half_bright(tmp_path, bright_axis)
    cfg = PreprocessConfig(windows=[[40, 80]], crop_foreground=False, slice_size=[32, 32], slice_axes=[view],
                           samples_per_volume=1, augment=True)
    pipeline = slice_train_transforms(cfg, label_values=(0, 1))
    pipeline.set_random_state(0)
    bright_high = []
    for _ in range(20):
        image = pipeline(case)[0]["image"][0]  # in-plane axes (Y, Z) for sagittal, (X, Y) for axial
        low, high = image.split(16, dim=0)  # the 32-row slice is the volume padded symmetrically
        bright_high.append(bool(high.mean() > low.mean()))
    assert set(bright_high) == ({True, False} if flips else {True})


def test_mri_z_score(tmp_path):
    rng = np.random.default_rng(0)
    image = np.zeros((12, 12, 6), np.float32)
    image[2:10, 2:10, 1:5] = rng.normal(500, 80, (8, 8, 4))
    path = save_nifti(tmp_path / "t1.nii.gz", image, np.eye(4))
    out = inference_transforms(PreprocessConfig(intensity="mri"))({"image": str(path)})["image"]
    assert out.shape == (1, 8, 8, 4)  # cropped to the nonzero box
    assert abs(float(out.mean())) < 1e-4 and float(out.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("train", [patch_train_transforms, slice_train_transforms])
@pytest.mark.parametrize("augment", [True, False])
def test_training_pipelines_cache_only_the_validation_steps(train, augment):
    """Caches hold the steps before the first random one, under a key shared with validation."""
    cfg = PreprocessConfig(augment=augment)
    steps = train(cfg, (0, 1)).transforms
    first_random = next(i for i, t in enumerate(steps) if isinstance(t, Randomizable))
    assert [type(t) for t in steps[:first_random]] == [type(t) for t in val_transforms(cfg, (0, 1)).transforms]


def test_config_cache_key_tracks_only_cached_content():
    base = PreprocessConfig()
    assert base.cache_key() == PreprocessConfig().cache_key()
    assert base.cache_key() == PreprocessConfig(windows=[[40, 80], [80, 200], [600, 2800]]).cache_key()  # ints
    for same in (dict(patch_size=[32, 32, 16]), dict(cache="disk"), dict(augment=False), dict(cache_dir="/x")):
        assert PreprocessConfig(**same).cache_key() == base.cache_key()
    changed = [dict(windows=[[40, 80]]), dict(target_spacing=[1.0, 1.0, 1.0]), dict(orientation="LPS"),
               dict(crop_foreground=False), dict(intensity="mri"), dict(foreground_threshold=-200.0)]
    keys = {PreprocessConfig(**c).cache_key() for c in changed} | {base.cache_key()}
    assert len(keys) == len(changed) + 1


def test_config_is_hydra_friendly_and_validated():
    structured = OmegaConf.structured(PreprocessConfig)
    structured.windows = [[40, 80]]
    structured.target_spacing = [1, 1, 2]
    cfg = OmegaConf.to_object(structured)
    assert isinstance(cfg, PreprocessConfig) and cfg.in_channels == 1 and cfg.target_spacing == [1.0, 1.0, 2.0]
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown preprocessing options \['windw'\]"):
        PreprocessConfig.from_dict({"windw": [[40, 80]]})
    for bad, message in [(dict(intensity="pet"), "intensity must be one of"), (dict(cache="ssd"), "cache must be"),
                         (dict(windows=[[40, 0]]), r"window must be \[level, width > 0\]"),
                         (dict(target_spacing=[1.0, 1.0]), "needs 3 values"),
                         (dict(slice_axes=["oblique"]), "slice_axes must be"),
                         (dict(positive_fraction=1.5), "positive_fraction")]:
        with pytest.raises(ValueError, match=message):
            PreprocessConfig(**bad)


def test_z_scored_cases_darker_than_the_dataset_mean_still_give_negative_patches(tmp_path):
    """'ct_zscore' centres intensities on the dataset mean: a case darker than it is all <= 0 after
    normalisation, yet anatomy; its negative patches are centred anywhere in the volume, not refused."""
    image = np.full((12, 12, 8), -100.0, np.float32)  # below the dataset mean of 0 HU everywhere
    label = np.zeros(image.shape, np.uint8)
    label[5:7, 5:7, 3:5] = 1
    case = {"image": str(save_nifti(tmp_path / "dark.nii.gz", image, np.eye(4))),
            "label": str(save_nifti(tmp_path / "dark_lbl.nii.gz", label, np.eye(4))), "case_id": "dark"}
    cfg = PreprocessConfig(intensity="ct_zscore", clip_range=[[-1000.0, 1000.0]], norm_mean=[0.0], norm_std=[100.0],
                           patch_size=[4, 4, 4], samples_per_volume=6, positive_fraction=0.0, augment=False)
    patches = patch_train_transforms(cfg, label_values=(0, 1))(case)
    assert len(patches) == 6 and all(float(p["image"].max()) == pytest.approx(-1.0) for p in patches)
    assert all(p["label"].sum() < 64 for p in patches)  # negatives: none is the lesion alone
    flat = PreprocessConfig(intensity="zscore", background_value=[None], patch_size=[4, 4, 4])
    with pytest.raises(RuntimeError) as raised:  # MONAI's wrapper of the transform's error
        val_transforms(flat, label_values=(0, 1))(case)  # a constant volume z-scores to all 0
    assert re.search(r"case 'dark': image .*dark.nii.gz is constant: .*no contrast", str(raised.value.__cause__))
