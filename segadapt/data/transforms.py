"""MONAI transform pipelines built from a :class:`~segadapt.data.config.PreprocessConfig`.

Every pipeline starts with the same deterministic part (cached by the dataset builders)::

    LoadCased -> Orientationd(cfg.orientation) -> Spacingd(cfg.target_spacing) -> CropForegroundd -> intensity
        -> RequireForegroundd (an all-air / blank case is refused, naming it)

intensity: 'ct' stacks HU windows as channels (:class:`CTWindowd`), 'ct_zscore' clips and z-scores with the
dataset's statistics (:class:`CTZScored`), 'zscore' z-scores each case over its non-background voxels
(:class:`ZScored`), 'mri' z-scores nonzero voxels, 'rgb' divides by 255. Then, per pipeline:

* :func:`patch_train_transforms`: ``spatial_dims``-D patches of ``patch_size``, lesion-centred with
  probability ``positive_fraction`` (MONAI ``RandCropByPosNegLabeld``), ``samples_per_volume`` per visit,
  then augmentation. Image (C, *patch_size), label (1, *patch_size).
* :func:`slice_train_transforms`: 2D slices along a view drawn from ``slice_axes`` (:class:`RandSliced`)
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
from collections.abc import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms.utils import map_binary_to_indices
from monai.utils import SpaceKeys, TraceKeys
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    Invertd,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    Orientation,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)

from .config import SLICE_AXES, PreprocessConfig
from .loading import LoadCased, RequireForegroundd


class ImageOrientation(Orientation):
    """MONAI ``Orientation`` whose inverse reorients with as many axis codes as the image has spatial dims.

    MONAI (1.6) takes the inverse's codes from the original 4 x 4 affine: three letters also for a 2D image,
    and a warning on every 2D image ('axcodes ... length is smaller than number of input spatial
    dimensions D=2'). The first two letters are the 2D image's own codes; volumes are inverted as MONAI does.
    """

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        labels = self.labels
        if isinstance(data, MetaTensor) and labels is None and SpaceKeys(data.meta.get("space", "RAS")) == SpaceKeys.LPS:
            labels = (("R", "L"), ("A", "P"), ("I", "S"))  # as MONAI: LPS tensors
        codes = nib.orientations.aff2axcodes(transform[TraceKeys.EXTRA_INFO]["original_affine"], labels=labels)
        inverse = Orientation(axcodes="".join(codes[: data.ndim - 1]), as_closest_canonical=False, labels=labels)
        with inverse.trace_transform(False):
            return inverse(data)


class ImageOrientationd(Orientationd):
    """``Orientationd`` with :class:`ImageOrientation` (no 3D-only warning when inverted on 2D images)."""

    def __init__(self, keys: KeysCollection, axcodes: str, labels: Sequence[tuple[str, str]] | None = None) -> None:
        super().__init__(keys, axcodes=axcodes, labels=labels)
        self.ornt_transform = ImageOrientation(axcodes=axcodes, labels=labels)


class CTWindowd(MapTransform):
    """Stack CT windows as channels: (C, *spatial) HU -> (C * n_windows, *spatial) in [0, 1].

    Window (L, W) maps HU to clip((HU - (L - W/2)) / W, 0, 1), i.e. MONAI ``ScaleIntensityRange`` from
    [L - W/2, L + W/2] to [0, 1] with clipping; MONAI has no multi-window transform, so this stacks them.
    Example: windows [[40, 80]] sends 0 HU -> 0, 40 HU -> 0.5, 80 HU and above -> 1.
    """

    def __init__(self, keys: KeysCollection, windows: Sequence[Sequence[float]]) -> None:
        super().__init__(keys)
        self.scalers = [
            ScaleIntensityRange(a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True)
            for level, width in windows
        ]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.cat([scale(d[key]) for scale in self.scalers], dim=0)
        return d


class CTZScored(MapTransform):
    """nnU-Net's CTNormalization per channel c: x -> (clip(x, low_c, high_c) - mean_c) / std_c.

    (low, high, mean, std) are dataset-wide foreground statistics (the 0.5 and 99.5 percentiles, mean and
    standard deviation; :func:`segadapt.data.plan.fingerprint`). Done as MONAI ``ScaleIntensityRange`` from
    [low, high] to [(low - mean) / std, (high - mean) / std] with clipping, which is the same affine map.
    Example: clip [-100, 300], mean 100, std 50: -500 -> -4, 150 -> 1, 1000 -> 4.
    """

    def __init__(self, keys: KeysCollection, clip_range: Sequence[Sequence[float]], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__(keys)
        self.scalers = [
            ScaleIntensityRange(a_min=low, a_max=high, b_min=(low - m) / s, b_max=(high - m) / s, clip=True)
            for (low, high), m, s in zip(clip_range, mean, std)
        ]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            _check_channels(d[key], len(self.scalers), "clip_range/norm_mean/norm_std")
            d[key] = torch.cat([scale(d[key][c : c + 1]) for c, scale in enumerate(self.scalers)], dim=0)
        return d


def differs_from_background(x: torch.Tensor | np.ndarray, background: float) -> torch.Tensor | np.ndarray:
    """Voxels of `x` (tensor or array) that are not the background value: |x - b| > 1e-5 * max(1, |b|).

    The tolerance absorbs the float rounding that resampling a constant region adds; nothing else.
    """
    return abs(x - background) > 1e-5 * max(1.0, abs(background))


class _DiffersFrom:
    """Picklable ``select_fn`` for ``CropForegroundd``: voxels differing from their channel's background value."""

    def __init__(self, background: Sequence[float | None]) -> None:
        self.background = list(background)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(x, len(self.background), "background_value")
        differs = torch.zeros_like(x, dtype=torch.bool)
        for c, b in enumerate(self.background):
            if b is not None:
                differs[c] = differs_from_background(x[c], b)
        return differs


class ZScored(MapTransform):
    """Per-case z-score over the foreground, per channel c: x -> (x - mean_c) / std_c on voxels with x != b_c.

    mean and std (population) are taken over the voxels that differ from the channel's background value b_c
    (within float rounding); background voxels become 0. b_c None: every voxel counts (plain z-score). This
    is nnU-Net's ZScoreNormalization with its mask "not background" instead of "nonzero"; MONAI
    ``NormalizeIntensity(nonzero=True)`` on x - b_c does it. Example: b = 17, values [17, 17, 20, 24]
    -> [0, 0, -1, 1].
    """

    def __init__(self, keys: KeysCollection, background: Sequence[float | None]) -> None:
        super().__init__(keys)
        self.background = list(background)
        self.masked = NormalizeIntensity(nonzero=True)
        self.plain = NormalizeIntensity(nonzero=False)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            _check_channels(image, len(self.background), "background_value")
            channels = []
            for c, b in enumerate(self.background):
                x = image[c : c + 1].float()
                if b is None:
                    channels.append(self.plain(x))
                else:
                    shifted = torch.where(differs_from_background(x, b), x - b, torch.zeros_like(x))
                    channels.append(self.masked(shifted))
            d[key] = torch.cat(channels, dim=0)
        return d


def _check_channels(image: torch.Tensor, expected: int, fields: str) -> None:
    if image.shape[0] != expected:
        raise ValueError(f"the image has {image.shape[0]} channel(s) but {fields} give {expected}; "
                         "one entry per image channel is needed")


class _Above:
    """Picklable ``select_fn`` for ``CropForegroundd``: voxels above a threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold


def _background(cfg: PreprocessConfig, channels: int) -> list[float | None]:
    return list(cfg.background_value) if cfg.background_value is not None else [None] * channels


def _intensity(cfg: PreprocessConfig, channels: int) -> MapTransform:
    if cfg.intensity == "ct":
        return CTWindowd("image", cfg.windows)
    if cfg.intensity == "ct_zscore":
        return CTZScored("image", cfg.clip_range, cfg.norm_mean, cfg.norm_std)
    if cfg.intensity == "zscore":
        return ZScored("image", _background(cfg, channels))
    if cfg.intensity == "mri":
        return NormalizeIntensityd("image", nonzero=True, channel_wise=True)
    return ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0)


def _crop_select(cfg: PreprocessConfig, channels: int) -> _Above | _DiffersFrom | None:
    """What the foreground crop keeps: HU above the threshold (CT), not background ('zscore'), else > 0.

    None (no crop) for 'zscore' without any background value: nothing marks a region as empty.
    """
    if cfg.intensity in ("ct", "ct_zscore"):
        return _Above(cfg.foreground_threshold)
    if cfg.intensity == "zscore":
        background = _background(cfg, channels)
        return _DiffersFrom(background) if any(b is not None for b in background) else None
    return _Above(0.0)


def deterministic_transforms(
    cfg: PreprocessConfig,
    keys: Sequence[str] = ("image", "label"),
    label_values: Sequence[int] | None = None,
    channels: int = 1,
) -> list:
    """The cached part shared by all pipelines: load + check, orient, resample, crop, intensity."""
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    steps: list = [LoadCased(keys, label_values, channels, cfg.spatial_dims, cfg.affine_tolerance)]
    steps.append(ImageOrientationd(keys, axcodes=cfg.orientation, labels=None))  # labels from the MetaTensor space
    if cfg.target_spacing is not None:
        steps.append(Spacingd(keys, pixdim=cfg.target_spacing, mode=modes))
    threshold = cfg.foreground_threshold if cfg.intensity == "ct" else 0.0
    if cfg.crop_foreground:
        select = _crop_select(cfg, channels)
        if select is not None:
            steps.append(CropForegroundd(keys, source_key="image", select_fn=select, allow_smaller=True,
                                         start_coord_key=None, end_coord_key=None))
    steps.append(_intensity(cfg, channels))
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=True))
    unit = " HU" if cfg.intensity == "ct" else ""
    crop = f"none above the crop threshold {threshold:g}{unit}, or " if cfg.crop_foreground else ""
    if cfg.intensity in CENTRED_MODES:
        steps.append(RequireForegroundd("image", what=f"{crop}none left after the crop or a constant volume",
                                        nonzero=True, zscored=True))
    else:
        steps.append(RequireForegroundd("image", what=f"{crop}none above 0 after the {cfg.intensity} intensity step",
                                        zscored=cfg.intensity == "mri"))
    return steps


# The spatial axes training flips (left/right: array axis 0, X in RAS); test-time mirroring uses the same ones.
FLIP_AXES = (0,)


def flip_axes(cfg: PreprocessConfig) -> list[int]:
    """The spatial axes the training augmentation of `cfg` flips (none when it does not augment)."""
    return list(FLIP_AXES) if cfg.augment else []


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


# Intensity modes whose output is centred on 0 over the whole cropped volume: any voxel of it is anatomy.
CENTRED_MODES = ("ct_zscore", "zscore")


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


class RandSliced(Randomizable, MapTransform):
    """Draw 2D slices of a 3D volume along one randomly chosen view.

    Per call: pick a view from `axes` uniformly, pad the two in-plane axes up to `slice_size`, draw
    `num_samples` (1, *slice_size) slabs with MONAI's ``RandCropByPosNegLabeld`` (lesion-centred with
    probability pos / (pos + neg)), squeeze the normal axis. (C, X, Y, Z) -> list of (C, *slice_size)
    dicts with ``view`` set to the normal axis (0 sagittal, 1 coronal, 2 axial).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        axes: Sequence[str],
        slice_size: Sequence[int],
        pos: float = 1.0,
        neg: float = 1.0,
        num_samples: int = 1,
        image_key: str | None = None,
        image_threshold: float = 0.0,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.axes = [SLICE_AXES[a] for a in axes]
        self.views = {}
        for axis in self.axes:
            size = list(slice_size)
            size.insert(axis, 1)
            pad = [s if i != axis else -1 for i, s in enumerate(size)]
            crop = RandCropByPosNegLabeld(keys, label_key, size, pos, neg, num_samples, image_key, image_threshold,
                                          fg_indices_key=_FG, bg_indices_key=_BG)
            self.views[axis] = (SpatialPadd(keys, spatial_size=pad), crop, SqueezeDimd(keys, dim=axis + 1))
        self._axis = self.axes[0]

    def set_random_state(self, seed: int | None = None, state=None) -> RandSliced:
        super().set_random_state(seed, state)
        for _, crop, _ in self.views.values():
            crop.set_random_state(state=self.R)
        return self

    def randomize(self, data: object = None) -> None:
        self._axis = self.axes[self.R.randint(len(self.axes))]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict]:
        self.randomize()
        pad, crop, squeeze = self.views[self._axis]
        padded = pad(data)
        indices = _padded_indices(data, padded, pad, crop)
        return [{**squeeze(sample), "view": self._axis} for sample in crop({**padded, **indices})]


_FG, _BG = "_fg_indices", "_bg_indices"  # RandCropByPosNegLabeld's precomputed centres (popped by it)


def _padded_indices(data: Mapping[Hashable, torch.Tensor], padded: Mapping[Hashable, torch.Tensor],
                    pad: SpatialPadd, crop: RandCropByPosNegLabeld) -> dict:
    """The crop's foreground / background centre indices in the padded volume, computed on the volume before
    padding (a few times smaller): MONAI's ``map_binary_to_indices`` there, each index moved by the padding.

    The same indices, in the same order, as MONAI computes on the padded volume, so the same crops: padding is
    a shift of every voxel, and the zeros it adds are neither foreground nor background when background
    means image > ``image_threshold`` >= 0. Without an image key (background anywhere, the padding included)
    MONAI computes them itself ({} returned)."""
    if crop.image_key is None or crop.cropper.image_threshold < 0:
        return {}
    label, image = data[crop.label_key], data[crop.image_key]
    small, big = tuple(label.shape[1:]), tuple(padded[crop.label_key].shape[1:])
    before = [width[0] for width in pad.padder.compute_pad_width(small)[1:]]
    fg, bg = map_binary_to_indices(label, image, crop.cropper.image_threshold)

    def shifted(indices: torch.Tensor) -> torch.Tensor:
        coords = np.unravel_index(np.asarray(indices), small)
        return torch.as_tensor(np.ravel_multi_index(tuple(c + b for c, b in zip(coords, before)), big))

    return {_FG: shifted(fg), _BG: shifted(bg)}


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
