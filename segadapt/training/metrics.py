"""Per-case segmentation metrics on whole volumes, and their summary over a fold or a method.

Per case (one whole validation volume, foreground = label > 0):

* Dice = 2 |P & T| / (|P| + |T|) (MONAI ``DiceMetric``; 1 when both are empty, 0 when only one is);
* HD95 = the larger of the two directed 95th-percentile surface distances (prediction to truth, truth
  to prediction) in mm, using the voxel spacing (MONAI ``HausdorffDistanceMetric(percentile=95)``; 0 when
  both are empty, NaN -- undefined, counted apart and left out of the mean -- when only one is);
* lesion volume in mL = voxel count * |det(affine[:3, :3])| / 1000, for the prediction and the truth; on
  2D images (H, W) the lesion area in mm^2 = pixel count * |det(affine[:2, :2])| (in pixels when
  the files carry no spacing: PNG, JPEG; :func:`segadapt.data.dataset_json.size_unit`). The keys name the unit:
  ``pred_ml`` / ``true_ml``, ``pred_mm2`` / ``true_mm2``, ``pred_px`` / ``true_px`` (:func:`size_keys`; files
  written before 2D sizes had their own keys hold every unit in ``*_ml``: :func:`case_sizes` reads both).

Summaries group cases into lesion-volume bins by their *true* volume: with edges ``[e0, e1, ..., en]``
case c falls in bin i when ``e_i <= V_c < e_{i+1}`` (the last edge may be ``inf``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
import torch
from monai.data.utils import affine_to_spacing
from monai.metrics import DiceMetric, HausdorffDistanceMetric

CASE_KEYS = ("dice", "hd95", "pred_ml", "true_ml")  # of a volume; 2D images: size_keys(unit)
SIZE_SUFFIXES = {"mL": "ml", "mm^2": "mm2", "px": "px"}  # lesion size unit -> the suffix of its keys


def size_keys(unit: str) -> tuple[str, str]:
    """The (predicted, true) size keys of a case in `unit`: 'mL' -> ('pred_ml', 'true_ml'), 'px' -> ('pred_px', ...)."""
    if unit not in SIZE_SUFFIXES:
        raise ValueError(f"size unit must be one of {list(SIZE_SUFFIXES)}, got {unit!r}")
    return f"pred_{SIZE_SUFFIXES[unit]}", f"true_{SIZE_SUFFIXES[unit]}"


def case_unit(case: Mapping[str, object]) -> str:
    """The unit of a case row's sizes, from its keys ('mL' for rows of older metrics.json files, which used ``*_ml``)."""
    return next((unit for unit in SIZE_SUFFIXES if size_keys(unit)[1] in case), "mL")


def case_sizes(case: Mapping[str, float]) -> tuple[float, float]:
    """(predicted, true) lesion size of a case row, whatever its unit (see :func:`case_unit`)."""
    pred, true = size_keys(case_unit(case))
    return case[pred], case[true]


def abs_error_key(unit: str) -> str:
    """The summary key of the mean |predicted - true| size: 'volume_abs_err_ml', 'area_abs_err_mm2', 'area_abs_err_px'."""
    return f"{'volume' if unit == 'mL' else 'area'}_abs_err_{SIZE_SUFFIXES[unit]}"


def abs_error(summary: Mapping[str, float]) -> float:
    """The mean |predicted - true| size of a :func:`summarize` result, whatever its unit."""
    return next(summary[abs_error_key(unit)] for unit in SIZE_SUFFIXES if abs_error_key(unit) in summary)


def voxel_volume_ml(affine: torch.Tensor | np.ndarray, spatial_dims: int = 3) -> float:
    """Size of one voxel of a grid with a voxel-to-mm `affine` (MONAI's 4 x 4 also for 2D images): in mL,
    |det(affine[:3, :3])| / 1000, for volumes; in mm^2, |det(affine[:2, :2])|, for 2D images (1 per pixel
    where the file has no spacing)."""
    a = np.asarray(affine, dtype=np.float64)[:spatial_dims, :spatial_dims]
    det = abs(float(np.linalg.det(a)))
    return det / 1000.0 if spatial_dims == 3 else det


def mask_volume_ml(mask: torch.Tensor | np.ndarray, affine: torch.Tensor | np.ndarray,
                   spatial_dims: int = 3) -> float:
    """Size of the nonzero voxels of `mask`: mL for volumes, mm^2 (or pixels) for 2D images."""
    return float(np.count_nonzero(np.asarray(mask))) * voxel_volume_ml(affine, spatial_dims)


def case_metrics(pred: torch.Tensor, truth: torch.Tensor, affine: torch.Tensor | np.ndarray,
                 unit: Optional[str] = None) -> dict[str, float]:
    """Dice, HD95 (mm), predicted and true lesion size of one case, under :func:`size_keys` of its unit.

    Args:
        pred, truth: foreground masks of one volume (X, Y, Z) or 2D image (H, W), spatial shape only, any dtype.
        affine: the volume's voxel-to-mm affine ((d+1) x (d+1)); gives the spacing and voxel volume.
        unit: 'mL', 'mm^2' or 'px' (2D image files without spacing: the affine's unit pixel); default 'mL' for
            volumes, 'mm^2' for 2D.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(truth.shape)}")
    p = (pred > 0).float()[None, None].cpu()
    t = (truth > 0).float()[None, None].cpu()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, t)
    empty_p, empty_t = not p.any(), not t.any()
    if empty_p or empty_t:
        hd95 = 0.0 if (empty_p and empty_t) else math.nan
    else:
        spacing = affine_to_spacing(torch.as_tensor(affine, dtype=torch.float64), r=p.ndim - 2).tolist()
        hd95 = float(HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(p, t, spacing=spacing))
    pred_key, true_key = size_keys(unit or ("mL" if pred.ndim == 3 else "mm^2"))
    return {
        "dice": float(dice),
        "hd95": hd95,
        pred_key: mask_volume_ml(p, affine, pred.ndim),
        true_key: mask_volume_ml(t, affine, pred.ndim),
    }


def bin_labels(edges: Sequence[float], unit: str = "mL") -> list[str]:
    """Names of the volume bins: [0, 5, 15, inf] -> ['0-5 mL', '5-15 mL', '>=15 mL'] (`unit`: 'mm^2', 'px' in 2D)."""
    if len(edges) < 2 or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"volume bin edges must be at least two increasing values, got {list(edges)}")
    return [f">={a:g} {unit}" if math.isinf(b) else f"{a:g}-{b:g} {unit}" for a, b in zip(edges[:-1], edges[1:])]


def volume_bin(volume_ml: float, edges: Sequence[float]) -> int | None:
    """Index i of the bin with edges[i] <= volume_ml < edges[i+1]; None outside all bins."""
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        if low <= volume_ml < high:
            return i
    return None


def mean_sd(values: Sequence[Optional[float]]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (None, NaN and inf are skipped; NaN when
    none is left; sd 0 for one)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two samples; NaN with fewer than two points or a constant sample."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def summarize(cases: Sequence[Mapping[str, float]], edges: Sequence[float]) -> dict[str, float]:
    """Fold-level numbers from per-case rows (dicts with :data:`CASE_KEYS`).

    Returns ``dice`` / ``dice_sd`` (over cases), ``hd95`` / ``hd95_sd`` (over cases where it is defined),
    ``hd95_undefined`` (cases with an empty prediction or label), ``volume_corr`` (Pearson of predicted vs
    true size), ``volume_abs_err_ml`` (mean |pred - true|; 2D: ``area_abs_err_mm2`` / ``_px``, :func:`abs_error_key`),
    ``n_cases``, and ``dice_bin<i>`` (mean Dice of
    the cases in volume bin i; NaN when the bin is empty) with ``n_bin<i>``.
    """
    labels = bin_labels(edges)
    sizes = [case_sizes(c) for c in cases]
    unit = case_unit(cases[0]) if cases else "mL"
    dice, dice_sd = mean_sd([c["dice"] for c in cases])
    hd95, hd95_sd = mean_sd([c["hd95"] for c in cases])
    out = {
        "n_cases": float(len(cases)),
        "dice": dice,
        "dice_sd": dice_sd,
        "hd95": hd95,
        "hd95_sd": hd95_sd,
        "hd95_undefined": float(sum(not np.isfinite(c["hd95"]) for c in cases)),
        "volume_corr": pearson([p for p, _ in sizes], [t for _, t in sizes]),
        abs_error_key(unit): mean_sd([abs(p - t) for p, t in sizes])[0],
    }
    for i in range(len(labels)):
        in_bin = [c["dice"] for c, (_, t) in zip(cases, sizes) if volume_bin(t, edges) == i]
        out[f"dice_bin{i}"] = mean_sd(in_bin)[0]
        out[f"n_bin{i}"] = float(len(in_bin))
    return out
