"""nnU-Net's postprocessing, chosen by cross-validation: keep the largest connected component of a class.

Per validation case and foreground class c (predicted class map P, true class map T, true foreground F = T > 0),
the voxel counts are kept without and with MONAI's ``KeepLargestConnectedComponent`` on class c (P'):
|P_c & T_c|, |P_c|, |P_c & F| and |T_c|, |F|. From them

    Dice_c = 2 |P_c & T_c| / (|P_c| + |T_c|)            (1 when both are empty)

and class c is postprocessed iff the mean over the cases of Dice_c with it is >= without it (nnU-Net's rule;
the component step on c leaves the other classes' voxels as they are, so the classes are decided apart).
The foreground Dice with the choice, comparable with metrics.json's ``val.dice`` (the raw prediction's), is

    Dice = 2 sum_c |Q_c & F| / (sum_c |Q_c| + |F|),     Q_c = P'_c if c is postprocessed else P_c.

A fold ensemble decides once on the pooled validation cases of its runs, as nnU-Net decides on the pooled
cross-validation: per class, the case-weighted means of the runs' Dice with and without (:func:`pooled_choice`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from monai.utils import convert_to_dst_type

from segadapt.runs import METRICS_FILE

RULE = "largest connected component of class c kept iff mean validation Dice_c with it >= without it (nnU-Net)"


def keep_largest_component(labels: torch.Tensor | np.ndarray, classes: Sequence[int]) -> torch.Tensor | np.ndarray:
    """Class map ``(*spatial)`` with only the largest connected component (full connectivity) of each of
    `classes` kept; the rest of those classes becomes background."""
    if not classes:
        return labels
    keep = KeepLargestConnectedComponent(applied_labels=[int(c) for c in classes], is_onehot=False, independent=True)
    kept = keep(labels[None].copy() if isinstance(labels, np.ndarray) else labels[None].clone())[0]  # MONAI's works in place
    return convert_to_dst_type(kept, labels)[0]  # MONAI returns a tensor for a numpy input: give back the input's type


def component_counts(labels: torch.Tensor, truth: torch.Tensor, classes: int) -> dict[str, Any]:
    """Voxel counts of one case for classes 1..`classes` (module docstring): ``true`` |T_c|, ``foreground`` |F|,
    ``without`` / ``with`` [|P_c & T_c|, |P_c|, |P_c & F|] per class."""
    labels, truth = torch.as_tensor(labels).long().cpu(), torch.as_tensor(truth).long().cpu()
    fg = truth > 0
    counts: dict[str, Any] = {"true": [], "foreground": int(fg.sum()), "without": [], "with": []}
    for c in range(1, classes + 1):
        kept = keep_largest_component(labels, [c])
        counts["true"].append(int((truth == c).sum()))
        for key, pred in (("without", labels == c), ("with", kept == c)):
            counts[key].append([int((pred & (truth == c)).sum()), int(pred.sum()), int((pred & fg).sum())])
    return counts


def _dice(overlap: int, pred: int, true: int) -> float:
    return 1.0 if pred + true == 0 else 2.0 * overlap / (pred + true)


def choose_postprocessing(counts: Mapping[str, Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """The fold's choice from its validation cases' counts (case id -> :func:`component_counts`); None without cases.

    Returns ``classes``, ``largest_component`` (per class), ``dice_with`` / ``dice_without`` (per class, mean
    over the cases), ``n_cases``, ``dice`` (mean foreground Dice with the choice) and ``rule``.
    """
    cases = list(counts.values())
    if not cases:
        return None
    classes = len(cases[0]["true"])
    mean = {key: [float(np.mean([_dice(*case[key][c][:2], case["true"][c]) for case in cases])) for c in range(classes)]
            for key in ("without", "with")}
    chosen = [mean["with"][c] >= mean["without"][c] for c in range(classes)]
    dice = []
    for case in cases:
        picked = [case["with" if chosen[c] else "without"][c] for c in range(classes)]
        dice.append(_dice(sum(p[2] for p in picked), sum(p[1] for p in picked), case["foreground"]))
    return {"classes": list(range(1, classes + 1)), "largest_component": chosen, "dice_with": mean["with"],
            "dice_without": mean["without"], "n_cases": len(cases), "dice": float(np.mean(dice)), "rule": RULE}


def pooled_choice(records: Sequence[Optional[Mapping[str, Any]]]) -> list[bool]:
    """Per class, whether a fold ensemble keeps the largest component: the case-weighted mean Dice with it over
    the runs' records >= without it. No postprocessing ([]) when a run has no record (a run from before
    segadapt chose one, or a ``none`` run): such an ensemble predicts as it did."""
    if not records or any(r is None for r in records):
        return []
    weights = np.array([r["n_cases"] for r in records], dtype=np.float64)
    pooled = {key: np.average(np.array([r[key] for r in records], dtype=np.float64), axis=0, weights=weights)
              for key in ("dice_with", "dice_without")}
    return [bool(w >= wo) for w, wo in zip(pooled["dice_with"], pooled["dice_without"])]


def chosen_classes(largest_component: Sequence[bool]) -> list[int]:
    """The classes (1-based) whose largest component is kept."""
    return [c for c, keep in enumerate(largest_component, start=1) if keep]


def recorded_postprocessing(run_dirs: Sequence[str | os.PathLike]) -> list[bool]:
    """Per foreground class, whether an ensemble of these runs keeps the largest component: decided once on
    their pooled validation cases (``postprocessing`` in each ``metrics.json``:
    :func:`pooled_choice`); [] when a run has no record."""
    records = []
    for run_dir in run_dirs:
        path = Path(run_dir) / METRICS_FILE
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")).get("postprocessing") if path.is_file() else None)
        except ValueError as error:
            raise ValueError(f"cannot read {path}: {error}") from None
    return pooled_choice(records)
