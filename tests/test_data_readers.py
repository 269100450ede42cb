"""Readers: every format gives the array and RAS affine that nibabel / the DICOM header say it should."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segadapt.data import SimpleITKReader, make_loader
from segadapt.data.readers import read_dicom_series


def _load(path: Path):
    return make_loader("image")({"image": str(path)})["image"]


def _oblique_image() -> sitk.Image:
    """A small int16 volume with anisotropic spacing, an origin and a rotated, flipped direction."""
    array = np.random.default_rng(0).integers(-1000, 2000, (7, 6, 5), dtype=np.int16)  # numpy (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((12.5, -30.0, 4.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0))
    return image


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_sitk_formats_match_nibabel_on_the_same_image(tmp_path, suffix):
    image = _oblique_image()
    sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))  # SimpleITK writes a RAS NIfTI header
    ours, reference = _load(tmp_path / f"ct{suffix}"), _load(tmp_path / "ct.nii.gz")
    nifti = nib.load(tmp_path / "ct.nii.gz")
    assert ours.shape == (1, 5, 6, 7)
    np.testing.assert_array_equal(ours[0].numpy(), np.asarray(nifti.dataobj))
    np.testing.assert_allclose(ours.affine.numpy(), nifti.affine, atol=1e-4)
    np.testing.assert_allclose(ours.affine.numpy(), reference.affine.numpy(), atol=1e-4)


def test_nifti_goes_through_nibabel(tmp_path):
    affine = np.array([[-0.8, 0, 0, 90], [0, 0, 2.5, -10], [0, 0.8, 0, 40], [0, 0, 0, 1]])  # non-RAS axes
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    nib.save(nib.Nifti1Image(array, affine), tmp_path / "x.nii")
    loaded = _load(tmp_path / "x.nii")
    np.testing.assert_array_equal(loaded[0].numpy(), array)
    np.testing.assert_allclose(loaded.affine.numpy(), affine)
    assert not SimpleITKReader().verify_suffix(str(tmp_path / "x.nii"))


def test_dicom_series_folder(tmp_path, write_dicom_series):
    image = sitk.GetImageFromArray(np.random.default_rng(1).integers(-1000, 1000, (4, 6, 5), dtype=np.int16))
    image.SetSpacing((0.8, 0.6, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    write_dicom_series(tmp_path / "series", image, "1.2.826.0.1.3680043.2.1125.1")
    loaded = _load(tmp_path / "series")
    assert loaded.shape == (1, 5, 6, 4)
    np.testing.assert_array_equal(loaded[0].numpy(), sitk.GetArrayFromImage(image).T)
    expected = np.diag([-0.8, -0.6, 2.5, 1.0])  # LPS -> RAS flips x and y
    expected[:3, 3] = [-10.0, 20.0, 30.0]
    np.testing.assert_allclose(loaded.affine.numpy(), expected, atol=1e-4)


def test_dicom_folder_with_mixed_series_is_rejected(tmp_path, write_dicom_series):
    image = sitk.GetImageFromArray(np.zeros((3, 4, 4), np.int16))
    write_dicom_series(tmp_path / "mixed", image, "1.2.826.0.1.3680043.2.1125.7")
    write_dicom_series(tmp_path / "mixed", image, "1.2.826.0.1.3680043.2.1125.8", first_instance=10)
    with pytest.raises(ValueError, match=r"DICOM folder .*mixed mixes 2 series \(1\.2\.826.*\.7, 1\.2\.826.*\.8\)"):
        read_dicom_series(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no DICOM series found in folder"):
        read_dicom_series(tmp_path / "empty")


def test_real_ct_nifti_and_its_nrrd_copy(shared_data, tmp_path):
    path = shared_data / "ct_abdomen_totalseg" / "ct.nii.gz"
    loaded, reference = _load(path), nib.load(path)
    np.testing.assert_array_equal(loaded[0].numpy(), reference.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(loaded.affine.numpy(), reference.affine, atol=1e-5)
    assert loaded.min() < -900 and loaded.max() > 500  # Hounsfield units: air and bone
    sitk.WriteImage(sitk.ReadImage(str(path)), str(tmp_path / "ct.nrrd"))
    as_nrrd = _load(tmp_path / "ct.nrrd")
    np.testing.assert_array_equal(as_nrrd.numpy(), loaded.numpy())
    np.testing.assert_allclose(as_nrrd.affine.numpy(), loaded.affine.numpy(), atol=1e-4)


def test_real_dicom_series_geometry_from_its_headers(shared_data):
    folder = shared_data / "ct_abdomen_totalseg" / "ct_dicom"
    loaded = _load(folder)
    # Reference: the DICOM geometry rules applied to the raw tags of the first and last slice.
    headers = []
    for f in sorted(folder.iterdir()):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        headers.append({t: reader.GetMetaData(t) for t in ("0020|0032", "0020|0037", "0028|0030")})
    orientation = np.array(headers[0]["0020|0037"].split("\\"), float)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = sorted((np.array(h["0020|0032"].split("\\"), float) for h in headers), key=lambda p: p @ normal)
    row_spacing, col_spacing = (float(v) for v in headers[0]["0028|0030"].split("\\"))
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * col_spacing, col * row_spacing
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    lps[:3, 3] = positions[0]
    assert loaded.shape == (1, 512, 512, len(headers))
    np.testing.assert_allclose(loaded.affine.numpy(), np.diag([-1, -1, 1, 1]) @ lps, atol=1e-3)
    assert -1100 < float(loaded.min()) < -900 and float(loaded.max()) > 300
