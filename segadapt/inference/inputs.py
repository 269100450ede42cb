"""What a prediction is asked for, checked before any network is built: the scans (image files, DICOM series
folders, or a folder of those), the probability threshold and the device.

Inputs: a NIfTI (``.nii``/``.nii.gz``), NRRD or MHA/MHD file, a DICOM series folder, a 2D image file (PNG,
JPEG, BMP, TIFF: for a run trained on 2D images), or a folder of those (:func:`find_inputs`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import SimpleITK as sitk
import torch

from segadapt.data.dataset_json import PIXEL_SUFFIXES
from segadapt.data.readers import dicom_series_files, is_dicom_series

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", *PIXEL_SUFFIXES)


def dicom_modality(folder: str | os.PathLike) -> Optional[str]:
    """The DICOM ``Modality`` (CT, MR, ...) of the series in `folder` (its first file's header), or None."""
    files = dicom_series_files(folder)
    if not files:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    reader.ReadImageInformation()  # the header only
    return reader.GetMetaData("0008|0060").strip() or None if reader.HasMetaDataKey("0008|0060") else None


def is_pixel_file(path: str | os.PathLike) -> bool:
    """A 2D image file without a physical pixel size (PNG, JPEG, BMP, TIFF)."""
    return Path(path).name.lower().endswith(PIXEL_SUFFIXES)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def input_name(path: str | os.PathLike) -> str:
    """Output stem of an input: the file name without its image suffix, or the DICOM folder's name."""
    name = Path(path).name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)]


def find_inputs(path: str | os.PathLike) -> list[Path]:
    """The scans `path` names: itself (an image file or a DICOM series folder), or the image files and
    DICOM series sub-folders of a folder, sorted by name.

    Raises:
        FileNotFoundError: `path` does not exist, or a folder holds no scan.
        ValueError: `path` is a file of an unsupported type.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        if not is_image_file(path):
            raise ValueError(f"{path} is not a supported scan: give a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or "
                             "MHA/MHD file, a 2D image (PNG, JPEG, BMP, TIFF), or the folder of a DICOM series")
        return [path]
    if is_dicom_series(path):
        return [path]
    found = [p for p in sorted(path.iterdir()) if is_image_file(p) or (p.is_dir() and is_dicom_series(p))]
    if not found:
        raise FileNotFoundError(f"no NIfTI, NRRD, MHA/MHD, PNG, JPEG, BMP or TIFF file or DICOM series folder in {path}")
    return found


def check_threshold(threshold: float) -> float:
    """`threshold` as a float, refused unless 0 < threshold < 1 (a probability cut-off)."""
    value = float(threshold)
    if not 0.0 < value < 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    return value


def resolve_device(device: Optional[str]) -> torch.device:
    """`device` (default: CUDA when available, else CPU), refused when it is not on this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU that torch can use; "
                             "use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r} asked for, but this machine has {count} CUDA GPU(s)")
    return resolved
