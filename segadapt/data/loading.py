"""Reading one case and rejecting it, with the case and file named, when it cannot be used.

:class:`LoadCased` is the first step of every pipeline. It reads the image (and label) through
:func:`~segadapt.data.readers.make_loader` and runs :func:`check_case` before anything can be cached, so a
bad file never reaches a memory or disk cache. MONAI re-raises an error inside a ``Compose`` as
``RuntimeError("applying transform ...")`` chained *from* ours; the first exception printed in the
traceback is the :class:`CaseError` (or ``FileNotFoundError``) that names the case and the file.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .readers import make_loader


class CaseError(ValueError):
    """A case that cannot be used: unreadable file, wrong dimensions, grids that disagree, NaN/inf voxels,
    label values not declared in ``dataset.json``."""


def _source(tensor: object) -> str:
    return str(tensor.meta.get("filename_or_obj", "?")) if isinstance(tensor, MetaTensor) else "?"


def _describe_grid(affine: torch.Tensor) -> str:
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(a[:-1, :-1], axis=0)
    return f"spacing {np.round(spacing, 4).tolist()} origin {np.round(a[:-1, -1], 4).tolist()}"


def _check_grid(image: torch.Tensor, where: str, spatial_dims: int) -> None:
    """Refuse a voxel-to-world affine without a usable voxel size
    (a zero, NaN or infinite spacing, or axes that coincide: determinant 0), which MONAI's orientation step
    reports as "Unable to find out axis ... in start_ornt" without naming the file."""
    if not isinstance(image, MetaTensor):
        return
    a = np.asarray(image.affine, dtype=np.float64)[:spatial_dims, :spatial_dims]
    spacing = np.linalg.norm(a, axis=0)
    if not (np.isfinite(a).all() and (spacing > 0).all() and abs(np.linalg.det(a)) > 1e-12 * np.prod(spacing)):
        raise CaseError(f"{where} has a voxel-to-world affine without a usable voxel size (spacing "
                        f"{np.round(spacing, 4).tolist()} mm, determinant {np.linalg.det(a):.4g}): a zero or "
                        "missing pixdim / sform / qform in the header?")


def check_case(
    data: Mapping[Hashable, object],
    label_values: Sequence[int] | None = None,
    channels: int = 1,
    spatial_dims: int = 3,
    affine_tolerance: float = 1e-3,
) -> None:
    """Raise :class:`CaseError` unless the loaded ``image`` (and ``label`` if present) can be used.

    ``data['image']`` is a channel-first MetaTensor (channels, *spatial); ``data['label']`` likewise
    with one channel. Checks: `channels` x `spatial_dims`-D image; finite voxels; label on the image's
    grid (same shape, affines equal to within `affine_tolerance` mm per entry); label values a subset of
    `label_values` (None skips that check).
    """
    case = data.get("case_id", "?")
    image = data["image"]
    where = f"case {case!r}: image {_source(image)}"
    if image.numel() == 0:
        raise CaseError(f"{where} holds no voxel (array shape {tuple(image.shape)}): an axis of length 0")
    if image.ndim - 1 != spatial_dims or image.shape[0] != channels:
        hint = f"a {image.ndim - 1}D image where {spatial_dims}D is expected" if image.ndim - 1 < spatial_dims else \
            "a 4D/time-series or wrongly stacked image?"
        raise CaseError(
            f"{where} has {image.shape[0]} channel(s) x spatial shape {tuple(image.shape[1:])}; expected {channels} "
            f"channel(s) x a {spatial_dims}D grid ({hint})"
        )
    _check_grid(image, where, spatial_dims)
    if not torch.isfinite(image).all():
        bad = int((~torch.isfinite(image)).sum())
        raise CaseError(f"{where} has {bad} NaN or infinite voxel(s)")
    label = data.get("label")
    if label is None:
        return
    where = f"case {case!r}: label {_source(label)}"
    if label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
        raise CaseError(
            f"{where} has shape {tuple(label.shape[1:])} x {label.shape[0]} channel(s); the image has spatial "
            f"shape {tuple(image.shape[1:])} and the label must be one channel on the same grid"
        )
    deviation = float((label.affine - image.affine).abs().max())
    if deviation > affine_tolerance:
        raise CaseError(
            f"{where} is not on the image's grid: affines differ by up to {deviation:.4g} mm "
            f"(tolerance {affine_tolerance}); image {_describe_grid(image.affine)}, "
            f"label {_describe_grid(label.affine)}"
        )
    if label_values is None:
        if not torch.isfinite(label).all():
            raise CaseError(f"{where} has NaN or infinite values")
        return
    values = label.as_tensor()
    declared = torch.isin(values, torch.tensor([float(v) for v in label_values], dtype=values.dtype))
    if not declared.all():  # NaN and inf are undeclared values too
        undeclared = [int(v) if float(v).is_integer() else v for v in torch.unique(values[~declared]).tolist()]
        raise CaseError(
            f"{where} holds label values {undeclared} not declared in dataset.json labels {sorted(label_values)}"
        )


class LoadCased(MapTransform):
    """Read ``image`` (and ``label``) of a case dict, check it with :func:`check_case`, return MetaTensors.

    The label is put exactly on the image's affine once the check has passed, so later spatial
    transforms treat both identically, and its declared values become class indices (:func:`label_classes`).

    Args:
        keys: the path keys to read; ``("image",)`` for inference.
        label_values, channels, spatial_dims, affine_tolerance: see :func:`check_case`.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image", "label"),
        label_values: Sequence[int] | None = None,
        channels: int = 1,
        spatial_dims: int = 3,
        affine_tolerance: float = 1e-3,
    ) -> None:
        super().__init__(keys)
        self.loader = make_loader(keys, allow_missing_keys=True)
        self.label_values = None if label_values is None else tuple(label_values)
        self.channels, self.spatial_dims, self.affine_tolerance = channels, spatial_dims, affine_tolerance

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        case = d.get("case_id", "?")
        for key in self.key_iterator(d):
            many = isinstance(d[key], (list, tuple))  # one file per channel (nnU-Net), stacked by the reader
            paths = [Path(str(p)) for p in d[key]] if many else [Path(str(d[key]))]
            for path in paths:
                if not path.exists():
                    raise FileNotFoundError(f"case {case!r}: {key} not found: {path}")
            path = [str(p) for p in paths] if many else str(paths[0])
            try:
                d[key] = self.loader({key: path})[key]
            except Exception as e:  # any reader failure (corrupt gzip, bad header, mixed DICOM series, ...)
                why = _broken_gzip(paths) or f"{type(e).__name__}: {e}"
                raise CaseError(f"case {case!r}: cannot read {key} {path}: {why}") from e
        check_case(d, self.label_values, self.channels, self.spatial_dims, self.affine_tolerance)
        if "label" in d:
            d["label"].affine = d["image"].affine.clone()
            if self.label_values is not None:
                d["label"] = label_classes(d["label"], self.label_values)
        return d


def _broken_gzip(paths: Sequence[Path]) -> str | None:
    """Why one of the ``.gz`` files in `paths` is not a whole gzip stream (truncated copy, interrupted download),
    or None; nibabel reports such a file as "Cannot work out file type"."""
    for path in paths:
        if path.is_file() and path.name.lower().endswith(".gz"):
            try:
                with gzip.open(path, "rb") as handle:
                    while handle.read(1 << 24):
                        pass
            except (OSError, EOFError, zlib.error) as error:
                return f"{path.name} is a truncated or corrupt gzip file ({type(error).__name__}: {error})"
    return None


def label_classes(label: torch.Tensor, label_values: Sequence[int]) -> torch.Tensor:
    """Declared label values as class indices: the i-th of the sorted `label_values` becomes i, so the loss sees
    0 .. K-1 (``{0: background, 2: lesion}``: 2 becomes the foreground 1; a sigmoid or one-hot target has no
    other meaning). Values already 0 .. K-1 are returned as they are."""
    values = sorted(int(v) for v in label_values)
    if values == list(range(len(values))):
        return label
    return torch.searchsorted(torch.tensor(values, dtype=label.dtype), label.contiguous()).to(label.dtype)


class RequireForegroundd(MapTransform):
    """Refuse a case whose preprocessed ``image`` has no voxel above 0 (``nonzero``: no voxel other than 0, for
    z-scored images, which a constant volume leaves all 0) (CaseError naming the case and file).

    Placed at the end of the deterministic pipeline: after the foreground crop and the intensity step,
    an all-air or blank volume is empty (nothing above the crop threshold) or all zeros, and would
    otherwise fail in MONAI's patch sampler with "No sampling location available." (or be scored as
    an empty volume). `what` says what "foreground" meant, for the message; with `zscored` (the intensity step
    z-scores), a volume that is left but constant is refused as constant, not as all-air.
    """

    def __init__(self, keys: Sequence[str] = ("image",), what: str = "above 0 after intensity scaling",
                 nonzero: bool = False, zscored: bool = False) -> None:
        super().__init__(keys)
        self.what, self.nonzero, self.zscored = what, nonzero, zscored

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        for key in self.key_iterator(data):
            image = data[key]
            if image.numel() == 0 or not bool(((image != 0) if self.nonzero else (image > 0)).any()):
                if self.zscored and image.numel() and bool((image == image.flatten()[0]).all()):
                    raise CaseError(f"case {data.get('case_id', '?')!r}: {key} {_source(image)} is constant: all "
                                    f"{tuple(image.shape[1:])} voxels left after cropping have one value, so the "
                                    "z-score leaves no contrast to segment")
                raise CaseError(f"case {data.get('case_id', '?')!r}: {key} {_source(image)} has no foreground voxel "
                                f"({self.what}; shape after cropping {tuple(image.shape[1:])}): an all-air or blank "
                                "volume cannot be sampled or scored")
        return data
