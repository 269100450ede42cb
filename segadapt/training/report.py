"""Cross-validation report: every method and fold of an experiment folder as one table and two plots.

Reads every ``metrics.json`` of a ``fold<k>`` folder under the experiment folder (written by
:func:`segadapt.training.fit_run`; ``<experiment>/<method>/fold<k>`` or, one level deeper,
``<experiment>/<model>/<method>/fold<k>``) and writes into the experiment folder (or `out_dir`):

* ``report.md`` and ``report.csv``: one row per method, where a method is the folder that holds the fold
  folders (``lora_c``, or ``lora_c_r2`` / ``lora_c_n5`` in a rank study or learning curve run under their
  own names, or ``<model>/<method>`` when the folder holds several models' runs). The unadapted base is
  always a row (``none``): from the ``none`` runs, or else from the other runs' ``base_cases`` (the base
  validated on each fold before tuning). Over the validation cases of all folds pooled (in k-fold CV each
  case is validated exactly once): Dice mean +- sample sd, its 95% bootstrap interval (percentile
  method, :data:`BOOTSTRAP_RESAMPLES` resamples of the cases, seed :data:`BOOTSTRAP_SEED`;
  ``scipy.stats.bootstrap``), the two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``) of
  the paired per-case Dice (paired by case id, over the cases both validated) against ``none`` and against
  ``full`` (blank for the reference itself or when it is absent), HD95, Dice per lesion-volume bin, the
  correlation of predicted with true lesion volume, the Dice of the last training step (the table's Dice is
  the selected network's), and the folds whose selected inner-split Dice fell below the unadapted base's.
  Trainable parameters, training time (forward + backward + step, per fold) and peak memory are means over
  folds (``numpy.nanmean`` / ``nanstd``). Each case is scored on its label file's grid. Both files come from
  one pandas table (:func:`report_table`): report.csv is that table, report.md its cells formatted
  (``DataFrame.to_markdown``).
* ``dice_by_method.png``: mean Dice per method with its 95% bootstrap interval, each fold's mean as a dot, the
  unadapted base's mean as a dashed line, n (cases) under each method; a legend and a title.
* ``dice_vs_volume.png``: each validation case's Dice against its true lesion volume, per method, with
  the mean Dice of each volume bin (at the bin's median volume) joined by a line; bin edges dashed and
  labelled, each bin named; a legend of the methods with their n. The base is grey in both plots, every other
  method has its own colour, the same in both.

A learning curve or a study of several models is either one experiment folder per point (one report each)
or method folders whose names say the setting (``lora_c_n5``, ``lora_c_n10``): both need nothing more.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from segadapt.adapters import METHODS
from segadapt.data.files import atomic_path

from .metrics import bin_labels, summarize, volume_bin
from .module import BASELINES
from .run import read_metrics

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
REFERENCES = ("none", "full")  # the paired tests' references
_FOLD_DIR = re.compile(r"fold\d+")


def size_unit(runs: Sequence[dict[str, Any]]) -> str:
    """The runs' unit of lesion sizes ('mL'; 'mm^2' or 'px' for 2D images; runs written before it: 'mL')."""
    units = {run.get("size_unit", "mL") for run in runs}
    if len(units) > 1:
        raise ValueError(f"runs of one report must share the unit of lesion sizes, got {sorted(units)}")
    return units.pop()


def _edges(values: Sequence[Any]) -> list[float]:
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


def collect_runs(experiment_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The metrics.json of every finished run in a ``fold<k>`` folder under `experiment_dir` (any depth;
    source pretraining runs left out), each with ``method_dir``: its method folder relative to `experiment_dir`.
    A ``fold<k>`` run folder without metrics.json (killed or still training) is refused, not left out."""
    root = Path(experiment_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"experiment folder not found: {root}")
    for config in sorted(root.rglob("config.yaml")):  # a run folder without metrics.json: killed or still training
        if _FOLD_DIR.fullmatch(config.parent.name) and config.parent.parent != root:
            read_metrics(config.parent)
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        if not _FOLD_DIR.fullmatch(path.parent.name) or path.parent.parent == root:
            continue
        run = json.loads(path.read_text(encoding="utf-8"))
        if run.get("run", {}).get("experiment") == "pretrain":
            continue
        runs.append({**run, "method_dir": path.parent.parent.relative_to(root).as_posix()})
    if not runs:
        raise FileNotFoundError(f"no finished runs under {root} (expected <model>/<method>/fold<k>/metrics.json)")
    return runs


def _method_names(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Each run's method: its method folder, less a first level that all runs share (e.g. one model folder)."""
    parts = [r["method_dir"].split("/") for r in runs]
    while all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    return ["/".join(p) for p in parts]


def _order(row: Mapping[str, Any]) -> tuple[str, int, str]:
    known = list(BASELINES) + list(METHODS)
    group, _, name = row["method"].rpartition("/")
    return (group, known.index(row["tuning"]) if row["tuning"] in known else len(known), name)


def _check_each_case_once(method: str, folds: Sequence[dict[str, Any]]) -> None:
    """In k-fold CV each case is validated once; a case in two folds means runs of different splits."""
    seen: dict[str, Any] = {}
    for run in folds:
        for case in run["cases"]:
            if case["case_id"] in seen:
                raise ValueError(
                    f"method {method!r}: case {case['case_id']!r} is validated in fold {seen[case['case_id']]} and "
                    f"fold {run['run']['fold']}; the folder mixes runs of different splits (e.g. leftovers of an "
                    "earlier k); move them out of the experiment folder")
            seen[case["case_id"]] = run["run"]["fold"]


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


def method_rows(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(one aggregated row per method, the unadapted base always among them; the volume-bin labels)."""
    edges = _edges(runs[0]["volume_bins_ml"])
    for run in runs:
        if _edges(run["volume_bins_ml"]) != edges:
            raise ValueError(f"runs of one report must share volume bins; {run['run']} has {run['volume_bins_ml']}")
    labels = bin_labels(edges, size_unit(runs))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run, name in zip(runs, _method_names(runs)):
        by_method.setdefault(name, []).append(run)
    rows = []
    for method, group_runs in by_method.items():
        folds = sorted(group_runs, key=lambda r: r["run"]["fold"])
        _check_each_case_once(method, folds)
        cases = _cases(c for f in folds for c in f["cases"])
        last = _cases(c for f in folds for c in (f.get("last_cases") or f["cases"]))
        rows.append(_row(method, folds[0]["run"]["tuning"], folds, cases, last, edges))
    for group in sorted({m.rpartition("/")[0] for m in by_method}):
        if not any(r["tuning"] == "none" and r["method"].rpartition("/")[0] == group for r in rows):
            members = [run for m, rs in by_method.items() if m.rpartition("/")[0] == group for run in rs]
            base = _base_row(group, sorted(members, key=lambda r: r["run"]["fold"]), edges)
            if base is not None:
                rows.append(base)
    rows.sort(key=_order)
    _p_values(rows)
    return rows, labels


def _fmt(mean: float, sd: float | None = None, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if sd is None or not math.isfinite(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _fmt_p(p: float) -> str:
    return "-" if not math.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


CSV_COLUMNS = ("method", "n_cases", "dice_mean", "dice_sd", "dice_ci_low", "dice_ci_high", "p_vs_none", "p_vs_full",
               "trainable_params", "train_time_s", "tuning", "folds", "dice_last_mean", "selected_folds",
               "below_base_folds", "hd95_mean_mm", "hd95_sd_mm", "hd95_undefined")


def report_table(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> pd.DataFrame:
    """The report as a table: one row per method, the numbers of report.csv (NaN where undefined), from which
    report.md is formatted, so that both hold the same data."""
    records = []
    for r in rows:
        records.append({
            "method": r["method"], "n_cases": int(r["n_cases"]), "dice_mean": r["dice"], "dice_sd": r["dice_sd"],
            "dice_ci_low": r["dice_ci"][0], "dice_ci_high": r["dice_ci"][1], "p_vs_none": r["p_vs_none"],
            "p_vs_full": r["p_vs_full"], "trainable_params": int(r["trainable_params"]), "train_time_s": r["train_time_s"][0],
            "tuning": r["tuning"], "folds": len(r["folds"]), "dice_last_mean": r["dice_last"],
            "selected_folds": r["selected_folds"], "below_base_folds": r["below_base_folds"], "hd95_mean_mm": r["hd95"],
            "hd95_sd_mm": r["hd95_sd"], "hd95_undefined": int(r["hd95_undefined"]),
            **{f"dice_bin[{b}]": r[f"dice_bin{i}"] for i, b in enumerate(labels)},
            **{f"n_bin[{b}]": int(r[f"n_bin{i}"]) for i, b in enumerate(labels)},
            "volume_corr": r["volume_corr"], "volume_abs_err_ml": r["volume_abs_err_ml"],
            "train_time_s_sd": r["train_time_s"][1], "train_steps": r["train_steps"], "peak_mem_mb": r["peak_mem_mb"],
            "peak_mem_increase_mb": r["peak_mem_increase_mb"], "memory": r["memory"],
            "base_from_runs": int(r["base_from_runs"]),
        })
    return pd.DataFrame.from_records(records)


def markdown_table(table: pd.DataFrame, labels: Sequence[str], unit: str = "mL") -> str:
    """report.md's table: the columns of :func:`report_table` formatted (pandas ``to_markdown``); HD95 in mm, or
    pixels for 2D images without a spacing (`unit` 'px')."""
    cells = pd.DataFrame({
        "method": table["method"] + table["base_from_runs"].map({0: "", 1: "²"}),
        "folds": table["folds"].astype(str),
        "n": table["n_cases"].astype(str),
        "Dice": [_fmt(m, sd) for m, sd in zip(table["dice_mean"], table["dice_sd"])],
        "95% CI": ["-" if not math.isfinite(lo) else f"{lo:.3f}–{hi:.3f}"
                   for lo, hi in zip(table["dice_ci_low"], table["dice_ci_high"])],
        "p vs none": table["p_vs_none"].map(_fmt_p),
        "p vs full": table["p_vs_full"].map(_fmt_p),
        "below base¹": [f"⚠ {b}/{n}" if b else "" for b, n in zip(table["below_base_folds"], table["folds"])],
        "Dice (last step)": table["dice_last_mean"].map(_fmt),
        f"HD95 ({'px' if unit == 'px' else 'mm'})": [_fmt(m, sd, 1) + (f" ({u} undef.)" if u else "")
                      for m, sd, u in zip(table["hd95_mean_mm"], table["hd95_sd_mm"], table["hd95_undefined"])],
        **{f"Dice {b}": [f"{_fmt(d)} (n={n})" for d, n in zip(table[f"dice_bin[{b}]"], table[f"n_bin[{b}]"])]
           for b in labels},
        "volume r": table["volume_corr"].map(lambda v: _fmt(v, digits=2)),
        "trainable params": table["trainable_params"].map(lambda v: f"{v:,}"),
        "train time (s)": [_fmt(m, sd, 1) for m, sd in zip(table["train_time_s"], table["train_time_s_sd"])],
        "peak mem (MB)": table["peak_mem_mb"].map(lambda v: _fmt(v, digits=0)),
        "+ over fit start (MB)": table["peak_mem_increase_mb"].map(lambda v: _fmt(v, digits=0)),
    })
    return cells.to_markdown(index=False, disable_numparse=True)


def csv_text(table: pd.DataFrame) -> str:
    """report.csv: :func:`report_table` (:data:`CSV_COLUMNS` first), undefined values blank."""
    return table.to_csv(index=False, na_rep="", lineterminator="\r\n")


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return path


BASE_COLOUR = "0.45"  # the unadapted base: grey in both plots


def _colours(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """One distinct colour per method, the same in both plots: grey for the unadapted base, then tab20's ten
    dark hues, its ten light ones (so that neighbouring methods do not share a hue), then tab20b / tab20c."""
    from matplotlib import colormaps

    tab20 = [colormaps["tab20"](i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
    palette = [c for c in tab20 if abs(c[0] - c[1]) + abs(c[1] - c[2]) > 1e-3]  # tab20's greys left to the base
    palette += [colormaps[name](i) for name in ("tab20b", "tab20c") for i in range(20)]
    colours, k = [], 0
    for r in rows:
        if r["tuning"] == "none":
            colours.append(BASE_COLOUR)
        else:
            colours.append(palette[k % len(palette)])
            k += 1
    return colours


def _label(row: Mapping[str, Any]) -> str:
    return f"{row['method']} (n={int(row['n_cases'])})"


def plot_dice_by_method(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Bars: mean Dice over the pooled validation cases with its 95% bootstrap interval; dots: each fold's
    mean; dashed line: the unadapted base's mean. Tick labels give each method's n (cases)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    figure = Figure(figsize=(max(5.0, 0.75 * len(rows) + 2.0), 4.2))
    ax = figure.subplots()
    x = np.arange(len(rows))
    means = np.array([r["dice"] for r in rows])
    ci = np.array([r["dice_ci"] for r in rows], dtype=np.float64).reshape(len(rows), 2)
    errors = np.nan_to_num(np.abs(np.stack([means - ci[:, 0], ci[:, 1] - means])))
    ax.bar(x, means, yerr=errors, capsize=3, color=_colours(rows), edgecolor="k", linewidth=0.5)
    for i, r in enumerate(rows):
        ax.plot([i] * len(r["fold_dice"]), r["fold_dice"], "k.", markersize=4)
        if math.isfinite(means[i]):
            top = max(means[i] + errors[1, i], np.nanmax(r["fold_dice"], initial=means[i]))
            ax.annotate(f"{means[i]:.3f}", (i, top), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    handles = [Patch(facecolor="0.85", edgecolor="k", linewidth=0.5, label="mean Dice, 95% bootstrap CI"),
               Line2D([], [], color="k", marker=".", linestyle="none", label="mean Dice of one fold")]
    base = next((r for r in rows if r["tuning"] == "none" and "/" not in r["method"]), None)
    if base is not None and math.isfinite(base["dice"]):
        ax.axhline(base["dice"], color=BASE_COLOUR, linestyle="--", linewidth=0.8)
        handles.append(Line2D([], [], color=BASE_COLOUR, linestyle="--", label=f"unadapted base ({base['dice']:.3f})"))
    ax.set_xticks(x, [f"{r['method']}\nn={int(r['n_cases'])}" for r in rows], rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=8)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title or "Dice per method (validation cases of all folds pooled)", fontsize=10)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def plot_dice_vs_volume(rows: Sequence[dict[str, Any]], edges: Sequence[float], path: Path, title: str = "",
                        unit: str = "mL") -> Path:
    """Each validation case's Dice against its true lesion volume (points), per method, and each volume bin's
    mean Dice at the bin's median volume (lines); the bin edges dashed and labelled, each bin named at the top."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 4.6))
    ax = figure.subplots()
    markers = "os^vD<>phx*+"
    for i, (r, color) in enumerate(zip(rows, _colours(rows))):
        volumes, dice = [c["true_ml"] for c in r["cases"]], [c["dice"] for c in r["cases"]]
        marker = markers[i % len(markers)]
        ax.scatter(volumes, dice, s=12, marker=marker, color=color, alpha=0.35, linewidths=0)
        bins = [[k for k, v in enumerate(volumes) if volume_bin(v, edges) == b] for b in range(len(edges) - 1)]
        means = [(np.median([volumes[k] for k in b]), np.nanmean([dice[k] for k in b])) for b in bins if b]
        ax.plot(*zip(*means), color=color, marker=marker, linewidth=1.4, label=_label(r))  # mean Dice per bin
    low, high = ax.get_xlim()
    for edge in edges[1:-1]:
        ax.axvline(edge, color="0.6", linewidth=0.8, linestyle="--")
        ax.annotate(f"{edge:g} {unit}", (edge, 0.0), xycoords=("data", "axes fraction"), xytext=(2, 3),
                    textcoords="offset points", fontsize=7, color="0.35")
    for name, (a, b) in zip(bin_labels(edges, unit), zip(edges[:-1], edges[1:])):
        a, b = max(a, low), min(b, high)
        if a < b:  # the bin's name over its stretch of the axis
            ax.annotate(name, ((a + b) / 2, 1.0), xycoords=("data", "axes fraction"), xytext=(0, -10),
                        textcoords="offset points", ha="center", fontsize=7, color="0.35")
    ax.set_xlabel(f"true lesion {'volume' if unit == 'mL' else 'area'} ({unit}); lines: mean Dice per volume bin (dashed: bin edges)")
    ax.set_ylabel("Dice")
    ax.set_xlim(low, high)
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "Dice against lesion volume (validation cases of all folds pooled)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method (n cases)", title_fontsize=7)
    return _save(figure, path)


def write_report(experiment_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Aggregate the runs of `experiment_dir` into report.md, report.csv and two PNG plots; returns their paths."""
    runs = collect_runs(experiment_dir)
    rows, labels = method_rows(runs)
    table = report_table(rows, labels)
    out = Path(out_dir or experiment_dir)
    out.mkdir(parents=True, exist_ok=True)
    edges = _edges(runs[0]["volume_bins_ml"])
    name = Path(experiment_dir).resolve().name
    steps = sorted({int(r["train_steps"]) for r in rows if math.isfinite(r["train_steps"])})
    notes = ["¹ folds whose selected network's Dice on the inner validation split (carved from the fold's training "
             "cases) stayed below the unadapted base's there: training did not help on them."]
    if any(r["base_from_runs"] for r in rows):
        notes.append("² no `none` runs: the unadapted base as validated by the other runs before tuning.")
    text = "\n".join([
        f"# Cross-validation report: {name}",
        "",
        f"{len(runs)} runs, {len(rows)} methods. Over the validation cases of all folds pooled (each case scored "
        "against its label file, on the file's grid): Dice mean ± sd over cases, its 95% bootstrap interval "
        f"(percentile method, {BOOTSTRAP_RESAMPLES:,} resamples of the cases, seed {BOOTSTRAP_SEED}), the "
        "two-sided Wilcoxon signed-rank p-value of the per-case Dice paired by case against `none` and `full`, "
        "the Dice of the last training step (the Dice column is the network selected on the inner split), HD95, "
        "Dice per lesion-volume bin (by true volume) and the Pearson correlation of predicted with true lesion "
        "volume; trainable parameters, training time (forward + backward + optimiser step, per "
        f"fold; training steps per fold: {', '.join(map(str, steps)) or '-'}) and peak memory "
        f"({next((r['memory'] for r in rows if r['memory']), 'n/a')}; and its increase over the memory in use "
        "when training started) as means over folds.",
        "",
        markdown_table(table, labels, size_unit(runs)),
        "",
        *notes,
        "",
        "![Dice per method](dice_by_method.png)",
        "![Dice vs lesion volume](dice_vs_volume.png)",
        "",
    ])
    paths = {"markdown": out / "report.md", "csv": out / "report.csv"}
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(text, encoding="utf-8")
    with atomic_path(paths["csv"]) as tmp:
        tmp.write_text(csv_text(table), encoding="utf-8")
    paths["dice_by_method"] = plot_dice_by_method(
        rows, out / "dice_by_method.png", f"{name}: Dice per method (validation cases of all folds pooled)")
    paths["dice_vs_volume"] = plot_dice_vs_volume(
        rows, edges, out / "dice_vs_volume.png", f"{name}: Dice against true lesion volume, per method", size_unit(runs))
    return paths
