"""Image reading: a SimpleITK-backed MONAI ``ImageReader`` and the ``LoadImaged`` that knows every format.

``nibabel`` (MONAI's ``NibabelReader``) reads ``.nii/.nii.gz``; :class:`SimpleITKReader` reads
``.nrrd/.mha/.mhd`` files and DICOM series folders. :func:`make_loader` registers the latter on a
``LoadImaged`` so one transform reads all of them by suffix, each with its voxel-to-RAS affine in
``MetaTensor.affine`` (MONAI's convention, the same as nibabel's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

SITK_SUFFIXES = (".nrrd", ".mha", ".mhd")

# LPS (ITK/DICOM world) <-> RAS (NIfTI/MONAI world): flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_dicom_series(folder: str | os.PathLike) -> sitk.Image:
    """Read the single DICOM series in `folder` (slices sorted by position by GDCM).

    Raises:
        FileNotFoundError: the folder holds no DICOM series.
        ValueError: the folder mixes several series (their UIDs are listed).
    """
    folder = str(folder)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series:
        raise FileNotFoundError(f"no DICOM series found in folder {folder}")
    if len(series) > 1:
        raise ValueError(
            f"DICOM folder {folder} mixes {len(series)} series ({', '.join(series)}); "
            "put each series in its own folder"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0]))
    return reader.Execute()


def sitk_affine(image: sitk.Image) -> np.ndarray:
    """Voxel index (i, j, k) -> RAS mm: diag(-1,-1,1) @ [direction @ diag(spacing) | origin] (ITK is LPS)."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    affine = np.eye(4)
    affine[:dim, :dim] = direction @ np.diag(image.GetSpacing())
    affine[:dim, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


class SimpleITKReader(ImageReader):
    """MONAI ``ImageReader`` for NRRD/MHA/MHD files and DICOM series folders, using SimpleITK.

    Arrays come back in ITK index order (x, y, z), channel last for vector images, exactly like MONAI's
    ``ITKReader`` with ``reverse_indexing=False``; ``affine`` maps those indices to RAS millimetres.

    Example::

        loader = LoadImaged(keys="image", ensure_channel_first=True)
        loader.register(SimpleITKReader())
        loader({"image": "ct_dicom/"})["image"]   # MetaTensor (1, X, Y, Z), .affine in RAS
    """

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        return all(Path(f).is_dir() or str(f).lower().endswith(SITK_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs) -> sitk.Image | list[sitk.Image]:
        images = []
        for name in ensure_tuple(data):
            if Path(name).is_dir():
                images.append(read_dicom_series(name))
            elif not Path(name).is_file():
                raise FileNotFoundError(f"image file not found: {name}")
            else:
                images.append(sitk.ReadImage(str(name)))
        return images if len(images) > 1 else images[0]

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """(array, meta) of one image, or of several on one grid stacked as channels (axis 0)."""
        images = [img] if isinstance(img, sitk.Image) else list(img)  # an Image iterates over its pixels
        pairs = [self._array_and_meta(image) for image in images]
        if len(pairs) == 1:
            return pairs[0]
        array0, meta = pairs[0]
        for array, other in pairs[1:]:
            if array.shape != array0.shape or not np.allclose(other[MetaKeys.AFFINE], meta[MetaKeys.AFFINE]):
                raise ValueError("images to stack as channels must share one grid (shape and affine)")
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack([array for array, _ in pairs]), meta

    @staticmethod
    def _array_and_meta(image: sitk.Image) -> tuple[np.ndarray, dict]:
        array = sitk.GetArrayFromImage(image)  # numpy order (z, y, x[, c])
        vector = image.GetNumberOfComponentsPerPixel() > 1
        array = np.moveaxis(array.T, 0, -1) if vector else array.T  # -> (x, y, z[, c])
        meta = {
            MetaKeys.AFFINE: sitk_affine(image),
            MetaKeys.ORIGINAL_AFFINE: sitk_affine(image),
            MetaKeys.SPATIAL_SHAPE: np.asarray(image.GetSize()),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if vector else float("nan"),
            "spacing": np.asarray(image.GetSpacing()),
        }
        return array, meta


def make_loader(keys: str | Sequence[str], allow_missing_keys: bool = False) -> LoadImaged:
    """``LoadImaged`` (channel first, float32) that reads NIfTI, NRRD, MHA/MHD, PNG and DICOM series folders."""
    loader = LoadImaged(keys, ensure_channel_first=True, image_only=True, allow_missing_keys=allow_missing_keys)
    loader.register(SimpleITKReader())
    return loader
