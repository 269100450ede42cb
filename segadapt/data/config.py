"""Preprocessing configuration: plain values only, so Hydra, YAML and the Lightning CLI can fill it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from segadapt.models import model_spec
from segadapt.models.multiview_unet import SLICE_AXES

INTENSITY_MODES = ("ct", "ct_zscore", "zscore", "mri", "rgb")
CACHE_MODES = ("none", "memory", "disk")
AXIS_VIEWS = {axis: view for view, axis in SLICE_AXES.items()}  # normal axis (RandSliced's 'view') -> view

# Bump when the deterministic (cached) part of the pipelines or the cache file format changes, to invalidate
# disk caches. 2: cache files hold MetaTensors (version 1 files were plain tensors, some padded for training).
# 3: labels hold class indices (declared values {0, 2} -> {0, 1}).
PIPELINE_VERSION = 3

# The fields that change what the deterministic part of a pipeline produces; they key the disk cache.
_CACHED_FIELDS = ("intensity", "target_spacing", "orientation", "spatial_dims", "crop_foreground",
                  "foreground_threshold")
# ... and those that only the named intensity mode reads (left out of other modes' keys, which stay as they were).
_MODE_FIELDS = {"ct": ("windows",), "ct_zscore": ("clip_range", "norm_mean", "norm_std"),
                "zscore": ("background_value",)}
MODE_FIELDS = _MODE_FIELDS  # (public name: segadapt.plan.apply fills them with the mode)


_INFINITY = {"inf", ".inf", "infinity"}


def parse_number(value: object, what: str = "value") -> float:
    """A float from a config value: a number, or a string YAML or a command line leaves unparsed -- '1.5',
    infinity as '.inf' (YAML), 'inf' / 'Infinity' (Python), each with an optional sign, any case.

    Examples: '.inf' -> inf, '-Infinity' -> -inf, 5 -> 5.0. Raises ValueError naming `what` otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        sign, body = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text[1:] if text[:1] == "+" else text)
        if body in _INFINITY:
            return sign * float("inf")
        try:
            return float(text)
        except ValueError:
            pass
    raise ValueError(f"{what}: {value!r} is not a number (infinity: .inf, inf or Infinity)")


def canonical(value: object, digits: int | None = None) -> object:
    """Numbers as floats (rounded to `digits` decimals when given) and sequences as lists, so [40, 80] and
    (40.0, 80.0) hash and compare alike."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value) if digits is None else round(float(value), digits)
    return [canonical(v, digits) for v in value]  # type: ignore[union-attr]


@dataclass
class PreprocessConfig:
    """How volumes become network inputs (see :mod:`segadapt.data.pipelines`).

    Deterministic (cached) part: orient -> resample -> crop to foreground -> intensity.
    Random (per-epoch) part: 3D patches or 2D slices, then augmentation.
    """

    intensity: str = "ct"
    """'ct': HU windows stacked as channels; 'ct_zscore': clip to `clip_range`, then (x - `norm_mean`) / `norm_std`
    (nnU-Net's CTNormalization, dataset-wide statistics); 'zscore': per-case z-score over the voxels that differ
    from `background_value`; 'mri': per-case z-score over nonzero voxels; 'rgb': x / 255.
    :func:`segadapt.plan.planner.make_plan` chooses one from the dataset's modality."""
    windows: list[list[float]] = field(default_factory=lambda: [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]])
    """CT windows as [level, width] in HU (brain, subdural, bone); channel c = clip((HU - L + W/2) / W, 0, 1)."""
    target_spacing: list[float] | None = None
    """Voxel size in mm to resample to (bilinear image, nearest label); None keeps the native grid."""
    orientation: str = "RAS"
    """Axis codes to reorient to (array axis i points along letter i)."""
    spatial_dims: int = 3
    """3 for volumes; 2 for plain 2D images (DRIVE)."""
    crop_foreground: bool = True
    """Crop to the bounding box of the foreground: voxels above `foreground_threshold` ('ct', 'ct_zscore'; the
    head / body), voxels differing from `background_value` ('zscore'; no crop without one), > 0 ('mri', 'rgb')."""
    foreground_threshold: float = -500.0
    """Raw-intensity threshold (HU) for the crop of 'ct' and 'ct_zscore'."""
    clip_range: list[list[float]] | None = None
    """'ct_zscore': [low, high] per image channel (the dataset's foreground 0.5 and 99.5 percentiles)."""
    norm_mean: list[float] | None = None
    """'ct_zscore': per image channel mean of the dataset's foreground intensities."""
    norm_std: list[float] | None = None
    """'ct_zscore': per image channel standard deviation of the dataset's foreground intensities (> 0)."""
    background_value: list[float | None] | None = None
    """'zscore': per image channel constant background value (e.g. air at 0 or 17); voxels equal to it are left
    out of the statistics, set to 0 and cropped away; None (or a None entry): no background, every voxel counts."""
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 32])
    """3D training patch size (padded up to where the volume is smaller)."""
    slice_size: list[int] = field(default_factory=lambda: [96, 96])
    """2D training slice size (each view's slice is padded/cropped to this)."""
    slice_axes: list[str] = field(default_factory=lambda: ["axial", "coronal", "sagittal"])
    """Views that 2D slices are drawn from, uniformly."""
    samples_per_volume: int = 4
    """Patches or slices drawn from one volume per visit."""
    positive_fraction: float = 0.5
    """Share of patches/slices centred on a lesion voxel; the rest centre on other foreground voxels."""
    augment: bool = True
    """Random flips, small rotations/zoom, intensity scale/shift and noise."""
    cache: str = "memory"
    """'none' (read every time), 'memory' (MONAI CacheDataset), 'disk' (MONAI PersistentDataset)."""
    cache_dir: str = "outputs/cache"
    """Root of the disk cache; each config writes under ``<cache_dir>/<dataset>-<cache_key()>``."""
    affine_tolerance: float = 1e-3
    """Largest allowed |image affine - label affine| entry (mm) before a case is rejected."""

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.intensity == "ct" and not self.windows:
            raise ValueError("intensity 'ct' needs at least one [level, width] window")
        for window in self.windows:
            if len(window) != 2 or window[1] <= 0:
                raise ValueError(f"each window must be [level, width > 0], got {window}")
        if self.intensity == "ct_zscore":
            self._check_ct_zscore()
        if self.target_spacing is not None and len(self.target_spacing) != self.spatial_dims:
            raise ValueError(f"target_spacing {self.target_spacing} needs {self.spatial_dims} values")
        if len(self.orientation) != self.spatial_dims:
            raise ValueError(f"orientation {self.orientation!r} needs {self.spatial_dims} axis codes")
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"patch_size {self.patch_size} needs {self.spatial_dims} values")
        if len(self.slice_size) != 2:
            raise ValueError(f"slice_size must have 2 values, got {self.slice_size}")
        unknown = set(self.slice_axes) - set(SLICE_AXES)
        if unknown or not self.slice_axes:
            raise ValueError(f"slice_axes must be a non-empty subset of {list(SLICE_AXES)}, got {self.slice_axes}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")

    def _check_ct_zscore(self) -> None:
        if self.clip_range is None or self.norm_mean is None or self.norm_std is None:
            raise ValueError("intensity 'ct_zscore' needs clip_range, norm_mean and norm_std (one entry per channel); "
                             "`segadapt plan DATASET_JSON` computes them")
        if not len(self.clip_range) == len(self.norm_mean) == len(self.norm_std) > 0:
            raise ValueError(f"clip_range, norm_mean and norm_std need one entry per channel, got "
                             f"{self.clip_range}, {self.norm_mean}, {self.norm_std}")
        for clip in self.clip_range:
            if len(clip) != 2 or not clip[0] < clip[1]:
                raise ValueError(f"each clip_range entry must be [low, high] with low < high, got {clip}")
        if any(not std > 0 for std in self.norm_std):
            raise ValueError(f"norm_std must be > 0 per channel, got {self.norm_std}")

    @property
    def in_channels(self) -> int:
        """Channels the network sees per image channel: one per window for CT, else one."""
        return len(self.windows) if self.intensity == "ct" else 1

    def cache_key(self) -> str:
        """Stable 16-hex-digit hash of the fields that change cached content (and the pipeline version).

        Equal configs give equal keys across runs and machines; changing a window, the spacing, the
        orientation, the crop, the intensity mode or its statistics gives a new key, hence a fresh disk-cache
        folder. A mode's own fields (e.g. ``windows`` of 'ct') key only that mode.
        """
        names = _CACHED_FIELDS + _MODE_FIELDS.get(self.intensity, ())
        values = {name: canonical(getattr(self, name)) for name in names}
        text = json.dumps({"version": PIPELINE_VERSION, **values}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessConfig:
        """Build from a plain mapping (e.g. ``OmegaConf.to_container(cfg.data)``); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown preprocessing options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


def training_sampling(model: Mapping[str, Any], preprocess: Mapping[str, Any]) -> str:
    """How one data group's training samples are drawn: 2D images (``preprocess.spatial_dims`` 2) always in
    2D ``patch_size`` patches, volumes as the model's spec says (``sampling`` of :class:`segadapt.models.ModelSpec`:
    'slice' for a 2D network, 'patch' for a 3D one). So a 2D target and a 3D source (or the reverse) of one run
    each get their own."""
    return "patch" if preprocess.get("spatial_dims") == 2 else model_spec(model["name"]).sampling
