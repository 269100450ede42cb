"""Cross-validation report: every method and fold of an experiment folder as one table and two plots.

Reads ``<experiment>/<model>/<method>/fold<k>/metrics.json`` (written by :func:`segadapt.training.fit_run`) and
writes into the experiment folder (or `out_dir`):

* ``report.md`` and ``report.csv``: one row per method. Dice, HD95, Dice per lesion-volume bin and the
  correlation of predicted with true lesion volume are computed over the validation cases of all folds
  pooled (in k-fold CV each case is validated exactly once); mean +- sample sd over cases. Each case is
  scored on its label file's grid (the prediction mapped back through the preprocessing). Trainable
  parameters, training time (forward + backward + step, per fold) and peak memory are means over folds.
* ``dice_by_method.png``: mean Dice per method with sd error bars (and each fold's mean as a dot).
* ``dice_vs_volume.png``: each validation case's Dice against its true lesion volume, per method, with
  the mean Dice of each volume bin (at the bin's median volume) joined by a line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segadapt.adapters import METHODS
from segadapt.data.files import atomic_path

from .metrics import bin_labels, mean_sd, summarize, volume_bin
from .module import BASELINES


def _edges(values: Sequence[Any]) -> list[float]:
    return [math.inf if v is None else float(v) for v in values]


def collect_runs(experiment_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The metrics.json of every finished run under `experiment_dir` (``<model>/<method>/fold<k>/metrics.json``)."""
    root = Path(experiment_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"experiment folder not found: {root}")
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(root.glob("*/*/fold*/metrics.json"))]
    if not runs:
        raise FileNotFoundError(f"no finished runs under {root} (expected <model>/<method>/fold<k>/metrics.json)")
    return runs


def _order(method: str) -> tuple[int, str]:
    known = list(BASELINES) + list(METHODS)
    return (known.index(method) if method in known else len(known), method)


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


def method_rows(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(one aggregated row per method, the volume-bin labels)."""
    edges = _edges(runs[0]["volume_bins_ml"])
    for run in runs:
        if _edges(run["volume_bins_ml"]) != edges:
            raise ValueError(f"runs of one report must share volume bins; {run['run']} has {run['volume_bins_ml']}")
    labels = bin_labels(edges)
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["run"]["method"], []).append(run)
    rows = []
    for method in sorted(by_method, key=_order):
        folds = sorted(by_method[method], key=lambda r: r["run"]["fold"])
        _check_each_case_once(method, folds)
        cases = [{k: (math.nan if v is None else v) for k, v in c.items()} for f in folds for c in f["cases"]]
        pooled = summarize(cases, edges)
        cost = [f["cost"] for f in folds]
        row = {
            "method": method,
            "tuning": folds[0]["run"]["tuning"],
            "folds": [f["run"]["fold"] for f in folds],
            "fold_dice": [f["val"]["dice"] for f in folds],
            "cases": cases,
            **pooled,
            "trainable_params": mean_sd([c.get("trainable_params", 0) for c in cost])[0],
            "train_time_s": mean_sd([c.get("train_time_s") for c in cost]),
            "train_steps": mean_sd([c.get("train_steps") for c in cost])[0],
            "peak_mem_mb": mean_sd([c.get("peak_mem_mb") for c in cost])[0],
            "peak_mem_increase_mb": mean_sd([c.get("peak_mem_increase_mb") for c in cost])[0],
            "memory": cost[0].get("memory", ""),
        }
        rows.append(row)
    return rows, labels


def _fmt(mean: float, sd: float | None = None, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if sd is None or not math.isfinite(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    head = ["method", "folds", "cases", "Dice", "HD95 (mm)", *[f"Dice {b}" for b in labels], "volume r",
            "trainable params", "train time (s)", "peak mem (MB)", "+ over fit start (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bins = [f"{_fmt(r[f'dice_bin{i}'])} (n={int(r[f'n_bin{i}'])})" for i in range(len(labels))]
        hd95 = _fmt(r["hd95"], r["hd95_sd"], 1) + (f" ({int(r['hd95_undefined'])} undef.)" if r["hd95_undefined"] else "")
        cells = [r["method"], str(len(r["folds"])), str(int(r["n_cases"])), _fmt(r["dice"], r["dice_sd"]), hd95, *bins,
                 _fmt(r["volume_corr"], digits=2), f"{int(r['trainable_params']):,}", _fmt(*r["train_time_s"], digits=1),
                 _fmt(r["peak_mem_mb"], digits=0), _fmt(r["peak_mem_increase_mb"], digits=0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "tuning", "folds", "cases", "dice_mean", "dice_sd", "hd95_mean_mm", "hd95_sd_mm",
                     "hd95_undefined", *[f"dice_bin[{b}]" for b in labels], *[f"n_bin[{b}]" for b in labels],
                     "volume_corr", "volume_abs_err_ml", "trainable_params", "train_time_s_mean", "train_time_s_sd",
                     "train_steps", "peak_mem_mb", "peak_mem_increase_mb", "memory"])
    for r in rows:
        writer.writerow([r["method"], r["tuning"], len(r["folds"]), int(r["n_cases"]), r["dice"], r["dice_sd"], r["hd95"],
                         r["hd95_sd"], int(r["hd95_undefined"]), *[r[f"dice_bin{i}"] for i in range(len(labels))],
                         *[int(r[f"n_bin{i}"]) for i in range(len(labels))], r["volume_corr"], r["volume_abs_err_ml"],
                         int(r["trainable_params"]), *r["train_time_s"], r["train_steps"], r["peak_mem_mb"],
                         r["peak_mem_increase_mb"], r["memory"]])
    return out.getvalue()


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return path


def plot_dice_by_method(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 0.7 * len(rows) + 1.5), 3.6))
    ax = figure.subplots()
    x = np.arange(len(rows))
    ax.bar(x, [r["dice"] for r in rows], yerr=[0 if not math.isfinite(r["dice_sd"]) else r["dice_sd"] for r in rows],
           capsize=3, color=["0.6" if r["tuning"] in BASELINES else "tab:blue" for r in rows])
    for i, r in enumerate(rows):
        ax.plot([i] * len(r["fold_dice"]), r["fold_dice"], "k.", markersize=4)
    ax.set_xticks(x, [r["method"] for r in rows], rotation=45, ha="right")
    ax.set_ylabel("Dice (mean ± sd over cases; dots: folds)")
    ax.set_ylim(0, 1)
    return _save(figure, path)


def plot_dice_vs_volume(rows: Sequence[dict[str, Any]], edges: Sequence[float], path: Path) -> Path:
    from matplotlib.figure import Figure

    from matplotlib import colormaps

    figure = Figure(figsize=(7.0, 4.0))
    ax = figure.subplots()
    markers, colors = "os^vD<>phx*+", colormaps["tab20"]
    for i, r in enumerate(rows):
        volumes, dice = [c["true_ml"] for c in r["cases"]], [c["dice"] for c in r["cases"]]
        color = colors(i % 20)
        ax.scatter(volumes, dice, s=14, marker=markers[i % len(markers)], color=color, label=r["method"], alpha=0.6)
        bins = [[k for k, v in enumerate(volumes) if volume_bin(v, edges) == b] for b in range(len(edges) - 1)]
        means = [(np.median([volumes[k] for k in b]), np.mean([dice[k] for k in b])) for b in bins if b]
        ax.plot(*zip(*means), color=color, linewidth=1.2)  # mean Dice per volume bin
    for edge in edges[1:-1]:
        ax.axvline(edge, color="0.8", linewidth=0.8)
    ax.set_xlabel("true lesion volume (mL); lines: mean Dice per volume bin")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def write_report(experiment_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Aggregate the runs of `experiment_dir` into report.md, report.csv and two PNG plots; returns their paths."""
    runs = collect_runs(experiment_dir)
    rows, labels = method_rows(runs)
    out = Path(out_dir or experiment_dir)
    out.mkdir(parents=True, exist_ok=True)
    edges = _edges(runs[0]["volume_bins_ml"])
    name = Path(experiment_dir).resolve().name
    steps = sorted({int(r["train_steps"]) for r in rows if math.isfinite(r["train_steps"])})
    text = "\n".join([
        f"# Cross-validation report: {name}",
        "",
        f"{len(runs)} runs, {len(rows)} methods. Dice, HD95, Dice per lesion-volume bin (by true volume) and the "
        "Pearson correlation of predicted with true lesion volume over the validation cases of all folds "
        "(mean ± sd over cases; each case scored against its label file, on the file's grid); trainable parameters, training time (forward + backward + optimiser step, per "
        f"fold; training steps per fold: {', '.join(map(str, steps)) or '-'}) and peak memory "
        f"({next((r['memory'] for r in rows if r['memory']), 'n/a')}; and its increase over the memory in use when training started) as means "
        "over folds.",
        "",
        markdown_table(rows, labels),
        "",
        "![Dice per method](dice_by_method.png)",
        "![Dice vs lesion volume](dice_vs_volume.png)",
        "",
    ])
    paths = {"markdown": out / "report.md", "csv": out / "report.csv"}
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(text, encoding="utf-8")
    with atomic_path(paths["csv"]) as tmp:
        tmp.write_text(csv_text(rows, labels), encoding="utf-8")
    paths["dice_by_method"] = plot_dice_by_method(rows, out / "dice_by_method.png")
    paths["dice_vs_volume"] = plot_dice_vs_volume(rows, edges, out / "dice_vs_volume.png")
    return paths
