"""Image reading: a SimpleITK-backed MONAI ``ImageReader`` and the ``LoadImaged`` that knows every format.

``nibabel`` (:class:`NiftiReader`, MONAI's ``NibabelReader``) reads ``.nii/.nii.gz``; :class:`SimpleITKReader`
reads ``.nrrd/.mha/.mhd`` files and DICOM series folders. :func:`make_loader` registers both on a
``LoadImaged`` so one transform reads all of them by suffix, each with its voxel-to-RAS affine in
``MetaTensor.affine`` (MONAI's convention, the same as nibabel's).

What would be silently wrong is refused with a ``ValueError`` naming the file: a header claiming more
voxels than fit in memory (:func:`check_header_size`, before any allocation), and a DICOM series whose
slices are not evenly spaced -- one missing, duplicated or misplaced (:func:`check_slice_spacing`; ITK
would stretch the series over one uniform grid with only a warning).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader, NibabelReader, PILReader
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

SITK_SUFFIXES = (".nrrd", ".mha", ".mhd")

# LPS (ITK/DICOM world) <-> RAS (NIfTI/MONAI world): flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def memory_bytes() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_header_size(path: str | os.PathLike, shape: Sequence[int], components: int = 1) -> None:
    """Refuse an image whose header claims more voxels than fit in memory, before any allocation.

    A voxel costs 4 bytes (the float32 the loader returns); a corrupt or hostile header (30000^3 voxels)
    would otherwise end in a MemoryError with no message, or the kernel's out-of-memory killer.

    Raises:
        ValueError: naming the file, the claimed shape and its size against this machine's memory.
    """
    voxels = math.prod(int(n) for n in shape) * max(int(components), 1)
    need, have = 4 * voxels, memory_bytes()
    if need > have:
        raise ValueError(f"image {path}: header claims shape {tuple(int(n) for n in shape)} ({voxels:.3g} voxels, "
                         f"{need / 2**30:.4g} GiB as float32), more than this machine's {have / 2**30:.4g} GiB of "
                         "memory (a corrupt header?)")


class NiftiReader(NibabelReader):
    """MONAI's ``NibabelReader`` with the header's size checked (:func:`check_header_size`) before the
    voxels are read (``nib.load`` reads only the header)."""

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs):
        images = super().read(data, **kwargs)
        for name, image in zip(ensure_tuple(data), ensure_tuple(images)):
            check_header_size(name, image.shape)
        return images


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def is_dicom_series(folder: str | os.PathLike) -> bool:
    """True if `folder` holds DICOM files of at least one series (GDCM's scan, not recursive)."""
    with _itk_warnings_off():  # GDCM warns on every folder without DICOM files
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def dicom_series_files(folder: str | os.PathLike) -> list[str]:
    """The files of the DICOM series in `folder`, in GDCM's slice order (the order the reader stacks them)."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))


def read_dicom_series(folder: str | os.PathLike) -> sitk.Image:
    """Read the single DICOM series in `folder` (slices sorted by position by GDCM).

    Raises:
        FileNotFoundError: the folder holds no DICOM series.
        ValueError: the folder mixes several series (their UIDs are listed).
    """
    folder = str(folder)
    with _itk_warnings_off():  # ITK prints a multi-line warning for a folder without DICOM; the error says it
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series:
        raise FileNotFoundError(f"no DICOM series found in folder {folder}")
    if len(series) > 1:
        raise ValueError(
            f"DICOM folder {folder} mixes {len(series)} series ({', '.join(series)}); "
            "put each series in its own folder"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0])
    check_slice_spacing(folder, _slice_positions(files))  # before the pixels are read
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _slice_positions(files: Sequence[str]) -> np.ndarray | None:
    """Each slice's position along the slice normal (mm) from its header; None without the tags."""
    headers = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not (reader.HasMetaDataKey("0020|0032") and reader.HasMetaDataKey("0020|0037")):
            return None  # no ImagePositionPatient / ImageOrientationPatient: nothing to check against
        headers.append((reader.GetMetaData("0020|0032"), reader.GetMetaData("0020|0037")))
    row_col = np.array(headers[0][1].split("\\"), dtype=np.float64)
    normal = np.cross(row_col[:3], row_col[3:])
    return np.array([np.array(position.split("\\"), dtype=np.float64) @ normal for position, _ in headers])


def check_slice_spacing(folder: str | os.PathLike, positions: np.ndarray | None, tolerance: float = 0.01) -> None:
    """Refuse a series whose slices are not evenly spaced (a missing, duplicated or misplaced slice).

    ITK builds one uniform grid from the first and last slice whatever lies between (and only warns),
    so a gap would silently stretch every slice. Every gap between neighbouring positions along the
    slice normal must equal the median gap to within `tolerance` (relative). DICOM positions are decimal
    strings; their rounding is far below 1%.

    Raises:
        ValueError: the gaps differ (the message lists the folder, the median and the gaps found).
    """
    if positions is None or len(positions) < 3:
        return
    gaps = np.diff(np.sort(positions))
    median = float(np.median(gaps))
    bad = np.abs(gaps - median) > tolerance * max(median, 1e-6)
    if bad.any():
        found = sorted({round(float(g), 4) for g in gaps})
        raise ValueError(
            f"DICOM series in {folder} is not evenly spaced: {int(bad.sum())} of {len(gaps)} slice gaps differ from "
            f"the median {median:.4g} mm (gaps found: {found[:8]} mm); a slice is missing, duplicated or misplaced"
        )


def sitk_affine(image: sitk.Image) -> np.ndarray:
    """Voxel index (i, j, k) -> RAS mm: diag(-1,-1,1) @ [direction @ diag(spacing) | origin] (ITK is LPS)."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    affine = np.eye(4)
    affine[:dim, :dim] = direction @ np.diag(image.GetSpacing())
    affine[:dim, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


class RefusedSeries:
    """A DICOM series :func:`read_dicom_series` refused; :meth:`SimpleITKReader.get_data` raises its `error`."""

    def __init__(self, error: ValueError) -> None:
        self.error = error


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
        """The images of `data`. A DICOM folder that cannot be used (uneven slices, several series) comes back as
        a :class:`RefusedSeries` that :meth:`get_data` raises: ``LoadImage(reader=SimpleITKReader())`` catches
        any error of ``read`` and falls back to MONAI's own readers, which read such a series silently."""
        images = []
        for name in ensure_tuple(data):
            if Path(name).is_dir():
                try:
                    images.append(read_dicom_series(name))
                except ValueError as error:
                    images.append(RefusedSeries(error))
            elif not Path(name).is_file():
                raise FileNotFoundError(f"image file not found: {name}")
            else:
                header = sitk.ImageFileReader()
                header.SetFileName(str(name))
                header.ReadImageInformation()
                check_header_size(name, header.GetSize(), header.GetNumberOfComponents())
                images.append(header.Execute())
        return images if len(images) > 1 else images[0]

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """(array, meta) of one image, or of several on one grid stacked as channels (axis 0)."""
        images = [img] if isinstance(img, (sitk.Image, RefusedSeries)) else list(img)  # an Image iterates over its pixels
        for image in images:
            if isinstance(image, RefusedSeries):
                raise image.error
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


class TiffReader(PILReader):
    """MONAI's ``PILReader`` (PNG, JPEG, BMP) for TIFF files too (Pillow reads them; MONAI's list leaves them out)."""

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        return all(str(f).lower().endswith((".tif", ".tiff")) for f in ensure_tuple(filename))


def make_loader(keys: str | Sequence[str], allow_missing_keys: bool = False) -> LoadImaged:
    """``LoadImaged`` (channel first, float32) that reads NIfTI, NRRD, MHA/MHD, PNG, JPEG, BMP, TIFF and DICOM
    series folders."""
    loader = LoadImaged(keys, ensure_channel_first=True, image_only=True, allow_missing_keys=allow_missing_keys)
    loader.register(TiffReader())
    loader.register(NiftiReader())
    loader.register(SimpleITKReader())
    return loader
