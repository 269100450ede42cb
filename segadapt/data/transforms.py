"""segadapt's own transforms, each an array transform and the dictionary transform that wraps it (MONAI's
convention: ``CTWindow`` / ``CTWindowd``), for what MONAI has no transform for. The pipelines that use them, and
the one preprocessing spec they are instantiated from: :mod:`segadapt.data.pipelines`.

* :class:`ImageOrientation` / ``d``: MONAI's ``Orientation`` whose inverse also fits 2D images.
* :class:`CTWindow` / ``d``: several HU windows stacked as channels.
* :class:`CTZScore` / ``d``: nnU-Net's CT normalisation (clip, then z-score with dataset statistics) per channel.
* :class:`ZScore` / ``d``: a per-case z-score that leaves a background value out, per channel.
* :class:`DiffersFrom`: ``CropForegroundd``'s ``select_fn`` for "not the background value".
* :class:`RandSliced`: 2D slices of a volume along a random view, image and label together (dictionary only:
  like MONAI's ``RandCropByPosNegLabeld`` it samples the image where the label says).

``FLIP_AXES`` / :func:`flip_axes`: the axes the training augmentation flips (and test-time mirroring uses).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms.utils import map_binary_to_indices
from monai.transforms import (
    MapTransform,
    NormalizeIntensity,
    Orientation,
    Orientationd,
    RandCropByPosNegLabeld,
    Randomizable,
    ScaleIntensityRange,
    SpatialPadd,
    SqueezeDimd,
    Transform,
)
from monai.utils import SpaceKeys, TraceKeys

from .config import SLICE_AXES, PreprocessConfig

# The spatial axes training flips (left/right: array axis 0, X in RAS); test-time mirroring uses the same ones.
FLIP_AXES = (0,)


def flip_axes(cfg: PreprocessConfig) -> list[int]:
    """The spatial axes the training augmentation of `cfg` flips (none when it does not augment)."""
    return list(FLIP_AXES) if cfg.augment else []


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


def _check_channels(image: torch.Tensor, expected: int, fields: str) -> None:
    if image.shape[0] != expected:
        raise ValueError(f"the image has {image.shape[0]} channel(s) but {fields} give {expected}; "
                         "one entry per image channel is needed")


class CTWindow(Transform):
    """Stack CT windows as channels: (C, *spatial) HU -> (C * n_windows, *spatial) in [0, 1].

    Window (L, W) maps HU to clip((HU - (L - W/2)) / W, 0, 1), i.e. MONAI ``ScaleIntensityRange`` from
    [L - W/2, L + W/2] to [0, 1] with clipping; MONAI has no multi-window transform, so this stacks them.
    Example: windows [[40, 80]] sends 0 HU -> 0, 40 HU -> 0.5, 80 HU and above -> 1.
    """

    def __init__(self, windows: Sequence[Sequence[float]]) -> None:
        self.scalers = [
            ScaleIntensityRange(a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True)
            for level, width in windows
        ]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([scale(image) for scale in self.scalers], dim=0)


class CTZScore(Transform):
    """nnU-Net's CTNormalization per channel c: x -> (clip(x, low_c, high_c) - mean_c) / std_c.

    (low, high, mean, std) are dataset-wide foreground statistics (the 0.5 and 99.5 percentiles, mean and
    standard deviation; :func:`segadapt.plan.fingerprint.fingerprint`). Done as MONAI ``ScaleIntensityRange`` from
    [low, high] to [(low - mean) / std, (high - mean) / std] with clipping, which is the same affine map.
    Example: clip [-100, 300], mean 100, std 50: -500 -> -4, 150 -> 1, 1000 -> 4.
    """

    def __init__(self, clip_range: Sequence[Sequence[float]], mean: Sequence[float], std: Sequence[float]) -> None:
        self.scalers = [
            ScaleIntensityRange(a_min=low, a_max=high, b_min=(low - m) / s, b_max=(high - m) / s, clip=True)
            for (low, high), m, s in zip(clip_range, mean, std)
        ]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_channels(image, len(self.scalers), "clip_range/norm_mean/norm_std")
        return torch.cat([scale(image[c : c + 1]) for c, scale in enumerate(self.scalers)], dim=0)


def differs_from_background(x: torch.Tensor | np.ndarray, background: float) -> torch.Tensor | np.ndarray:
    """Voxels of `x` (tensor or array) that are not the background value: |x - b| > 1e-5 * max(1, |b|).

    The tolerance absorbs the float rounding that resampling a constant region adds; nothing else.
    """
    return abs(x - background) > 1e-5 * max(1.0, abs(background))


class DiffersFrom:
    """Picklable ``select_fn`` for ``CropForegroundd``: voxels differing from their channel's background value
    (channels whose value is None select nothing)."""

    def __init__(self, background: Sequence[float | None]) -> None:
        self.background = list(background)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(x, len(self.background), "background_value")
        differs = torch.zeros_like(x, dtype=torch.bool)
        for c, b in enumerate(self.background):
            if b is not None:
                differs[c] = differs_from_background(x[c], b)
        return differs


class ZScore(Transform):
    """Per-case z-score over the foreground, per channel c: x -> (x - mean_c) / std_c on voxels with x != b_c.

    mean and std (population) are taken over the voxels that differ from the channel's background value b_c
    (within float rounding); background voxels become 0. b_c None: every voxel counts (plain z-score). This
    is nnU-Net's ZScoreNormalization with its mask "not background" instead of "nonzero"; MONAI
    ``NormalizeIntensity(nonzero=True)`` on x - b_c does it. Example: b = 17, values [17, 17, 20, 24]
    -> [0, 0, -1, 1].
    """

    def __init__(self, background: Sequence[float | None]) -> None:
        self.background = list(background)
        self.masked = NormalizeIntensity(nonzero=True)
        self.plain = NormalizeIntensity(nonzero=False)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_channels(image, len(self.background), "background_value")
        channels = []
        for c, b in enumerate(self.background):
            x = image[c : c + 1].float()
            if b is None:
                channels.append(self.plain(x))
            else:
                shifted = torch.where(differs_from_background(x, b), x - b, torch.zeros_like(x))
                channels.append(self.masked(shifted))
        return torch.cat(channels, dim=0)


class _Mapped(MapTransform):
    """A dictionary transform applying its array transform ``self.transform`` to every key."""

    transform: Transform

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class CTWindowd(_Mapped):
    """Dictionary :class:`CTWindow`."""

    def __init__(self, keys: KeysCollection, windows: Sequence[Sequence[float]]) -> None:
        super().__init__(keys)
        self.transform = CTWindow(windows)


class CTZScored(_Mapped):
    """Dictionary :class:`CTZScore`."""

    def __init__(self, keys: KeysCollection, clip_range: Sequence[Sequence[float]], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__(keys)
        self.transform = CTZScore(clip_range, mean, std)


class ZScored(_Mapped):
    """Dictionary :class:`ZScore`."""

    def __init__(self, keys: KeysCollection, background: Sequence[float | None]) -> None:
        super().__init__(keys)
        self.transform = ZScore(background)


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
