"""Image files (NIfTI, PNG), written atomically with :func:`segadapt.io.write_atomic`."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Mapping

import nibabel as nib
import numpy as np

from segadapt.io import write_atomic


def nifti_image(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """NIfTI-1 image of `array` with voxel-to-RAS-mm `affine` as both qform and sform (code 1)."""
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    return image


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI-1 file (`.nii` or `.nii.gz`) with the given voxel-to-RAS-mm `affine`, atomically."""
    image = nifti_image(array, affine)
    return write_atomic(path, lambda tmp: nib.save(image, tmp))


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (rows are image rows)."""
    from PIL import Image

    return write_atomic(path, lambda tmp: Image.fromarray(np.asarray(array, dtype=np.uint8)).save(tmp, format="PNG"))


def remap_label_file(src: str | os.PathLike, dst: str | os.PathLike, mapping: Mapping[int, int] | None = None) -> Path:
    """Write a copy of NIfTI label map `src` to `dst` with values remapped, as uint8, same affine.

    `mapping` sends source values to new ones and every other value to 0; None binarises (> 0 -> 1).
    Example: BHSD's subtype map with ``{4: 1}`` keeps only subarachnoid blood.
    """
    image = nib.load(src)
    values = np.asarray(image.dataobj)
    if mapping is None:
        out = (values > 0).astype(np.uint8)
    else:
        out = np.zeros(values.shape, np.uint8)
        for old, new in mapping.items():
            out[values == old] = new
    return save_nifti(dst, out, image.affine)
