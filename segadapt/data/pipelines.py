"""The one preprocessing spec, and the MONAI pipelines instantiated from it.

:func:`preprocessing_spec` turns a :class:`~segadapt.data.config.PreprocessConfig` into the deterministic
preprocessing as MONAI config entries (``{"_target_": ..., **arguments}``, what a MONAI bundle's JSON holds)::

    LoadCased -> Orientationd(cfg.orientation) -> Spacingd(cfg.target_spacing) -> CropForegroundd -> intensity
        -> EnsureTyped(float32) -> RequireForegroundd (an all-air / blank case is refused, naming it)

Training, validation and prediction instantiate it (:func:`deterministic_transforms`, by MONAI's
``ConfigParser``, as ``monai.bundle`` does), and the MONAI bundle writes the same entries as its
``preprocessing`` (:func:`segadapt.export.bundle.preprocessing`); only the reading and the case checks differ
there (``checked=False``: MONAI's ``LoadImaged``, no ``RequireForegroundd``), so a bundle of a run that needs no
segadapt transform runs with MONAI alone. Each step is MONAI's transform where one computes the same, and
segadapt's (:mod:`segadapt.data.transforms`) only where MONAI has none.

intensity: 'ct' stacks HU windows as channels (``CTWindowd``; one window: ``ScaleIntensityRanged``),
'ct_zscore' clips and z-scores with the dataset's statistics (``CTZScored``; one channel:
``ScaleIntensityRanged``), 'zscore' z-scores each case over its non-background voxels (``ZScored``; no
background value: ``NormalizeIntensityd``), 'mri' z-scores nonzero voxels, 'rgb' divides by 255.
Then, per pipeline:

* :func:`patch_train_transforms`: ``spatial_dims``-D patches of ``patch_size``, lesion-centred with
  probability ``positive_fraction`` (MONAI ``RandCropByPosNegLabeld``), ``samples_per_volume`` per visit,
  then augmentation. Image (C, *patch_size), label (1, *patch_size).
* :func:`slice_train_transforms`: 2D slices along a view drawn from ``slice_axes`` (``RandSliced``)
  for a multi-view 2D network. Image (C, *slice_size), label (1, *slice_size), ``view`` = RAS axis normal
  to the slice (0 sagittal, 1 coronal, 2 axial).
* :func:`val_transforms`: whole preprocessed volume with label.
* :func:`inference_transforms`: whole preprocessed volume, image only; :func:`invert_transform` maps a
  prediction made on it back onto the input file's grid (orientation, spacing, crop undone).

Lists from random transforms (several samples per volume) are flattened by MONAI's ``list_data_collate``,
the default collate of ``monai.data.DataLoader``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from monai.bundle import ConfigParser
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    Invertd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from .config import PreprocessConfig
from .transforms import FLIP_AXES, RandSliced

Spec = list[dict[str, Any]]
OURS = "segadapt.data.transforms."  # segadapt's transforms, named by their module in a spec
# Intensity modes whose output is centred on 0 over the whole cropped volume: any voxel of it is anatomy.
CENTRED_MODES = ("ct_zscore", "zscore")


def _background(cfg: PreprocessConfig, channels: int) -> list[float | None]:
    return list(cfg.background_value) if cfg.background_value is not None else [None] * channels


def _load(cfg: PreprocessConfig, keys: list[str], label_values: Sequence[int] | None, channels: int,
          checked: bool) -> dict[str, Any]:
    """segadapt's reader with its case checks, or (not `checked`) MONAI's NIfTI reader."""
    if checked:
        return {"_target_": "segadapt.data.loading.LoadCased", "keys": keys,
                "label_values": None if label_values is None else [int(v) for v in label_values],
                "channels": channels, "spatial_dims": cfg.spatial_dims, "affine_tolerance": cfg.affine_tolerance}
    return {"_target_": "LoadImaged", "keys": keys, "reader": "NibabelReader", "ensure_channel_first": True,
            "image_only": True, "dtype": "$numpy.float32"}


def _above(threshold: float) -> dict[str, Any]:
    """``select_fn`` x > threshold: ``torch.gt`` with ``other`` bound (``_mode_`` callable: a picklable partial)."""
    return {"_target_": "torch.gt", "_mode_": "callable", "other": float(threshold)}


def _crop_select(cfg: PreprocessConfig, channels: int) -> dict[str, Any] | None:
    """What the foreground crop keeps: HU above the threshold (CT), not background ('zscore'), else > 0.

    None (no crop) for 'zscore' without any background value: nothing marks a region as empty.
    """
    if cfg.intensity in ("ct", "ct_zscore"):
        return _above(cfg.foreground_threshold)
    if cfg.intensity == "zscore":
        background = _background(cfg, channels)
        return {"_target_": OURS + "DiffersFrom", "background": background} if any(
            b is not None for b in background) else None
    return _above(0.0)


def _scale(a_min: float, a_max: float, b_min: float, b_max: float, clip: bool = True) -> dict[str, Any]:
    return {"_target_": "ScaleIntensityRanged", "keys": ["image"], "a_min": a_min, "a_max": a_max, "b_min": b_min,
            "b_max": b_max, "clip": clip}


def _intensity(cfg: PreprocessConfig, channels: int) -> dict[str, Any]:
    """The intensity step: MONAI's transform where one computes the same (one CT window, one clipped z-score
    channel: ``ScaleIntensityRanged``, which segadapt's classes apply per window / channel; a z-score without
    background: ``NormalizeIntensityd``), segadapt's class where MONAI has none (several windows stacked as
    channels, several clipped channels, a background value to leave out)."""
    if cfg.intensity == "ct" and len(cfg.windows) == 1:
        (level, width), = cfg.windows
        return _scale(level - width / 2, level + width / 2, 0.0, 1.0)
    if cfg.intensity == "ct":
        return {"_target_": OURS + "CTWindowd", "keys": ["image"], "windows": cfg.windows}
    if cfg.intensity == "ct_zscore" and channels == len(cfg.clip_range) == 1:
        (low, high), mean, std = cfg.clip_range[0], cfg.norm_mean[0], cfg.norm_std[0]
        return _scale(low, high, (low - mean) / std, (high - mean) / std)
    if cfg.intensity == "ct_zscore":
        return {"_target_": OURS + "CTZScored", "keys": ["image"], "clip_range": cfg.clip_range,
                "mean": cfg.norm_mean, "std": cfg.norm_std}
    background = _background(cfg, channels)
    if cfg.intensity == "zscore" and (len(background) != channels or any(b is not None for b in background)):
        return {"_target_": OURS + "ZScored", "keys": ["image"], "background": background}
    if cfg.intensity in ("zscore", "mri"):
        return {"_target_": "NormalizeIntensityd", "keys": ["image"], "nonzero": cfg.intensity == "mri",
                "channel_wise": True}
    return _scale(0.0, 255.0, 0.0, 1.0, clip=False)


def _require_foreground(cfg: PreprocessConfig) -> dict[str, Any]:
    """The check that refuses an all-air / blank (or constant, z-scored) case, naming it."""
    threshold = cfg.foreground_threshold if cfg.intensity == "ct" else 0.0
    unit = " HU" if cfg.intensity == "ct" else ""
    crop = f"none above the crop threshold {threshold:g}{unit}, or " if cfg.crop_foreground else ""
    check = {"_target_": "segadapt.data.loading.RequireForegroundd", "keys": ["image"]}
    if cfg.intensity in CENTRED_MODES:
        return {**check, "what": f"{crop}none left after the crop or a constant volume", "nonzero": True,
                "zscored": True}
    return {**check, "what": f"{crop}none above 0 after the {cfg.intensity} intensity step", "nonzero": False,
            "zscored": cfg.intensity == "mri"}


def preprocessing_spec(cfg: PreprocessConfig, keys: Sequence[str] = ("image", "label"),
                       label_values: Sequence[int] | None = None, channels: int = 1, checked: bool = True) -> Spec:
    """The deterministic preprocessing of `cfg` as MONAI config entries (JSON values only): read, orient,
    resample, crop, intensity, float32.

    `channels` is the number of image channels (before windowing); `checked`: segadapt's reader and case
    checks (``LoadCased``, ``RequireForegroundd``), else MONAI's ``LoadImaged`` for NIfTI and no check (a bundle).
    """
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    # MONAI's Orientationd; on 2D images segadapt's (the same forward step, an inverse that takes 2D images)
    orientation = "Orientationd" if cfg.spatial_dims == 3 else OURS + "ImageOrientationd"
    spec = [_load(cfg, keys, label_values, channels, checked),
            {"_target_": orientation, "keys": keys, "axcodes": cfg.orientation, "labels": None}]
    if cfg.target_spacing is not None:
        spec.append({"_target_": "Spacingd", "keys": keys, "pixdim": list(cfg.target_spacing), "mode": modes})
    select = _crop_select(cfg, channels) if cfg.crop_foreground else None
    if select is not None:
        spec.append({"_target_": "CropForegroundd", "keys": keys, "source_key": "image", "select_fn": select,
                     "allow_smaller": True, "start_coord_key": None, "end_coord_key": None})
    spec.append(_intensity(cfg, channels))
    spec.append({"_target_": "EnsureTyped", "keys": keys, "dtype": "$torch.float32", "track_meta": True})
    return spec + ([_require_foreground(cfg)] if checked else [])


def instantiate(spec: Spec) -> list:
    """The transforms of a spec, built by MONAI's ``ConfigParser`` (as ``monai.bundle`` builds a bundle's)."""
    return ConfigParser({"transforms": spec}).get_parsed_content("transforms")


def deterministic_transforms(
    cfg: PreprocessConfig,
    keys: Sequence[str] = ("image", "label"),
    label_values: Sequence[int] | None = None,
    channels: int = 1,
) -> list:
    """The cached part shared by all pipelines: :func:`preprocessing_spec` instantiated."""
    return instantiate(preprocessing_spec(cfg, keys, label_values, channels))


def _flip(cfg: PreprocessConfig) -> list:
    """Left/right flip (array axis 0: X in RAS)."""
    return [RandFlipd(["image", "label"], spatial_axis=list(FLIP_AXES), prob=0.5)] if cfg.augment else []


def _augment(cfg: PreprocessConfig, dims: int, flip: bool = True) -> list:
    """Flip (left/right), small in-plane rotation and zoom (image bilinear, label nearest), intensity jitter.

    Windowed CT and RGB images (values in [0, 1]) get a mild scale/shift/noise. Z-scored images (unit
    variance: MRI, CT z-score) get nnU-Net's intensity augmentation with MONAI's transforms: Gaussian
    noise (variance up to 0.1), Gaussian blur, brightness x U(0.75, 1.25), gamma in (0.7, 1.5).
    """
    if not cfg.augment:
        return []
    keys = ["image", "label"]
    rotate = math.pi / 12 if dims == 2 else (0.0, 0.0, math.pi / 12)
    spatial = [
        *(_flip(cfg) if flip else []),
        RandAffined(keys, prob=0.3, rotate_range=rotate, scale_range=0.1, mode=["bilinear", "nearest"],
                    padding_mode="zeros"),
    ]
    if cfg.intensity in ("ct", "rgb"):
        return [
            *spatial,
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.05, prob=0.5),
            RandGaussianNoised("image", std=0.02, prob=0.3),
        ]
    return [
        *spatial,
        RandGaussianNoised("image", std=0.1**0.5, prob=0.1, sample_std=True),
        RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.1),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.15, retain_stats=True),
    ]


def _pos_neg(cfg: PreprocessConfig) -> dict:
    """RandCropByPosNegLabeld arguments: negative centres on voxels above 0 ('ct', 'rgb', 'mri': the image
    after its intensity step is 0 outside the body), or anywhere in the cropped volume (z-scored modes)."""
    anywhere = cfg.intensity in CENTRED_MODES
    return {"pos": cfg.positive_fraction, "neg": 1.0 - cfg.positive_fraction, "num_samples": cfg.samples_per_volume,
            "image_key": None if anywhere else "image", "image_threshold": 0.0}


def patch_train_transforms(
    cfg: PreprocessConfig, label_values: Sequence[int] | None = None, channels: int = 1
) -> Compose:
    """Training pipeline: ``cfg.patch_size`` patches (3D volumes, or 2D images when ``spatial_dims`` is 2).

    Padding comes after the crop: caches hold everything up to the first random step, and that part
    must equal the validation pipeline's, which shares the cache entry of a case.
    """
    keys = ["image", "label"]
    return Compose([
        *deterministic_transforms(cfg, keys, label_values, channels),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=cfg.patch_size, allow_smaller=True,
                               **_pos_neg(cfg)),
        SpatialPadd(keys, spatial_size=cfg.patch_size),
        *_augment(cfg, cfg.spatial_dims),
    ])


def slice_train_transforms(
    cfg: PreprocessConfig, label_values: Sequence[int] | None = None, channels: int = 1
) -> Compose:
    """Training pipeline for a multi-view 2D network: slices from the views in ``cfg.slice_axes``.

    The left/right flip runs on the volume before slicing: slice axis 0 is X only for axial and coronal
    slices (a sagittal slice's axis 0 is Y, anterior/posterior).
    """
    if cfg.spatial_dims != 3:
        raise ValueError("slice_train_transforms slices 3D volumes; use patch_train_transforms for 2D images")
    keys = ["image", "label"]
    pos_neg = _pos_neg(cfg)
    return Compose([
        *deterministic_transforms(cfg, keys, label_values, channels),
        *_flip(cfg),
        RandSliced(keys, "label", cfg.slice_axes, cfg.slice_size, **pos_neg),
        *_augment(cfg, 2, flip=False),
    ])


def val_transforms(cfg: PreprocessConfig, label_values: Sequence[int] | None = None, channels: int = 1) -> Compose:
    """Validation pipeline: the whole preprocessed volume and its label."""
    return Compose(deterministic_transforms(cfg, ("image", "label"), label_values, channels))


def inference_transforms(cfg: PreprocessConfig, channels: int = 1) -> Compose:
    """Inference pipeline: the whole preprocessed image, with the transform trace kept for inversion."""
    return Compose(deterministic_transforms(cfg, ("image",), None, channels))


def invert_transform(pipeline: Compose, keys: KeysCollection = "pred", nearest: bool = False) -> Invertd:
    """``Invertd`` mapping `keys` (made on ``data['image']`` of `pipeline`) back to the input file's grid.

    Undoes crop, resampling and orientation: the result has the input's shape and affine. Use
    ``nearest=True`` for label maps, False (bilinear) for probabilities.
    """
    return Invertd(keys, transform=pipeline, orig_keys="image", nearest_interp=nearest, to_tensor=True)
