"""The tables of a cross-validation report: report.csv, report_folds.csv and report.md's two tables, formatted
from one table of numbers (:mod:`segadapt.training.report`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

def _fmt(mean: float, sd: float | None = None, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if sd is None or not math.isfinite(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _fmt_p(p: float) -> str:
    return "-" if not math.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


CSV_COLUMNS = ("method", "n_cases", "dice_mean", "dice_sd", "dice_ci_low", "dice_ci_high", "p_vs_none", "p_vs_full",
               "p_vs_none_holm", "p_vs_full_holm", "trainable_params", "train_time_s", "tuning", "folds",
               "dice_last_mean", "selected_folds", "below_base_folds", "hd95_mean_mm", "hd95_sd_mm", "hd95_undefined")


def report_table(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> pd.DataFrame:
    """The report as a table: one row per method, the numbers of report.csv (NaN where undefined), from which
    report.md's main table is formatted, so that both hold the same data."""
    records = []
    for r in rows:
        records.append({
            "method": r["method"], "n_cases": int(r["n_cases"]), "dice_mean": r["dice"], "dice_sd": r["dice_sd"],
            "dice_ci_low": r["dice_ci"][0], "dice_ci_high": r["dice_ci"][1], "p_vs_none": r["p_vs_none"],
            "p_vs_full": r["p_vs_full"], "p_vs_none_holm": r["p_vs_none_holm"], "p_vs_full_holm": r["p_vs_full_holm"],
            "trainable_params": int(r["trainable_params"]), "train_time_s": r["train_time_s"][0],
            "tuning": r["tuning"], "folds": len(r["folds"]), "dice_last_mean": r["dice_last"],
            "selected_folds": r["selected_folds"], "below_base_folds": r["below_base_folds"], "hd95_mean_mm": r["hd95"],
            "hd95_sd_mm": r["hd95_sd"], "hd95_undefined": int(r["hd95_undefined"]),
            **{f"dice_bin[{b}]": r[f"dice_bin{i}"] for i, b in enumerate(labels)},
            **{f"n_bin[{b}]": int(r[f"n_bin{i}"]) for i, b in enumerate(labels)},
            "volume_corr": r["volume_corr"], **{k: v for k, v in r.items() if "_abs_err_" in k},  # named by unit
            "train_time_s_sd": r["train_time_s"][1], "train_steps": r["train_steps"], "peak_mem_mb": r["peak_mem_mb"],
            "peak_mem_increase_mb": r["peak_mem_increase_mb"], "memory": r["memory"],
            "base_from_runs": int(r["base_from_runs"]), "settings_differ": "; ".join(r["settings_differ"]),
        })
    return pd.DataFrame.from_records(records)


def fold_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per method and fold: the fold's mean Dice over its validation cases, their number, and whether
    the selected network stayed below the unadapted base on the fold's inner split (report_folds.csv)."""
    return pd.DataFrame.from_records([
        {"method": r["method"], "fold": fold, "n_cases": n, "dice_mean": dice, "below_base": int(below)}
        for r in rows for fold, n, dice, below in zip(r["folds"], r["fold_n"], r["fold_dice"], r["fold_below_base"])
    ], columns=["method", "fold", "n_cases", "dice_mean", "below_base"])


# report.md's notes, by the mark a method's name carries
NOTE_BELOW_BASE = "¹"
NOTE_BASE_FROM_RUNS = "²"
NOTE_SETTINGS = "³"


def _marks(table: pd.DataFrame) -> pd.Series:
    return (table["below_base_folds"].map(lambda b: NOTE_BELOW_BASE if b else "")
            + table["base_from_runs"].map({0: "", 1: NOTE_BASE_FROM_RUNS})
            + table["settings_differ"].map(lambda d: f" ⚠{NOTE_SETTINGS}" if d else ""))


def markdown_table(table: pd.DataFrame, labels: Sequence[str] = (), unit: str = "mL") -> str:
    """report.md's main table (pandas ``to_markdown``): method (with its notes' marks), n, Dice mean ± sd, its 95%
    interval, the Holm-adjusted p-values against ``full`` and ``none``, trainable parameters, training time;
    report.csv holds every other column. (`labels` and `unit` are no longer used: the volume bins and HD95 are
    report.csv's.)"""
    cells = pd.DataFrame({
        "method": table["method"] + _marks(table),
        "n": table["n_cases"].astype(str),
        "Dice": [_fmt(m, sd) for m, sd in zip(table["dice_mean"], table["dice_sd"])],
        "95% CI": ["-" if not math.isfinite(lo) else f"{lo:.3f}–{hi:.3f}"
                   for lo, hi in zip(table["dice_ci_low"], table["dice_ci_high"])],
        "p vs full": table["p_vs_full_holm"].map(_fmt_p),
        "p vs none": table["p_vs_none_holm"].map(_fmt_p),
        "trainable params": table["trainable_params"].map(lambda v: f"{v:,}"),
        "time (s)": [_fmt(m, sd, 1) for m, sd in zip(table["train_time_s"], table["train_time_s_sd"])],
    })
    return cells.to_markdown(index=False, disable_numparse=True)


def markdown_fold_table(folds: pd.DataFrame) -> str:
    """report.md's per-fold table: a row per method, a column per fold: mean Dice (n cases), ⚠ where the fold's
    selected network stayed below the base on its inner split."""
    cells = folds.assign(cell=[f"{_fmt(d)} (n={n:g})" + (" ⚠" if b else "")
                               for d, n, b in zip(folds["dice_mean"], folds["n_cases"], folds["below_base"])])
    wide = cells.pivot(index="method", columns="fold", values="cell").reindex(list(dict.fromkeys(folds["method"])))
    wide.columns = [f"fold {k}" for k in wide.columns]
    return wide.fillna("-").reset_index().to_markdown(index=False, disable_numparse=True)


def csv_text(table: pd.DataFrame) -> str:
    """report.csv: :func:`report_table` (:data:`CSV_COLUMNS` first), undefined values blank."""
    return table.to_csv(index=False, na_rep="", lineterminator="\r\n")
