"""The two plots of a cross-validation report, as PNG, SVG and PDF (:mod:`segadapt.training.report`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segadapt.io import atomic_path

from .metrics import bin_labels, volume_bin

PNG_DPI = 300
FIGURE_FORMATS = ("png", "svg", "pdf")  # PNG to view, SVG and PDF (vector) for a paper


def _save(figure: Any, path: Path) -> Path:
    """`figure` as `path` (PNG, :data:`PNG_DPI`) and beside it as SVG and PDF; returns the PNG's path. Text stays
    text in the SVG and TrueType (not Type 3) in the PDF, as journals ask, so that it can be edited."""
    from matplotlib import rc_context

    with rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        for fmt in FIGURE_FORMATS:
            with atomic_path(path.with_suffix(f".{fmt}")) as tmp:
                figure.savefig(tmp, dpi=PNG_DPI, bbox_inches="tight", format=fmt)
    return path


def _dice_limits(values: np.ndarray) -> tuple[float, float]:
    """y limits around the finite `values` with a 10% margin each side (at least 0.02), within [0, 1]."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    margin = max(0.1 * (high - low), 0.02)
    return max(0.0, low - margin), min(1.0, high + margin)


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


def _true_size(case: Mapping[str, Any]) -> float:
    """A case row's true size, under whichever unit-named key it has (``true_ml``; ``true_mm2`` / ``true_px``)."""
    return next(case[key] for key in ("true_ml", "true_mm2", "true_px") if key in case)


def size_word(unit: str) -> str:
    return "volume" if unit == "mL" else "area"


def _label(row: Mapping[str, Any]) -> str:
    return f"{row['method']} (n={int(row['n_cases'])})"


def plot_dice_by_method(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Per method: the mean Dice over the pooled validation cases (a point) with its 95% bootstrap interval
    (whiskers), each fold's mean beside it (small dots); the unadapted base's mean as a dashed line. The y axis
    spans the data (not from 0), so that differences between methods show. Tick labels give each method's n."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(max(5.0, 0.6 * len(rows) + 2.5), 4.0))
    ax = figure.subplots()
    x = np.arange(len(rows))
    means = np.array([r["dice"] for r in rows], dtype=np.float64)
    ci = np.array([r["dice_ci"] for r in rows], dtype=np.float64).reshape(len(rows), 2)
    errors = np.nan_to_num(np.abs(np.stack([means - ci[:, 0], ci[:, 1] - means])))
    for i, (r, colour) in enumerate(zip(rows, _colours(rows))):
        ax.errorbar(i, means[i], yerr=errors[:, i:i + 1], fmt="o", color=colour, markeredgecolor="k",
                    markeredgewidth=0.5, ecolor=colour, elinewidth=1.2, capsize=4, markersize=6, zorder=3)
        folds = np.asarray(r["fold_dice"], dtype=np.float64)
        ax.plot(i + 0.18 + np.linspace(-0.04, 0.04, folds.size), folds, ".", color="0.2", markersize=4, zorder=2)
    base = next((r for r in rows if r["tuning"] == "none" and "/" not in r["method"]), None)
    handles = [Line2D([], [], color="0.3", marker="o", markeredgecolor="k", markeredgewidth=0.5,
                      label="mean Dice, 95% bootstrap CI"),
               Line2D([], [], color="0.2", marker=".", linestyle="none", label="mean Dice of one fold")]
    if base is not None and math.isfinite(base["dice"]):
        ax.axhline(base["dice"], color=BASE_COLOUR, linestyle="--", linewidth=0.8, zorder=1)
        handles.append(Line2D([], [], color=BASE_COLOUR, linestyle="--", label=f"unadapted base ({base['dice']:.3f})"))
    shown = np.concatenate([ci.ravel(), means, *[np.asarray(r["fold_dice"], dtype=np.float64) for r in rows]])
    ax.set_ylim(*_dice_limits(shown))
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_xticks(x, [f"{r['method']}\nn={int(r['n_cases'])}" for r in rows], rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=8)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", color="0.9", linewidth=0.6, zorder=0)
    ax.set_title(title or "Dice per method (validation cases of all folds pooled)", fontsize=10)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def plot_dice_vs_volume(rows: Sequence[dict[str, Any]], edges: Sequence[float], path: Path, title: str = "",
                        unit: str = "mL", structure: str = "lesion") -> Path:
    """Each validation case's Dice against its true `structure` volume (points), per method, and each volume bin's
    mean Dice at the bin's median volume (lines); the bin edges dashed and labelled, each bin named at the top."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 4.6))
    ax = figure.subplots()
    markers = "os^vD<>phx*+"
    for i, (r, color) in enumerate(zip(rows, _colours(rows))):
        volumes, dice = [_true_size(c) for c in r["cases"]], [c["dice"] for c in r["cases"]]
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
    ax.set_xlabel(f"true {structure} {size_word(unit)} ({unit}); lines: mean Dice per {size_word(unit)} bin "
                  "(dashed: bin edges)")
    ax.set_ylabel("Dice")
    ax.set_xlim(low, high)
    ax.set_ylim(0, 1.05)
    ax.set_title(title or f"Dice against {structure} {size_word(unit)} (validation cases of all folds pooled)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method (n cases)", title_fontsize=7)
    return _save(figure, path)


def plot_auto_trace(trials: Any, path: Path, title: str = "") -> Path:
    """:func:`auto_trace_figure` as `path` (PNG) and SVG, PDF."""
    return _save(auto_trace_figure(trials, title), path)


def auto_trace_figure(trials: Any, title: str = "") -> Any:
    """One panel per fold of a ``segadapt auto`` search (`trials`: the rows of auto_trials.csv): each trial's inner
    Dice by trial number (completed: dots; pruned: crosses; failed: triangles on the axis), the best completed
    trial so far (a step line) and the chosen trial (a star)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    folds = sorted(trials["fold"].unique()) if len(trials) else []
    figure = Figure(figsize=(max(5.0, 3.6 * len(folds)), 3.6))
    axes = figure.subplots(1, max(len(folds), 1), sharey=True, squeeze=False)[0]
    dice = np.asarray(trials["inner_dice"] if len(trials) else [], dtype=np.float64)
    low, high = _dice_limits(dice)
    styles = {"COMPLETE": ("o", "C0", "completed"), "PRUNED": ("x", "0.45", "pruned")}
    for ax, fold in zip(axes, folds):
        rows = trials[trials["fold"] == fold].sort_values("number")
        for state, (marker, colour, label) in styles.items():
            shown = rows[rows["state"] == state]
            ax.plot(shown["number"], shown["inner_dice"].astype(float), marker, color=colour, label=label,
                    linestyle="none", markersize=5, zorder=3)
        failed = rows[~rows["state"].isin(list(styles))]
        ax.plot(failed["number"], np.full(len(failed), low), "v", color="C3", label="failed / interrupted",
                linestyle="none", clip_on=False, zorder=3)
        ax.step(rows["number"], rows["best_so_far"].astype(float), where="post", color="C1", linewidth=1.2,
                label="best so far", zorder=2)
        chosen = rows[rows["chosen"] == 1]
        ax.plot(chosen["number"], chosen["inner_dice"].astype(float), "*", color="C2", markersize=13,
                markeredgecolor="k", markeredgewidth=0.5, label="chosen", linestyle="none", zorder=4)
        ax.set_title(f"fold {fold}", fontsize=9)
        ax.set_xlabel("trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", color="0.9", linewidth=0.6, zorder=0)
    axes[0].set_ylim(low, high)
    axes[0].set_ylabel("inner Dice")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle(title or "segadapt auto: inner Dice per trial", fontsize=10)
    return figure
