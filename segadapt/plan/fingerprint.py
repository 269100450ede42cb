"""Dataset fingerprint: every training case of a ``dataset.json`` read once, as plain data.

::

    fp = fingerprint("data/x/dataset.json")                # reads every training case once
    fp = load_or_make_fingerprint("data/x/dataset.json", "runs/plans")   # cached by the dataset's content

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
and some hold zeros), and whether every image is an 8-bit RGB(A) 2D image file (``rgb8_images``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.transforms import Orientationd

from segadapt.data.config import PreprocessConfig
from segadapt.data.dataset_json import DatasetDescription, load_dataset_json
from segadapt.io import write_json
from segadapt.data.loading import LoadCased
from segadapt.data.transforms import differs_from_background

FINGERPRINT_VERSION = 2  # 2: per-case whole-image intensity statistics ('image_intensity')
FOREGROUND_SAMPLES = 10_000       # foreground voxels drawn per case and channel for the dataset statistics
IMAGE_SAMPLES = 1_000_000         # at most this many voxels (an even stride) per case for the whole-image statistics
BACKGROUND_FRACTION = 0.9         # share of the outer faces one value must fill to be the background
BODY_HU = PreprocessConfig().foreground_threshold  # CT voxels above this (HU) are the body: the pipeline's crop
MIN_FEATURE_MAP = 4               # smallest bottleneck edge: an axis is pooled while its size >= 2 x this
PERCENTILES = (0.5, 50.0, 99.5)
QUANTILE_LEVELS = tuple(range(1, 100))  # percentiles of 'image_quantiles': 1, 2, ..., 99





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
    low, median, high = np.percentile(values, PERCENTILES)
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
         "background": [per channel dataset background value or None], "rgb8_images": bool}
    """
    description = dataset if isinstance(dataset, DatasetDescription) else load_dataset_json(dataset)
    orientation = orientation or "RAS"[:spatial_dims]
    raw = json.loads(description.path.read_text(encoding="utf-8"))
    channels = description.channels
    load = LoadCased(("image", "label"), description.label_values, channels, spatial_dims, affine_tolerance)
    orient = Orientationd(("image", "label"), axcodes=orientation, labels=None)
    schemes = [normalisation_scheme(description.modality[k]) for k in sorted(description.modality, key=int)]
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
        "rgb8_images": rgb8_images(description),
    }
    check_plannable(result)
    if out is not None:
        write_json(out, result)
    return result


RGB_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
RGB_MODES = ("RGB", "RGBA")  # Pillow's modes of 3 and 4 channels of uint8


def rgb8_images(description: DatasetDescription) -> bool:
    """Whether every case's image is one 8-bit RGB or RGBA 2D image file (PNG, JPEG, BMP, TIFF); only the files'
    headers are read (Pillow)."""
    from PIL import Image

    for case in description.cases:
        if len(case.images) != 1 or case.images[0].suffix.lower() not in RGB_SUFFIXES:
            return False
        with Image.open(case.images[0]) as image:
            if image.mode not in RGB_MODES:
                return False
    return bool(description.cases)


def _with_image_format(fp: dict) -> dict:
    """`fp` with ``rgb8_images`` (:func:`rgb8_images`); a fingerprint cached without it gets it from the headers."""
    if "rgb8_images" in fp:
        return fp
    return {**fp, "rgb8_images": rgb8_images(load_dataset_json(fp["dataset_json"]))}


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
        low, high = np.percentile(np.concatenate(foreground), (PERCENTILES[0], PERCENTILES[-1]))
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



def normalisation_scheme(modality: str) -> str:
    """nnU-Net's channel name -> normalisation: 'CT' -> 'ct_zscore', 'RGB' -> 'rgb', anything else -> 'zscore'."""
    name = modality.strip().casefold()
    if name == "ct":
        return "ct_zscore"
    if name in ("rgb", "rgb_to_0_1"):
        return "rgb"
    return "zscore"



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
        return _with_image_format(cached)
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

