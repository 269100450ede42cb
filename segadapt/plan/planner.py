"""The dataset plan: nnU-Net v2's self-configuration rules applied to a fingerprint, as plain data.

::

    fp = fingerprint("data/x/dataset.json")                # segadapt.plan.fingerprint
    plan = make_plan(fp, memory_gb=8)                       # -> Plan (to_json / from_json)
    PreprocessConfig.from_dict({**defaults, **plan.preprocess_fields()})
    plan.network_fields()["dynunet"]                        # kernel_size, strides, filters, ...
    plan = load_or_make_plan("data/x/dataset.json", "outputs/plans")   # cached by the dataset's content
    segadapt plan DATASET_JSON [--out plan.json] [--memory-gb 8] [--overwrite]   # prints every planned value

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
  :func:`_ct_normalisation`); RGB, or 8-bit RGB(A) 2D image files (PNG, JPEG, BMP, TIFF) whatever their
  channels are named -> 'rgb' (x / 255); MRI and anything else -> 'mri' (z-score over the
  nonzero voxels) when every channel's background is 0, else 'zscore' (per case, over the voxels that
  differ from the detected background; the whole volume when none is detected).
  ``intensity='ct'`` asks for HU windows as channels instead.

The topology, patch and batch rules are :mod:`segadapt.plan.topology`'s; the CPU time budget
(:mod:`segadapt.plan.budget`) may shrink batch, filters and patch afterwards.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np

from segadapt.data.config import INTENSITY_MODES, PreprocessConfig
from segadapt.io import write_json
from segadapt.models.registry import MODELS

from .fingerprint import (
    BODY_HU,
    FINGERPRINT_VERSION,
    fingerprint_folder,
    load_or_make_fingerprint,
    normalisation_scheme,
)
from .topology import (
    BASE_FILTERS,
    INITIAL_VOXELS,
    MAX_FILTERS_2D,
    MAX_FILTERS_3D,
    REFERENCE_BATCH_2D,
    REFERENCE_BATCH_3D,
    REFERENCE_GB,
    REFERENCE_PATCH_VOXELS,
    REFERENCE_SLICE_PIXELS,
    batch_for_budget,
    fit_patch,
    stage_filters,
)

PLAN_VERSION = 1
ANISOTROPY_THRESHOLD = 3.0        # nnU-Net's ANISO_THRESHOLD
MIN_BODY_IN_FOREGROUND_RANGE = 0.25  # nnU-Net's CT clip serves when this share of the body lies inside it


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
        patch, pools, strides, kernels = fit_patch(target, median_shape, patch_budget, INITIAL_VOXELS[3])
        batch = batch_for_budget(patch, patch_budget, REFERENCE_BATCH_3D, dataset_voxels)
        filters = stage_filters(len(strides), base_filters, MAX_FILTERS_3D)
        side = max(median_shape)  # every view's slice fits in side x side
        finest = float(min(target))
        slice_size, slice_pools_axes, _, _ = fit_patch([finest, finest], [side, side], slice_budget, INITIAL_VOXELS[2])
        slice_pools = min(slice_pools_axes)
        slice_batch = batch_for_budget(slice_size, slice_budget, REFERENCE_BATCH_2D, dataset_voxels)
    else:
        patch, pools, strides, kernels = fit_patch(target, median_shape, slice_budget, INITIAL_VOXELS[2])
        batch = batch_for_budget(patch, slice_budget, REFERENCE_BATCH_2D, dataset_voxels)
        filters = stage_filters(len(strides), base_filters, MAX_FILTERS_2D)
        slice_size, slice_pools, slice_batch = list(patch), min(pools), batch
    slice_filters = stage_filters(slice_pools + 1, base_filters, MAX_FILTERS_2D)

    modality = {str(k): str(v) for k, v in fp["modality"].items()}
    if not fp.get("modality_declared", True):
        notes.append("dataset.json declares no modality (nor channel_names): CT assumed")
    schemes = [normalisation_scheme(m) for m in modality.values()]
    forced = intensity is not None
    if intensity is None and fp.get("rgb8_images"):
        intensity = "rgb"
        if set(schemes) != {"rgb"}:
            notes.append(f"8-bit RGB image files (modality {list(modality.values())}): 'rgb', x / 255")
    elif intensity is None:
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

