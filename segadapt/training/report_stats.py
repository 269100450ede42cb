"""The statistics of a cross-validation report: one aggregated row per method, with its bootstrap interval and
the paired Wilcoxon tests against ``full`` and ``none``, Holm-adjusted (:mod:`segadapt.training.report`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from segadapt.adapters import METHODS

from .metrics import bin_labels, summarize
from .module import BASELINES
from .report_runs import (AUTO_METHOD, check_each_case_once, is_auto, method_names, runs_size_unit,
                          settings_differences)

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
REFERENCES = ("none", "full")  # the paired tests' references

def bin_edges(values: Sequence[Any]) -> list[float]:
    return [math.inf if v is None else float(v) for v in values]


def _nan(value: Any) -> Any:
    return math.nan if value is None else value


def nan_mean_sd(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) skipping None and NaN (``numpy.nanmean`` / ``nanstd``);
    NaN when no value is left, sd NaN for a single one."""
    v = np.array([math.nan if x is None else x for x in values], dtype=np.float64)
    finite = int(np.count_nonzero(~np.isnan(v)))
    if finite == 0:
        return math.nan, math.nan
    return float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if finite > 1 else math.nan


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (``scipy.stats.bootstrap``, resampling the
    values, fixed `seed`); NaN with fewer than two finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return math.nan, math.nan
    result = stats.bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_p(values: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon`` defaults) of per-case values paired by
    case id with `reference`'s, over the cases both hold with finite values; NaN without any such case."""
    common = sorted(k for k in set(values) & set(reference)
                    if math.isfinite(values[k]) and math.isfinite(reference[k]))
    if not common:
        return math.nan
    x = np.array([values[k] for k in common], dtype=np.float64)
    y = np.array([reference[k] for k in common], dtype=np.float64)
    with warnings.catch_warnings():  # all differences zero: scipy warns and answers p = 1
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.wilcoxon(x, y).pvalue)

def _order(row: Mapping[str, Any]) -> tuple[str, int, str]:
    known = list(BASELINES) + list(METHODS)
    group, _, name = row["method"].rpartition("/")
    return (group, known.index(row["tuning"]) if row["tuning"] in known else len(known), name)

def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values of one family of tests (NaN entries are no test and stay NaN):
    with the m finite p-values in ascending order, p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)).

    Written out because scipy.stats has no Holm procedure and statsmodels (``multipletests``) is not a
    dependency of segadapt."""
    p = np.asarray(p_values, dtype=np.float64)
    tested = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(p.shape, math.nan)
    running = 0.0
    for i, k in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (tested.size - i) * p[k]))
        adjusted[k] = running
    return adjusted


def _cases(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: _nan(v) for k, v in c.items()} for c in rows]


def _row(method: str, tuning: str, folds: Sequence[dict[str, Any]], cases: list[dict[str, Any]],
         last_cases: list[dict[str, Any]], edges: Sequence[float]) -> dict[str, Any]:
    cost = [f.get("cost", {}) for f in folds]
    selected = [f.get("selection") for f in folds]
    return {
        "method": method,
        "tuning": tuning,
        "folds": [f["run"]["fold"] for f in folds],
        "fold_dice": [_nan(f["val"]["dice"]) for f in folds],
        "fold_n": [len(f.get("cases") or []) or _nan(f["val"].get("n_cases")) for f in folds],
        "fold_below_base": [bool(s and s.get("below_base")) for s in selected],
        "settings_differ": settings_differences(folds),
        "cases": cases,
        **summarize(cases, edges),
        "dice_ci": bootstrap_ci([c["dice"] for c in cases]),
        "dice_last": nan_mean_sd([c["dice"] for c in last_cases])[0],
        "selected_folds": sum(s is not None for s in selected),
        "below_base_folds": sum(bool(s and s.get("below_base")) for s in selected),
        "trainable_params": nan_mean_sd([c.get("trainable_params", 0) for c in cost])[0],
        "train_time_s": nan_mean_sd([c.get("train_time_s") for c in cost]),
        "train_steps": nan_mean_sd([c.get("train_steps") for c in cost])[0],
        "peak_mem_mb": nan_mean_sd([c.get("peak_mem_mb") for c in cost])[0],
        "peak_mem_increase_mb": nan_mean_sd([c.get("peak_mem_increase_mb") for c in cost])[0],
        "memory": cost[0].get("memory", ""),
        "base_from_runs": False,
    }


def _base_row(group: str, runs: Sequence[dict[str, Any]], edges: Sequence[float]) -> dict[str, Any] | None:
    """The unadapted base of a group without ``none`` runs: the first ``base_cases`` seen for each case."""
    by_case: dict[str, dict[str, Any]] = {}
    folds: dict[Any, dict[str, Any]] = {}
    for run in runs:
        for case in run.get("base_cases") or []:
            if case["case_id"] not in by_case:
                by_case[case["case_id"]] = case
                folds.setdefault(run["run"]["fold"], {"run": {"fold": run["run"]["fold"]}, "val": run["base_val"]})
    if not by_case:
        return None
    cases = _cases([by_case[k] for k in sorted(by_case)])
    fake_folds = [{**f, "cost": {"trainable_params": 0}} for _, f in sorted(folds.items())]
    row = _row(f"{group}/none" if group else "none", "none", fake_folds, cases, cases, edges)
    return {**row, "base_from_runs": True}


def _p_values(rows: list[dict[str, Any]]) -> None:
    """Set ``p_vs_none`` / ``p_vs_full`` of each row: paired against the group's reference rows."""
    for row in rows:
        group = row["method"].rpartition("/")[0]
        dice = {c["case_id"]: c["dice"] for c in row["cases"]}
        for reference in REFERENCES:
            candidates = [r for r in rows if r["tuning"] == reference and r["method"].rpartition("/")[0] == group]
            named = [r for r in candidates if r["method"].rpartition("/")[2] == reference]
            ref = (named or candidates or [None])[0]
            if ref is None or ref is row:
                row[f"p_vs_{reference}"] = math.nan
            else:
                row[f"p_vs_{reference}"] = paired_p(dice, {c["case_id"]: c["dice"] for c in ref["cases"]})
    for group in {r["method"].rpartition("/")[0] for r in rows}:  # each reference's tests in a group: one family
        members = [r for r in rows if r["method"].rpartition("/")[0] == group]
        for reference in REFERENCES:
            for row, p in zip(members, holm([r[f"p_vs_{reference}"] for r in members])):
                row[f"p_vs_{reference}_holm"] = float(p)


def method_rows(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(one aggregated row per method, the unadapted base always among them; the volume-bin labels)."""
    edges = bin_edges(runs[0]["volume_bins_ml"])
    for run in runs:
        if bin_edges(run["volume_bins_ml"]) != edges:
            raise ValueError(f"runs of one report must share volume bins; {run['run']} has {run['volume_bins_ml']}")
    labels = bin_labels(edges, runs_size_unit(runs))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run, name in zip(runs, method_names(runs)):
        by_method.setdefault(name, []).append(run)
    rows = []
    for method, group_runs in by_method.items():
        folds = sorted(group_runs, key=lambda r: r["run"]["fold"])
        check_each_case_once(method, folds)
        cases = _cases(c for f in folds for c in f["cases"])
        last = _cases(c for f in folds for c in (f.get("last_cases") or f["cases"]))
        tuning = AUTO_METHOD if is_auto(folds) else folds[0]["run"]["tuning"]  # auto: each fold its own choice
        rows.append(_row(method, tuning, folds, cases, last, edges))
    for group in sorted({m.rpartition("/")[0] for m in by_method}):
        if not any(r["tuning"] == "none" and r["method"].rpartition("/")[0] == group for r in rows):
            members = [run for m, rs in by_method.items() if m.rpartition("/")[0] == group for run in rs]
            base = _base_row(group, sorted(members, key=lambda r: r["run"]["fold"]), edges)
            if base is not None:
                rows.append(base)
    rows.sort(key=_order)
    _p_values(rows)
    return rows, labels


def paired_against(rows: Sequence[Mapping[str, Any]], method: str) -> list[dict[str, Any]]:
    """Row `method` against every other row of its group, paired by case over the cases both scored: n cases,
    both means over those cases, the mean difference (`method` - other), the two-sided Wilcoxon p
    (:func:`paired_p`) and its Holm adjustment over the family of these comparisons (:func:`holm`)."""
    row = next(r for r in rows if r["method"] == method)
    group = method.rpartition("/")[0]
    mine = {c["case_id"]: c["dice"] for c in row["cases"]}
    out = []
    for other in rows:
        if other is row or other["method"].rpartition("/")[0] != group:
            continue
        theirs = {c["case_id"]: c["dice"] for c in other["cases"]}
        common = [k for k in sorted(set(mine) & set(theirs)) if math.isfinite(mine[k]) and math.isfinite(theirs[k])]
        a = np.array([mine[k] for k in common], dtype=np.float64)
        b = np.array([theirs[k] for k in common], dtype=np.float64)
        out.append({"method": other["method"], "n": len(common), "mean": float(a.mean()) if common else math.nan,
                    "other_mean": float(b.mean()) if common else math.nan,
                    "difference": float((a - b).mean()) if common else math.nan, "p": paired_p(mine, theirs)})
    for entry, p in zip(out, holm([e["p"] for e in out])):
        entry["p_holm"] = float(p)
    return out

