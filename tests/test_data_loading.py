"""Bad input: each gives a clear error naming the case and file, and nothing reaches a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from segadapt.data import CaseError, LoadCased, PreprocessConfig, build_dataset, disk_cache_dir, val_transforms
from segadapt.data.files import save_nifti

AFFINE = np.diag([0.9, 0.9, 5.0, 1.0])


def _case(root: Path, name: str, image=None, label=None, label_affine=AFFINE) -> dict[str, str]:
    image = np.zeros((8, 8, 4), np.float32) if image is None else image
    label = np.zeros(image.shape[:3], np.uint8) if label is None else label
    return {
        "image": str(save_nifti(root / f"{name}_img.nii.gz", image, AFFINE)),
        "label": str(save_nifti(root / f"{name}_lbl.nii.gz", label, label_affine)),
        "case_id": name,
    }


def _root_cause(error: BaseException) -> BaseException:
    """MONAI wraps transform errors in RuntimeError('applying transform ...') chained from ours."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


LOAD = LoadCased(label_values=(0, 1))


def test_good_case_loads_and_label_takes_the_image_grid(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] = 5e-4  # within the 1e-3 mm tolerance
    out = LOAD(_case(tmp_path, "ok", label=np.ones((8, 8, 4), np.uint8), label_affine=shifted))
    assert out["image"].shape == (1, 8, 8, 4) and out["label"].shape == (1, 8, 8, 4)
    np.testing.assert_array_equal(out["label"].affine.numpy(), out["image"].affine.numpy())
    np.testing.assert_allclose(out["image"].affine.numpy(), AFFINE, atol=1e-6)


def test_missing_file(tmp_path):
    case = _case(tmp_path, "gone")
    Path(case["label"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"case 'gone': label not found: .*gone_lbl\.nii\.gz"):
        LOAD(case)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_gzip(tmp_path, damage):
    case = _case(tmp_path, "broken", image=np.random.default_rng(0).normal(size=(16, 16, 8)).astype(np.float32))
    raw = Path(case["image"]).read_bytes()
    Path(case["image"]).write_bytes(raw[: len(raw) // 2] if damage == "truncate" else raw[:10] + b"\x00" * 64)
    with pytest.raises(CaseError, match=r"case 'broken': cannot read image .*broken_img\.nii\.gz: \w+"):
        LOAD(case)


@pytest.mark.parametrize(
    ("image", "label", "label_affine", "message"),
    [
        (None, np.zeros((8, 7, 4), np.uint8), AFFINE,
         r"label .*bad_lbl\.nii\.gz has shape \(8, 7, 4\) x 1 channel\(s\); the image has spatial shape \(8, 8, 4\)"),
        (None, None, np.diag([0.9, 0.9, 5.5, 1.0]),
         r"label .*bad_lbl\.nii\.gz is not on the image's grid: affines differ by up to 0\.5 mm \(tolerance 0\.001\)"),
        (np.zeros((8, 8, 4, 2), np.float32), None, AFFINE,
         r"image .*bad_img\.nii\.gz has 2 channel\(s\) x spatial shape \(8, 8, 4\); expected 1 channel\(s\) x a 3D"),
        (np.where(np.eye(8)[:, :, None] > 0, np.nan, 0).repeat(4, 2).astype(np.float32), None, AFFINE,
         r"image .*bad_img\.nii\.gz has 32 NaN or infinite voxel\(s\)"),
        (np.full((8, 8, 4), np.inf, np.float32), None, AFFINE,
         r"image .*bad_img\.nii\.gz has 256 NaN or infinite voxel\(s\)"),
        (None, np.full((8, 8, 4), 3, np.uint8), AFFINE,
         r"label .*bad_lbl\.nii\.gz holds label values \[3\] not declared in dataset\.json labels \[0, 1\]"),
    ],
    ids=["shape", "affine", "4d", "nan", "inf", "label-values"],
)
def test_bad_case(tmp_path, image, label, label_affine, message):
    with pytest.raises(CaseError, match=r"case 'bad': " + message):
        LOAD(_case(tmp_path, "bad", image, label, label_affine))


def test_dicom_folder_with_mixed_series(tmp_path):
    for uid in ("1.2.3.1", "1.2.3.2"):
        piece = sitk.GetImageFromArray(np.zeros((4, 4), np.int16))
        piece.SetMetaData("0020|000e", uid)
        piece.SetMetaData("0008|0060", "CT")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(tmp_path / f"{uid}.dcm"))
        writer.Execute(piece)
    message = r"case 'scan': cannot read image .*: ValueError: DICOM folder .* mixes 2 series"
    with pytest.raises(CaseError, match=message):
        LoadCased(("image",))({"image": str(tmp_path), "case_id": "scan"})


def test_nothing_cached_from_a_bad_read(tmp_path):
    good = _case(tmp_path, "good", image=np.full((8, 8, 4), 40.0, np.float32))
    bad = _case(tmp_path, "bad", label=np.full((8, 8, 4), 7, np.uint8))
    cfg = PreprocessConfig(cache="disk", cache_dir=str(tmp_path / "cache"), crop_foreground=False)
    pipeline = val_transforms(cfg, label_values=(0, 1))
    dataset = build_dataset([good, bad], pipeline, cfg, name="toy")
    assert float(dataset[0]["image"][0].mean()) == pytest.approx(0.5)  # brain window 40/80: 40 HU -> 0.5
    with pytest.raises(RuntimeError) as info:
        dataset[1]
    assert isinstance(_root_cause(info.value), CaseError) and "case 'bad'" in str(_root_cause(info.value))
    cached = list(disk_cache_dir(cfg, "toy").iterdir())
    assert len(cached) == 1  # only the good case; no temporary leftovers either
    with pytest.raises(RuntimeError) as info:  # a memory cache refuses to build at all
        build_dataset([good, bad], pipeline, PreprocessConfig(cache="memory", crop_foreground=False), name="toy")
    assert "holds label values [7]" in str(_root_cause(info.value))
