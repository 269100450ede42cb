"""Dataset fingerprint and plan: nnU-Net v2's self-configuration rules, as plain data.

::

    fp = fingerprint("data/x/dataset.json")                # reads every training case once
    plan = make_plan(fp, memory_gb=8)                       # -> Plan (to_json / from_json)
    PreprocessConfig.from_dict({**defaults, **plan.preprocess_fields()})
    plan.network_fields()["dynunet"]                        # kernel_size, strides, filters, ...
    plan = load_or_make_plan("data/x/dataset.json", "outputs/plans")   # cached by the dataset's content
    segadapt plan DATASET_JSON [--out plan.json] [--memory-gb 8] [--overwrite]   # prints every planned value

Fingerprint, per case, on the grid the pipeline reads (reoriented to `orientation`, native spacing): spacing,
shape, crop shape (bounding box of the voxels that differ from the case's background), background value per
channel (:func:`no_signal_value`: the value filling >= 90% of the outer faces, else 0 when the channel has
zeros and no negative value; None otherwise), intensity statistics inside
the labels (label > 0) and of the whole image (every voxel, or an even stride of 10^6 of them) per channel,
the whole image's quantiles (``QUANTILE_LEVELS``), label volumes in mL (the whole-image range and quantiles
are what ``segadapt predict`` checks an input against). Dataset-wide: intensity statistics of 10^4
foreground voxels drawn per case (seeded, with replacement, so every case weighs alike: nnU-Net's
``collect_foreground_intensities``), the same of 10^4 body voxels per case (CT: HU > -500; else the voxels
differing from the background) with the share of them inside the foreground's 0.5-99.5 percentiles, and the
background per channel (the value more than half the cases share; else 0 when no case has a value below 0
and some hold zeros).

Plan (reference: nnU-Net v2 ``default_experiment_planner.py``, ``network_topology.py`` and
``default_normalization_schemes.py``):

* target spacing: the median spacing per axis. Anisotropy: when the coarsest axis's median spacing is
  > 3x the largest other one and its median size x 3 < the smallest other size, that axis gets the 10th
  percentile of its spacings instead (not below the largest other spacing).
* median shape: the per-axis median over cases of round(crop shape x spacing / target spacing).
* topology (:func:`pooling_topology`): an axis is pooled (stride 2) while its feature-map size is >= 8 and
  its spacing is within 2x of the finest; kernels are 3, or 1 on an axis while its spacing is >= 2x the
  finest (1x3x3 for thick slices); the patch is padded to a multiple of 2^(poolings) per axis.
* 3D patch (:func:`fit_patch`): start from the spacing's aspect ratio scaled to 256^3 voxels, clipped to
  the median shape; while it holds more than the voxel budget, shrink the axis that is largest relative to
  the median shape by one divisor step. 2D slices: the same on a square of the median shape's largest
  edge at the finest spacing (one size fits the slices of every view of the multi-view network).
* batch size: 2 (3D; 12 for 2D) x budget / patch voxels, at most 5% of the dataset's voxels per batch, at
  least 2. Budgets scale with ``memory_gb`` from nnU-Net's 8 GB reference, taken as 128^3 voxels per 3D
  patch at batch 2 and 512^2 pixels per 2D slice at batch 12 (a voxel count standing in for nnU-Net's
  feature-map estimate).
* normalisation from ``dataset.json`` ``modality`` / ``channel_names``: CT -> 'ct_zscore' (clip to the
  foreground 0.5-99.5 percentiles, z-score with the foreground mean and std, as nnU-Net, when that range
  holds >= 25% of the body's voxels; else the same over the body: a lesion target, see
  :func:`_ct_normalisation`); RGB -> 'rgb' (x / 255); MRI and anything else -> 'mri' (z-score over the
  nonzero voxels) when every channel's background is 0, else 'zscore' (per case, over the voxels that
  differ from the detected background; the whole volume when none is detected).
  ``intensity='ct'`` asks for HU windows as channels instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
from monai.transforms import Orientationd

from segadapt.io import check_output_file, write_json
from segadapt.models.registry import MODELS
from segadapt.parsers import plan_parser

from .config import INTENSITY_MODES, PreprocessConfig
from .dataset_json import DatasetDescription, load_dataset_json
from .loading import LoadCased
from .transforms import differs_from_background

FINGERPRINT_VERSION = 2  # 2: per-case whole-image intensity statistics ('image_intensity')
PLAN_VERSION = 1

FOREGROUND_SAMPLES = 10_000       # foreground voxels drawn per case and channel for the dataset statistics
IMAGE_SAMPLES = 1_000_000         # at most this many voxels (an even stride) per case for the whole-image statistics
BACKGROUND_FRACTION = 0.9         # share of the outer faces one value must fill to be the background
BODY_HU = PreprocessConfig().foreground_threshold  # CT voxels above this (HU) are the body: the pipeline's crop
MIN_BODY_IN_FOREGROUND_RANGE = 0.25  # nnU-Net's CT clip serves when this share of the body lies inside it
ANISOTROPY_THRESHOLD = 3.0        # nnU-Net's ANISO_THRESHOLD
MIN_FEATURE_MAP = 4               # smallest bottleneck edge: an axis is pooled while its size >= 2 x this
REFERENCE_GB = 8.0                # nnU-Net's reference GPU memory
REFERENCE_PATCH_VOXELS = 128**3   # 3D patch voxels at batch REFERENCE_BATCH_3D in REFERENCE_GB
REFERENCE_SLICE_PIXELS = 512**2   # 2D slice pixels at batch REFERENCE_BATCH_2D in REFERENCE_GB
REFERENCE_BATCH_3D, REFERENCE_BATCH_2D = 2, 12
MIN_BATCH_SIZE = 2
MAX_DATASET_FRACTION = 0.05       # one batch covers at most this share of the dataset's voxels
BASE_FILTERS, MAX_FILTERS_3D, MAX_FILTERS_2D = 32, 320, 512
_PERCENTILES = (0.5, 50.0, 99.5)
QUANTILE_LEVELS = tuple(range(1, 100))  # percentiles of 'image_quantiles': 1, 2, ..., 99


# ----------------------------------------------------------------------------------------- 2D or 3D, units

PIXEL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # 2D image files without a physical pixel size


def dataset_spatial_dims(description: DatasetDescription) -> int:
    """2 when the dataset's images are 2D image files (PNG, JPEG, BMP: e.g. DRIVE), else 3 (NIfTI, NRRD, DICOM)."""
    suffixes = {case.image.suffix.lower() in PIXEL_SUFFIXES for case in description.cases}
    if len(suffixes) > 1:
        raise ValueError(f"{description.path}: mixes 2D image files ({', '.join(PIXEL_SUFFIXES)}) and volumes")
    return 2 if suffixes == {True} else 3


def size_unit(description: DatasetDescription, spatial_dims: int) -> str:
    """The unit of lesion sizes (:func:`segadapt.training.metrics.mask_volume_ml`): 'mL' for volumes,
    'mm^2' for 2D images with a pixel spacing, 'px' for 2D image files without one (PNG, JPEG, BMP)."""
    if spatial_dims == 3:
        return "mL"
    return "px" if dataset_spatial_dims(description) == 2 else "mm^2"


# ----------------------------------------------------------------------------------------------- fingerprint


def border_background(channel: np.ndarray, fraction: float = BACKGROUND_FRACTION) -> float | None:
    """The value that fills at least `fraction` of the outer faces of one channel (a spatial array), else None.

    Example: a head CT padded with -1024 outside the field of view -> -1024.0; an MRI crop whose border
    runs through tissue -> None.
    """
    faces = np.concatenate([np.take(channel, i, axis=a).ravel() for a in range(channel.ndim) for i in (0, -1)])
    values, counts = np.unique(faces, return_counts=True)
    best = int(counts.argmax())
    return float(values[best]) if counts[best] >= fraction * faces.size else None


def no_signal_value(channel: np.ndarray) -> float | None:
    """The value of one channel that carries no signal (its background), else None.

    * A value filling >= 90% of the outer faces (:func:`border_background`): air or padding around the body,
      e.g. CT's -1024 or -3024 padding, a skull-stripped MRI's 0, a masked pre-normalised MRI's -0.8.
    * Else 0 when the channel has no negative value and holds exact zeros: a magnitude image (MRI) has no
      tissue at exactly 0, so its zeros are no signal (outside the field of view, masked, or noise clipped
      at the floor; the hippocampus MRIs: 5 to 12 isolated zeros in dark regions, the smallest positive
      value about 6). In a signed image (CT in HU, a pre-normalised MRI) 0 is an intensity like any other
      (water, the mean) and is never the background by this rule.
    """
    border = border_background(channel)
    if border is not None:
        return border
    return 0.0 if channel.size and channel.min() == 0 else None


def body_mask(channel: np.ndarray, scheme: str, background: float | None) -> np.ndarray:
    """The body's voxels of one channel: HU above the pipeline's crop threshold (-500) for CT ('ct_zscore'),
    else the voxels differing from the channel's no-signal value (every voxel when there is none)."""
    if scheme == "ct_zscore":
        return channel > BODY_HU
    if background is None:
        return np.ones(channel.shape, bool)
    return differs_from_background(channel, background)


def intensity_statistics(values: np.ndarray) -> dict[str, float | None]:
    """mean, std (population), median, min, max and the 0.5 / 99.5 percentiles of `values` (None if empty)."""
    keys = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")
    if values.size == 0:
        return dict.fromkeys(keys)
    values = values.astype(np.float64, copy=False)
    low, median, high = np.percentile(values, _PERCENTILES)
    stats = (values.mean(), values.std(), median, values.min(), values.max(), low, high)
    return {k: float(v) for k, v in zip(keys, stats)}


def _image_statistics(channel: np.ndarray) -> dict[str, float | None]:
    """:func:`intensity_statistics` of a whole channel: min and max over every voxel, the rest over an even
    stride of at most :data:`IMAGE_SAMPLES` voxels (a 512^2 x 300 CT needs no full sort for its percentiles)."""
    values = channel.ravel()
    stats = intensity_statistics(values[:: max(1, values.size // IMAGE_SAMPLES)])
    if values.size:
        stats.update(min=float(values.min()), max=float(values.max()))
    return stats


def image_quantiles(channel: np.ndarray, levels: Sequence[float] = QUANTILE_LEVELS) -> list[float]:
    """The `levels` percentiles of a whole channel (the same even stride as :func:`_image_statistics`): the shape
    of its intensity histogram, which ``segadapt predict`` compares inputs against."""
    values = np.asarray(channel).ravel()
    values = values[:: max(1, values.size // IMAGE_SAMPLES)].astype(np.float64, copy=False)
    return np.percentile(values, levels).tolist() if values.size else []


def _crop_shape(image: np.ndarray, background: Sequence[float | None]) -> list[int]:
    """Shape of the bounding box of the voxels differing from their channel's background (all: the shape)."""
    spatial = image.shape[1:]
    if all(b is None for b in background):
        return list(spatial)
    mask = np.zeros(spatial, bool)
    for channel, b in zip(image, background):
        if b is not None:
            mask |= differs_from_background(channel, b)
    if not mask.any():
        return list(spatial)
    return [int(i.max() - i.min()) + 1 for i in np.nonzero(mask)]


def _dataset_key(description: DatasetDescription, **settings: object) -> str:
    """16 hex digits over dataset.json, every case file's (size, mtime) and `settings`."""

    def stat(path: Path) -> list:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]

    state = {
        "version": FINGERPRINT_VERSION,
        "quantile_levels": QUANTILE_LEVELS,  # cached fingerprints from before 'image_quantiles' are made again
        "dataset_json": description.path.read_text(encoding="utf-8"),
        "files": [(c.case_id, stat(c.image) if len(c.images) == 1 else [stat(i) for i in c.images], stat(c.label))
                  for c in description.cases],
        **settings,
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(
    dataset: str | os.PathLike | DatasetDescription,
    out: str | os.PathLike | None = None,
    orientation: str | None = None,
    spatial_dims: int = 3,
    samples_per_case: int = FOREGROUND_SAMPLES,
    seed: int = 1234,
    affine_tolerance: float = 1e-3,
) -> dict:
    """Read every training case of a ``dataset.json`` once and describe the dataset (see the module doc).

    Cases are read and checked as the pipeline does (:class:`~segadapt.data.loading.LoadCased`, then MONAI
    ``Orientationd`` to `orientation`, default ``"RAS"[:spatial_dims]``), so a bad case fails here with its
    name. Returns the fingerprint as a JSON-ready dict (also written to `out`, atomically, when given)::

        {"version", "dataset", "dataset_json", "n_cases", "modality", "modality_declared", "labels",
         "orientation", "spatial_dims", "quantile_levels",
         "cases": [{"case_id", "spacing", "shape", "crop_shape", "background": [per channel],
                    "intensity": [per channel statistics inside the labels],
                    "image_intensity": [per channel statistics of the whole image],
                    "image_quantiles": [per channel QUANTILE_LEVELS percentiles of the whole image],
                    "label_volume_ml": {"1": ..., ...}}, ...],
         "intensity": [per channel statistics of the sampled foreground voxels],
         "background": [per channel dataset background value or None]}
    """
    description = dataset if isinstance(dataset, DatasetDescription) else load_dataset_json(dataset)
    orientation = orientation or "RAS"[:spatial_dims]
    raw = json.loads(description.path.read_text(encoding="utf-8"))
    channels = description.channels
    load = LoadCased(("image", "label"), description.label_values, channels, spatial_dims, affine_tolerance)
    orient = Orientationd(("image", "label"), axcodes=orientation, labels=None)
    schemes = [_scheme(description.modality[k]) for k in sorted(description.modality, key=int)]
    cases, samples, body = [], [[] for _ in range(channels)], [[] for _ in range(channels)]
    for index, entry in enumerate(description.cases):
        data = orient(load(entry.as_dict()))
        spacing = [round(float(s), 6) for s in data["image"].pixdim]  # NIfTI's float32 3.45 -> 3.45, not 3.4500000477
        image = data["image"].numpy()
        label = np.rint(data["label"].numpy()[0]).astype(np.int64)
        foreground = label > 0
        background = [no_signal_value(c) for c in image]
        rng, body_rng = np.random.default_rng([seed, index]), np.random.default_rng([seed, index, 1])
        stats = []
        for c in range(channels):
            values = image[c][foreground]
            stats.append(intensity_statistics(values))
            if values.size:  # with replacement, so every case weighs alike (nnU-Net)
                samples[c].append(rng.choice(values, samples_per_case, replace=True))
            body_values = image[c][body_mask(image[c], schemes[c], background[c])]
            if body_values.size:
                body[c].append(body_rng.choice(body_values, samples_per_case, replace=True))
        voxel_ml = math.prod(spacing) / 1000.0
        counts = np.bincount(label.ravel(), minlength=max(description.label_values) + 1)
        cases.append({
            "case_id": entry.case_id,
            "spacing": spacing,
            "shape": list(image.shape[1:]),
            "crop_shape": _crop_shape(image, background),
            "background": background,
            "intensity": stats,
            "image_intensity": [_image_statistics(c) for c in image],
            "image_quantiles": [image_quantiles(c) for c in image],
            "label_volume_ml": {str(v): float(counts[v] * voxel_ml) for v in description.label_values if v != 0},
        })
    result = {
        "version": FINGERPRINT_VERSION,
        "dataset": description.name,
        "dataset_json": str(description.path),
        "n_cases": len(cases),
        "modality": {str(k): v for k, v in description.modality.items()},
        "modality_declared": "modality" in raw or "channel_names" in raw,
        "labels": {str(k): v for k, v in description.labels.items()},
        "orientation": orientation,
        "spatial_dims": spatial_dims,
        "quantile_levels": list(QUANTILE_LEVELS),  # of the cases' 'image_quantiles'
        "cases": cases,
        "intensity": [intensity_statistics(np.concatenate(s) if s else np.zeros(0)) for s in samples],
        "body_intensity": [_body_statistics(b, f) for b, f in zip(body, samples)],
        "background": [_dataset_background(cases, c) for c in range(channels)],
    }
    check_plannable(result)
    if out is not None:
        write_json(out, result)
    return result


def check_plannable(fp: dict) -> None:
    """Refuse a dataset no network can be planned and trained on, rather than train a toy (one-line
    ValueError naming dataset.json): no labelled voxel in any case (nothing to learn), or cases too small to
    pool even once (the median cropped shape below 2 x :data:`MIN_FEATURE_MAP` on every axis: no U-Net).
    A dataset of too few cases for its folds is refused by the split (:mod:`segadapt.data.splits`)."""
    where = fp["dataset_json"]
    if not any(v > 0 for case in fp["cases"] for v in case["label_volume_ml"].values()):
        raise ValueError(f"{where}: no case has a labelled voxel (label > 0) in any of its {fp['n_cases']} cases; "
                         f"nothing to learn from")
    median = [int(m) for m in np.median([case["crop_shape"] for case in fp["cases"]], axis=0)]
    if max(median) < 2 * MIN_FEATURE_MAP:
        raise ValueError(f"{where}: the cases' median size after cropping, {median} voxels, is too small to plan a "
                         f"network (no axis reaches {2 * MIN_FEATURE_MAP} voxels, the least a U-Net pools)")


def _body_statistics(body: list[np.ndarray], foreground: list[np.ndarray]) -> dict[str, float | None]:
    """:func:`intensity_statistics` of one channel's body samples, plus ``share_in_foreground_range``: the
    share of them inside the foreground's 0.5-99.5 percentiles (the part of the body nnU-Net's CT clip keeps)."""
    values = np.concatenate(body) if body else np.zeros(0)
    stats = intensity_statistics(values)
    share = None
    if values.size and foreground:
        low, high = np.percentile(np.concatenate(foreground), (_PERCENTILES[0], _PERCENTILES[-1]))
        share = float(np.mean((values >= low) & (values <= high)))
    return {**stats, "share_in_foreground_range": share}


def _dataset_background(cases: list[dict], channel: int) -> float | None:
    """A channel's no-signal value for the whole dataset: the border value more than half of the cases share;
    else 0 when no case has a negative value and some hold exact zeros (:func:`no_signal_value`); else None."""
    shared = _shared_background([case["background"][channel] for case in cases])
    if shared is not None:
        return shared
    minima = [case["image_intensity"][channel]["min"] for case in cases]
    if minima and all(m is not None and m >= 0 for m in minima) and any(m == 0 for m in minima):
        return 0.0
    return None


def _shared_background(values: Sequence[float | None]) -> float | None:
    """The background value detected in more than half of the cases, else None."""
    counts = Counter(v for v in values if v is not None)
    if not counts:
        return None
    value, count = counts.most_common(1)[0]
    return value if count > len(values) / 2 else None


# -------------------------------------------------------------------------------------------------- topology


def pooling_topology(
    spacing: Sequence[float], patch_size: Sequence[int], min_feature_map: int = MIN_FEATURE_MAP
) -> tuple[list[int], list[list[int]], list[list[int]], list[int]]:
    """nnU-Net's ``get_pool_and_conv_props``: poolings per axis, strides and kernels per stage, padded patch.

    Each round pools (stride 2) the axes whose size is >= 2 x `min_feature_map` and whose spacing is within
    2x of the finest of those (a lone axis only while its size is >= 3 x `min_feature_map`), doubling
    their spacing. An axis's kernel is 3 from the first stage where its spacing is within 2x of the finest,
    1 before (nnU-Net compares the spacings of the size-valid axes here by position; this uses each axis's
    own spacing, which is what that code means). The bottleneck's kernel is 3. ``strides[0]`` is all ones;
    the patch is padded up to a multiple of 2^poolings per axis.

    Example: spacing (1, 1, 1), patch (36, 50, 35) -> 3 poolings per axis, 4 stages of kernel 3, patch
    (40, 56, 40).
    """
    dims = len(spacing)
    current, size = [float(s) for s in spacing], [int(s) for s in patch_size]
    pools, strides, kernels, kernel = [0] * dims, [[1] * dims], [], [1] * dims
    while True:
        valid = [i for i in range(dims) if size[i] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(current[i] for i in valid)
        valid = [i for i in valid if current[i] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * min_feature_map:
            break
        kernel = [3 if kernel[d] == 3 or current[d] / min(current) < 2 else 1 for d in range(dims)]
        for i in valid:
            pools[i] += 1
            current[i] *= 2
            size[i] = math.ceil(size[i] / 2)
        strides.append([2 if i in valid else 1 for i in range(dims)])
        kernels.append(kernel)
    kernels.append([3] * dims)
    padded = [math.ceil(s / 2**p) * 2**p for s, p in zip(patch_size, pools)]
    return pools, strides, kernels, padded


def fit_patch(
    spacing: Sequence[float], median_shape: Sequence[int], budget: int, initial_voxels: float
) -> tuple[list[int], list[int], list[list[int]], list[list[int]]]:
    """nnU-Net's patch-size search with a voxel budget: (patch, poolings per axis, strides, kernels).

    Start from the aspect ratio 1 / spacing scaled to `initial_voxels`, clipped to `median_shape`; while the
    (padded) patch holds more than `budget` voxels, shrink the axis that is largest relative to the median
    shape by its divisor 2^poolings (recomputed on the shrunk size, as nnU-Net does).
    """
    dims = len(spacing)
    if budget < 16**dims:
        raise ValueError(f"patch budget {budget} voxels is too small; at least 16^{dims} = {16**dims} are needed")
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    initial = np.round(inverse * (initial_voxels / np.prod(inverse)) ** (1.0 / dims)).astype(int)
    patch = [max(1, min(int(i), int(m))) for i, m in zip(initial, median_shape)]
    pools, strides, kernels, patch = pooling_topology(spacing, patch)
    while math.prod(patch) > budget:
        ratios = [p / max(m, 1) for p, m in zip(patch, median_shape)]
        axis = max(i for i in range(dims) if ratios[i] == max(ratios))
        shrunk = list(patch)
        shrunk[axis] -= 2 ** pools[axis]
        step = 2 ** pooling_topology(spacing, shrunk)[0][axis]
        patch = list(patch)
        patch[axis] -= step
        if patch[axis] < 1:
            raise ValueError(f"cannot fit a patch into {budget} voxels (median shape {list(median_shape)})")
        pools, strides, kernels, patch = pooling_topology(spacing, patch)
    return patch, pools, strides, kernels


def _batch_size(patch: Sequence[int], budget: int, reference_batch: int, dataset_voxels: float) -> int:
    """reference_batch x budget / patch voxels, capped at 5% of the dataset's voxels, at least 2 (nnU-Net)."""
    voxels = math.prod(patch)
    by_memory = round(reference_batch * budget / voxels)
    by_dataset = round(dataset_voxels * MAX_DATASET_FRACTION / voxels)
    return max(min(by_memory, by_dataset), MIN_BATCH_SIZE)


def _filters(stages: int, base: int, maximum: int) -> list[int]:
    return [min(base * 2**i, maximum) for i in range(stages)]


# ------------------------------------------------------------------------------------------------------ plan


@dataclass
class Plan:
    """Every data and network setting decided from a fingerprint (:func:`make_plan`).

    Use :meth:`preprocess_fields` (PreprocessConfig fields) and :meth:`network_fields` (model arguments);
    ``batch_size`` / ``slice_batch_size`` are patches / slices per optimiser step (nnU-Net's batch size;
    divide by ``samples_per_volume`` for volumes per batch). On a 2D dataset the "3D" settings are the 2D
    image's and ``slice_size`` equals ``patch_size``.
    """

    dataset: str
    n_cases: int
    modality: dict[str, str]
    spatial_dims: int
    orientation: str
    median_spacing: list[float]
    """Median spacing per array axis (mm) over the cases, after reorientation."""
    target_spacing: list[float]
    resample: bool
    """False when every case already has the target spacing (then the pipeline keeps the native grid)."""
    anisotropic_axis: Optional[int]
    """The axis whose target spacing the anisotropy rule set (10th percentile), or None."""
    median_shape: list[int]
    """Median shape after the foreground crop and resampling to the target spacing."""
    patch_size: list[int]
    pools_per_axis: list[int]
    strides: list[list[int]]
    """One per stage, the first all ones (MONAI DynUNet ``strides``)."""
    kernel_sizes: list[list[int]]
    """One per stage (MONAI DynUNet ``kernel_size``)."""
    filters: list[int]
    batch_size: int
    slice_size: list[int]
    slice_pools: int
    slice_filters: list[int]
    slice_batch_size: int
    intensity: str
    windows: Optional[list[list[float]]] = None
    clip_range: Optional[list[list[float]]] = None
    norm_mean: Optional[list[float]] = None
    norm_std: Optional[list[float]] = None
    background_value: Optional[list[Optional[float]]] = None
    budget: dict[str, float] = field(default_factory=dict)
    """memory_gb, patch_voxels and slice_pixels the plan was made for."""
    notes: list[str] = field(default_factory=list)
    """Rules that fired or assumptions made, in words."""
    networks: dict[str, dict] = field(default_factory=dict)
    """Model arguments given by the plan's source rather than the rules, per model name (an nnU-Net plans
    file's network: ``{"nnunet": {"out_channels": 2}}``); merged into :meth:`network_fields`."""
    version: int = PLAN_VERSION

    def preprocess_fields(self) -> dict:
        """The :class:`~segadapt.data.PreprocessConfig` fields this plan decides.

        Always ``intensity``, ``target_spacing`` (None when no case needs resampling), ``orientation``,
        ``spatial_dims``, ``patch_size``, ``slice_size``; plus ``windows`` ('ct'), ``clip_range``,
        ``norm_mean``, ``norm_std`` ('ct_zscore') or ``background_value`` ('zscore').
        """
        values = {
            "intensity": self.intensity,
            "target_spacing": list(self.target_spacing) if self.resample else None,
            "orientation": self.orientation,
            "spatial_dims": self.spatial_dims,
            "patch_size": list(self.patch_size),
            "slice_size": list(self.slice_size),
        }
        extra = {"ct": ("windows",), "ct_zscore": ("clip_range", "norm_mean", "norm_std"),
                 "zscore": ("background_value",)}.get(self.intensity, ())
        values.update({name: getattr(self, name) for name in extra})
        return values

    def network_fields(self) -> dict[str, dict]:
        """Model arguments per model name (the names of ``configs/model/*.yaml``): each registered model's
        ``plan_fields`` (:class:`segadapt.models.registry.ModelSpec`; e.g. DynUNet's kernels, strides and
        filters), then any model of :attr:`networks` (``nnunet``: ``out_channels``)."""
        planned = {name: spec.plan_fields(self) for name, spec in MODELS.items() if spec.plan_fields is not None}
        return {**planned, **copy.deepcopy(self.networks)}

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, values: dict) -> Plan:
        """Build from :meth:`to_dict` output; unknown or missing keys and other versions are errors."""
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown plan fields {sorted(unknown)}")
        if values.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise ValueError(f"plan version {values.get('version')} is not {PLAN_VERSION}; run `segadapt plan` again")
        try:
            return cls(**values)
        except TypeError as e:
            raise ValueError(f"incomplete plan: {e}") from e

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Plan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path}: not a plan file ({e})") from e


def _scheme(modality: str) -> str:
    """nnU-Net's channel name -> normalisation: 'CT' -> 'ct_zscore', 'RGB' -> 'rgb', anything else -> 'zscore'."""
    name = modality.strip().casefold()
    if name == "ct":
        return "ct_zscore"
    if name in ("rgb", "rgb_to_0_1"):
        return "rgb"
    return "zscore"


def _target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, Optional[int]]:
    """Median spacing, with nnU-Net's anisotropy rule (see the module doc); also the axis it changed."""
    target = np.median(spacings, axis=0)
    if len(target) < 2:
        return target, None
    median_size = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    aniso_voxels = median_size[worst] * ANISOTROPY_THRESHOLD < min(median_size[others])
    if not (aniso_spacing and aniso_voxels):
        return target, None
    target = target.copy()
    target[worst] = max(float(np.percentile(spacings[:, worst], 10)), float(max(target[others])) + 1e-5)
    return target, worst


def make_plan(
    fp: dict,
    memory_gb: float = REFERENCE_GB,
    patch_voxels: int | None = None,
    slice_pixels: int | None = None,
    intensity: str | None = None,
    windows: Sequence[Sequence[float]] | None = None,
    base_filters: int = BASE_FILTERS,
) -> Plan:
    """A :class:`Plan` from a :func:`fingerprint` (the rules are in the module doc).

    Args:
        memory_gb: accelerator memory to plan for; scales the default budgets.
        patch_voxels: voxels per 3D patch at batch 2 (default 128^3 x memory_gb / 8).
        slice_pixels: pixels per 2D slice at batch 12 (default 512^2 x memory_gb / 8).
        intensity: force a PreprocessConfig intensity mode instead of the modality's choice, e.g. 'ct' for
            HU windows as channels (`windows`, default PreprocessConfig's brain/subdural/bone).
        base_filters: filters of the first stage (doubled per stage up to 320 in 3D, 512 in 2D).

    Raises:
        ValueError: an unknown intensity mode, a budget too small for any patch, or CT statistics that
            cannot be computed (no labelled voxel anywhere).
    """
    if intensity is not None and intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {intensity!r}")
    if fp.get("version") != FINGERPRINT_VERSION:
        raise ValueError(f"fingerprint version {fp.get('version')} is not {FINGERPRINT_VERSION}; make it again")
    cases, dims = fp["cases"], int(fp["spatial_dims"])
    notes: list[str] = []
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    crop_shapes = np.array([c["crop_shape"] for c in cases], dtype=np.float64)
    target, aniso_axis = _target_spacing(spacings, crop_shapes)
    median_spacing = np.median(spacings, axis=0)
    if aniso_axis is not None:
        notes.append(f"anisotropy rule: axis {aniso_axis} spacing {target[aniso_axis]:.4g} mm (10th percentile) "
                     f"instead of the median {median_spacing[aniso_axis]:.4g} mm")
    resampled = np.round(crop_shapes * spacings / target)
    median_float = np.median(resampled, axis=0)
    median_shape = [int(np.floor(m + 0.5)) for m in median_float]
    dataset_voxels = float(np.prod(median_float)) * len(cases)
    resample = not np.allclose(spacings, target, rtol=1e-3, atol=0.0)

    memory = memory_gb / REFERENCE_GB
    patch_budget = int(patch_voxels or round(REFERENCE_PATCH_VOXELS * memory))
    slice_budget = int(slice_pixels or round(REFERENCE_SLICE_PIXELS * memory))
    if dims == 3:
        patch, pools, strides, kernels = fit_patch(target, median_shape, patch_budget, 256.0**3)
        batch = _batch_size(patch, patch_budget, REFERENCE_BATCH_3D, dataset_voxels)
        filters = _filters(len(strides), base_filters, MAX_FILTERS_3D)
        side = max(median_shape)  # every view's slice fits in side x side
        finest = float(min(target))
        slice_size, slice_pools_axes, _, _ = fit_patch([finest, finest], [side, side], slice_budget, 2048.0**2)
        slice_pools = min(slice_pools_axes)
        slice_batch = _batch_size(slice_size, slice_budget, REFERENCE_BATCH_2D, dataset_voxels)
    else:
        patch, pools, strides, kernels = fit_patch(target, median_shape, slice_budget, 2048.0**2)
        batch = _batch_size(patch, slice_budget, REFERENCE_BATCH_2D, dataset_voxels)
        filters = _filters(len(strides), base_filters, MAX_FILTERS_2D)
        slice_size, slice_pools, slice_batch = list(patch), min(pools), batch
    slice_filters = _filters(slice_pools + 1, base_filters, MAX_FILTERS_2D)

    modality = {str(k): str(v) for k, v in fp["modality"].items()}
    if not fp.get("modality_declared", True):
        notes.append("dataset.json declares no modality (nor channel_names): CT assumed")
    schemes = [_scheme(m) for m in modality.values()]
    forced = intensity is not None
    if intensity is None:
        intensity = schemes[0] if len(set(schemes)) == 1 else "zscore"
        if len(set(schemes)) > 1:
            notes.append(f"mixed modalities {list(modality.values())}: per-case z-score for every channel")
    norm: dict = {}
    if intensity == "ct":
        norm["windows"] = [list(map(float, w)) for w in (windows or PreprocessConfig().windows)]
    elif intensity == "ct_zscore":
        norm = _ct_normalisation(fp, notes)
    elif intensity in ("zscore", "mri"):
        norm["background_value"] = list(fp["background"])
        if intensity == "zscore" and not forced and all(b == 0.0 for b in fp["background"]):
            intensity = "mri"
            notes.append(_zero_background_note(fp))
        elif intensity == "zscore":
            for c, b in enumerate(fp["background"]):
                if b is None:
                    notes.append(f"channel {c}: no constant background on the borders and intensities below 0 or "
                                 f"no zeros; z-score over the whole volume")
                else:
                    notes.append(f"channel {c}: background {b:g} (the borders' value); z-score over the other voxels")

    return Plan(
        dataset=fp["dataset"], n_cases=len(cases), modality=modality, spatial_dims=dims,
        orientation=fp["orientation"], median_spacing=[float(s) for s in median_spacing],
        target_spacing=[float(s) for s in target], resample=bool(resample), anisotropic_axis=aniso_axis,
        median_shape=median_shape, patch_size=[int(p) for p in patch], pools_per_axis=pools, strides=strides,
        kernel_sizes=kernels, filters=filters, batch_size=batch, slice_size=[int(s) for s in slice_size],
        slice_pools=int(slice_pools), slice_filters=slice_filters, slice_batch_size=slice_batch,
        intensity=intensity, budget={"memory_gb": float(memory_gb), "patch_voxels": patch_budget,
                                     "slice_pixels": slice_budget},
        notes=notes, **norm,
    )


def _zero_background_note(fp: dict) -> str:
    """Why the plan chose 'mri': how many cases hold zeros, and that no intensity is below 0."""
    zeros = sum(any(s["min"] == 0 for s in case["image_intensity"]) for case in fp["cases"])
    return (f"no-signal value 0 (no intensity below 0; zeros in {zeros} of {len(fp['cases'])} cases): 'mri', a z-score "
            f"over the nonzero voxels with zeros kept at 0 (nnU-Net's ZScoreNormalization with its nonzero mask), "
            f"not one that counts the zeros")


def _ct_normalisation(fp: dict, notes: list[str]) -> dict:
    """'ct_zscore' clip range, mean and std per channel: nnU-Net's foreground rule, or the body's.

    nnU-Net clips CT to the 0.5 / 99.5 percentiles of the labelled voxels and z-scores with their mean and
    std. It was designed for organ targets, whose label covers the tissue the network must tell apart: on the
    abdominal CT a single organ's range (spleen, liver, kidney) holds more than half of the body's voxels. A
    small lesion inside anatomy has a range of its own (the phantom's haemorrhage: [53, 95] HU, 0.5% of the
    head): clipped to it, brain becomes one constant and skull another, and bone (clipped to 95) reads as
    blood. So: nnU-Net's rule when its clip range holds at least :data:`MIN_BODY_IN_FOREGROUND_RANGE` of the
    body's voxels (HU > -500, the pipeline's crop), else the same statistics over the body (0.5 / 99.5
    percentiles, mean, std of 10^4 body voxels per case), which removes only outliers (metal, air pockets)
    and keeps every tissue distinct. A fingerprint without body statistics (older segadapt) gets nnU-Net's rule.
    """
    bodies = fp.get("body_intensity") or [None] * len(fp["intensity"])
    norm: dict = {"clip_range": [], "norm_mean": [], "norm_std": []}
    for c, (foreground, body) in enumerate(zip(fp["intensity"], bodies)):
        share = body.get("share_in_foreground_range") if body else None
        if share is None or share >= MIN_BODY_IN_FOREGROUND_RANGE:
            stats, where = foreground, "foreground intensities (label > 0)"
            if share is not None:
                notes.append(f"channel {c}: CT clip to the labels' 0.5-99.5 percentiles "
                             f"[{foreground['percentile_00_5']:.4g}, {foreground['percentile_99_5']:.4g}] HU "
                             f"(nnU-Net), which hold {share:.0%} of the body's voxels")
        else:
            stats, where = body, f"body intensities (HU > {BODY_HU:g})"
            notes.append(f"channel {c}: the labels' 0.5-99.5 percentiles [{foreground['percentile_00_5']:.4g}, "
                         f"{foreground['percentile_99_5']:.4g}] HU hold only {share:.1%} of the body's voxels "
                         f"(a lesion inside anatomy; clipped to them the rest of the body would be two constants): "
                         f"CT clip to the body's (HU > {BODY_HU:g}) [{body['percentile_00_5']:.4g}, "
                         f"{body['percentile_99_5']:.4g}] HU, z-score with its mean and std")
        if stats["mean"] is None or not stats["percentile_00_5"] < stats["percentile_99_5"] or not stats["std"] > 0:
            raise ValueError(f"{fp['dataset_json']}: channel {c} has no usable {where} for CT normalisation: {stats}")
        norm["clip_range"].append([stats["percentile_00_5"], stats["percentile_99_5"]])
        norm["norm_mean"].append(stats["mean"])
        norm["norm_std"].append(stats["std"])
    return norm


def format_plan(plan: Plan) -> str:
    """Every planned value, one ``name: value`` line each, then the network settings and the notes."""
    values = plan.to_dict()
    notes = values.pop("notes")
    lines = [f"{name:>18}: {value}" for name, value in values.items() if value is not None]
    lines += [f"{'network ' + model:>18}: {kwargs}" for model, kwargs in plan.network_fields().items()]
    lines += [f"{'note':>18}: {note}" for note in notes]
    return "\n".join(lines)


def fingerprint_folder(dataset_json: str | os.PathLike, cache_dir: str | os.PathLike, orientation: str | None = None,
                       spatial_dims: int = 3) -> Path:
    """``<cache_dir>/<dataset>-<key>/``: where the fingerprint (and plan) of a dataset's current content is cached."""
    description = load_dataset_json(dataset_json)
    key = _dataset_key(description, orientation=orientation, spatial_dims=spatial_dims)
    return Path(cache_dir) / f"{description.name}-{key}"


def load_or_make_fingerprint(dataset_json: str | os.PathLike, cache_dir: str | os.PathLike,
                             orientation: str | None = None, spatial_dims: int = 3, write: bool = True) -> dict:
    """The :func:`fingerprint` of a dataset, cached as ``fingerprint.json`` in :func:`fingerprint_folder`
    (`write=False`: one made afresh is not written; :func:`cache_fingerprint` writes it later)."""
    fp_file = fingerprint_folder(dataset_json, cache_dir, orientation, spatial_dims) / "fingerprint.json"
    cached = _cached_fingerprint(fp_file)
    if cached is not None:
        return cached
    return fingerprint(dataset_json, fp_file if write else None, orientation=orientation, spatial_dims=spatial_dims)


def cache_fingerprint(fp: dict, cache_dir: str | os.PathLike, orientation: str | None = None,
                      spatial_dims: int = 3) -> None:
    """Write `fp` as its dataset's cached fingerprint (:func:`load_or_make_fingerprint`) unless one is there."""
    fp_file = fingerprint_folder(fp["dataset_json"], cache_dir, orientation, spatial_dims) / "fingerprint.json"
    if _cached_fingerprint(fp_file) is None:
        write_json(fp_file, fp)


def _cached_fingerprint(fp_file: Path) -> dict | None:
    if fp_file.is_file():
        fp = json.loads(fp_file.read_text(encoding="utf-8"))
        if "body_intensity" in fp:  # else made by an older segadapt: made again
            return fp
    return None


def load_or_make_plan(
    dataset_json: str | os.PathLike,
    cache_dir: str | os.PathLike,
    orientation: str | None = None,
    spatial_dims: int = 3,
    **plan_options: object,
) -> Plan:
    """The plan of a dataset, its fingerprint cached under ``<cache_dir>/<dataset>-<key>/``.

    The key covers ``dataset.json``, the size and modification time of every case file, `orientation` and
    `spatial_dims`, so the first use reads every case and later ones reuse ``fingerprint.json``; a changed
    or added case gives a new key. The plan (cheap) is made again from it with `plan_options`
    (:func:`make_plan` arguments) and written beside it as ``plan.json``.
    """
    fp = load_or_make_fingerprint(dataset_json, cache_dir, orientation, spatial_dims)
    folder = fingerprint_folder(dataset_json, cache_dir, orientation, spatial_dims)
    plan = make_plan(fp, **plan_options)
    plan_file = folder / "plan.json"
    if not plan_file.is_file() or json.loads(plan_file.read_text(encoding="utf-8")) != plan.to_dict():
        plan.to_json(plan_file)
    return plan


def check_plan_outputs(dataset_json: str | os.PathLike, outputs: Sequence[str | os.PathLike],
                       overwrite: bool = False) -> None:
    """Refuse, before any case is read, plan outputs that would replace the dataset's description or one of its
    files (images, labels, splits), land in its image / label folders, be one file twice, or -- unless
    `overwrite` -- replace an existing file. Paths are compared resolved (symlinks followed).

    Raises:
        ValueError: naming the output and what it would replace.
    """
    from .splits import NNUNET_SPLITS_FILE, find_nnunet_splits

    description = load_dataset_json(dataset_json)
    case_files = [p for c in description.cases for p in (*c.images, c.label)]
    case_files += [p for _, images in description.test_images for p in images]
    files = {p.resolve() for p in [description.path, *case_files, find_nnunet_splits(description)] if p is not None}
    folders = {p.resolve() if p.is_dir() else p.resolve().parent for p in case_files} - {description.root.resolve()}
    resolved = [Path(p).resolve() for p in outputs]
    for given, path in zip(outputs, resolved):
        split_name = path.parent == description.root.resolve() and (
            path.name == NNUNET_SPLITS_FILE or re.fullmatch(r"splits_\d+fold_seed\d+\.json", path.name))
        if path in files or split_name:
            raise ValueError(f"{given} is a file of the dataset {description.path} (its description, a case or its "
                             "splits): write the plan elsewhere")
        folder = next((f for f in folders if path.is_relative_to(f)), None)
        if folder is not None:
            raise ValueError(f"{given} is inside the dataset's case folder {folder}: write the plan elsewhere")
        check_output_file(given, "plan output")
        if path.exists() and not overwrite:
            raise ValueError(f"{given} exists; give --overwrite to replace it")
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"--out and --fingerprint name one file ({outputs[0]}): give two file names")


def main(argv: Sequence[str] | None = None) -> Plan:
    """``segadapt plan DATASET_JSON``: fingerprint + plan, written as JSON and printed; bad input exits 2."""
    parser = plan_parser()  # in segadapt.parsers: `segadapt plan --help` imports no torch
    args = parser.parse_args(argv)
    out = Path(args.out)
    fp_file = Path(args.fingerprint) if args.fingerprint else out.parent / "fingerprint.json"
    try:
        check_plan_outputs(args.dataset_json, [out, fp_file], args.overwrite)
        start = time.perf_counter()
        fp = fingerprint(args.dataset_json, orientation=args.orientation, spatial_dims=args.spatial_dims)
        seconds = time.perf_counter() - start
        plan = make_plan(fp, args.memory_gb, args.patch_voxels, args.slice_pixels, args.intensity)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"segadapt plan: error: {error}\n")
    write_json(fp_file, fp)
    plan.to_json(out)
    print(f"fingerprint: {fp['n_cases']} cases read in {seconds:.1f} s -> {fp_file}")
    print(format_plan(plan))
    print(f"plan: {out}")
    return plan


if __name__ == "__main__":
    main()
