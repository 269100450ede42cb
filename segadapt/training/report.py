"""Cross-validation report: every method and fold of an experiment folder as tables and two plots, ready for a paper.

Reads every ``metrics.json`` of a ``fold<k>`` folder under the experiment folder (written by
:func:`segadapt.training.fit_run`; ``<experiment>/<method>/fold<k>`` or, one level deeper,
``<experiment>/<model>/<method>/fold<k>``) and writes into the experiment folder (or `out_dir`):

* ``report.md``: the main table, one row per method (the folder that holds the fold folders: ``lora_c``, or
  ``lora_c_r2`` / ``lora_c_n5`` in a rank study or learning curve, or ``<model>/<method>`` when the folder holds
  several models' runs): n (cases), Dice mean +- sample sd over the validation cases of all folds pooled (in
  k-fold CV each case is validated exactly once), its 95% bootstrap interval (percentile method,
  :data:`BOOTSTRAP_RESAMPLES` resamples of the cases, seed :data:`BOOTSTRAP_SEED`; ``scipy.stats.bootstrap``),
  the two-sided Wilcoxon signed-rank p-values (``scipy.stats.wilcoxon``) of the per-case Dice paired by case id
  against ``full`` and ``none``, Holm-Bonferroni adjusted (:func:`holm`) over the methods tested against the
  same reference, trainable parameters and training time (means over folds); then a per-fold table (each
  fold's mean Dice and n). The unadapted base is always a row (``none``): from the ``none`` runs, or else from
  the other runs' ``base_cases`` (the base validated on each fold before tuning). Marks on a method's name:
  folds whose selected network stayed below the base on the inner split, a base taken from the runs, and
  folds trained with different settings (:func:`settings_differences`: their config.yaml differ in more than
  the fold). Such a row is flagged, with a warning naming the settings, rather than the report refused: one
  mixed method should not hide the others' results, and the note says what to rerun.
* ``report.csv``: the same rows with every column: unadjusted and adjusted p-values, HD95, Dice per volume
  bin, the correlation of predicted with true volume, the Dice of the last training step, training steps,
  peak memory (:func:`report_table`; report.md's main table is formatted from it). ``report_folds.csv``:
  the per-fold table.
* ``dice_by_method`` and ``dice_vs_volume`` as PNG (300 dpi), SVG and PDF: the mean Dice per method with its
  95% interval and each fold's mean, on an axis around the data; each case's Dice against its true volume
  with the mean per volume bin. The base is grey in both plots, every other method has its own colour.

The structure is named as the dataset names it (:func:`structure_name`: the foreground labels of
dataset.json) in the text and the plots, ``lesion`` when no run folder says.

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
from segadapt.runs import CONFIG_FILE, FINGERPRINT_FILE, read_metrics, read_run_config, run_changes

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
REFERENCES = ("none", "full")  # the paired tests' references
_FOLD_DIR = re.compile(r"fold\d+")


def runs_size_unit(runs: Sequence[dict[str, Any]]) -> str:
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


def _read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json as a dict; a file that is not one is a one-line error naming it."""
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); rerun that fold or move it out of the "
                         "experiment folder") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path} holds a JSON {type(run).__name__}, not a run's metrics")
    return run


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
        run = _read_metrics(path)
        if run.get("run", {}).get("experiment") == "pretrain":
            continue
        runs.append({**run, "method_dir": path.parent.parent.relative_to(root).as_posix(), "fold_dir": str(path.parent)})
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


# config.yaml keys that differ from fold to fold of one method by design (besides those a resume may change)
PER_FOLD_KEYS = frozenset({"run.fold", "run.seed", "run.run_dir", "datamodule.fold"})


def _fold_config(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's config.yaml without its per-fold keys; None without one (a run folder of an older layout)."""
    folder = Path(run.get("fold_dir", ""))
    if not (folder / CONFIG_FILE).is_file():
        return None
    config = read_run_config(folder)
    for key in PER_FOLD_KEYS:
        section, _, name = key.partition(".")
        config.get(section, {}).pop(name, None)
    return config


def settings_differences(folds: Sequence[dict[str, Any]]) -> list[str]:
    """``'fold k: key: old -> new'`` for each setting in which a fold's config.yaml differs from the first fold's
    (:data:`PER_FOLD_KEYS` and :data:`~segadapt.runs.NON_IDENTITY_KEYS` aside); [] when they agree."""
    configs = [(f["run"]["fold"], _fold_config(f)) for f in folds]
    configs = [(fold, c) for fold, c in configs if c is not None]
    if not configs:
        return []
    first = configs[0][1]
    return [f"fold {fold}: {change}" for fold, config in configs[1:] for change in run_changes(first, config)]


def _foreground_names(labels: Mapping[Any, Any]) -> list[str]:
    """The foreground names of a dataset.json ``labels`` (value -> name, or nnU-Net v2's name -> value)."""
    pairs = [(v, k) if isinstance(v, int) else (k, v) for k, v in labels.items()]
    return [str(name) for value, name in sorted(pairs, key=lambda p: int(p[0])) if int(value) != 0]


def structure_name(runs: Sequence[dict[str, Any]], fallback: str = "lesion") -> str:
    """What the runs segment: the foreground label names of their dataset (the run folder's fingerprint.json, else
    the dataset.json of its config.yaml), joined with ' + '; `fallback` when no run folder says."""
    for run in runs:
        folder = Path(run.get("fold_dir", ""))
        sources = [folder / FINGERPRINT_FILE]
        if (folder / CONFIG_FILE).is_file():
            sources.append(Path(str(read_run_config(folder).get("datamodule", {}).get("dataset_json", ""))))
        for source in sources:
            try:
                names = _foreground_names(json.loads(source.read_text(encoding="utf-8"))["labels"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # absent or unreadable: the next source says
            if names:
                return " + ".join(names)
    return fallback


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
    edges = _edges(runs[0]["volume_bins_ml"])
    for run in runs:
        if _edges(run["volume_bins_ml"]) != edges:
            raise ValueError(f"runs of one report must share volume bins; {run['run']} has {run['volume_bins_ml']}")
    labels = bin_labels(edges, runs_size_unit(runs))
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


def _size_word(unit: str) -> str:
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
    ax.set_xlabel(f"true {structure} {_size_word(unit)} ({unit}); lines: mean Dice per {_size_word(unit)} bin "
                  "(dashed: bin edges)")
    ax.set_ylabel("Dice")
    ax.set_xlim(low, high)
    ax.set_ylim(0, 1.05)
    ax.set_title(title or f"Dice against {structure} {_size_word(unit)} (validation cases of all folds pooled)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method (n cases)", title_fontsize=7)
    return _save(figure, path)


def _warn_mixed_settings(rows: Sequence[dict[str, Any]]) -> None:
    """One warning per method whose folds were trained with different settings (flagged in the table too)."""
    for r in rows:
        if r["settings_differ"]:
            shown = "; ".join(r["settings_differ"][:3]) + ("; ..." if len(r["settings_differ"]) > 3 else "")
            warnings.warn(f"method {r['method']!r} pools folds trained with different settings ({shown}): its row "
                          f"is flagged {NOTE_SETTINGS} in the report", UserWarning, stacklevel=3)


def write_report(experiment_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Aggregate the runs of `experiment_dir` into report.md, report.csv, report_folds.csv and two plots (PNG,
    SVG, PDF); returns their paths (the plots' PNGs under ``dice_by_method`` / ``dice_vs_volume``)."""
    runs = collect_runs(experiment_dir)
    rows, labels = method_rows(runs)
    _warn_mixed_settings(rows)
    table, folds = report_table(rows, labels), fold_table(rows)
    out = Path(out_dir or experiment_dir)
    out.mkdir(parents=True, exist_ok=True)
    edges = _edges(runs[0]["volume_bins_ml"])
    name = Path(experiment_dir).resolve().name
    unit = runs_size_unit(runs)
    structure = structure_name(runs)
    size = f"{structure} {_size_word(unit)}"
    steps = sorted({int(r["train_steps"]) for r in rows if math.isfinite(r["train_steps"])})
    tested = {ref: int(np.isfinite(table[f"p_vs_{ref}"]).sum()) for ref in REFERENCES}
    notes = [f"{NOTE_BELOW_BASE} folds whose selected network's Dice on the inner validation split (carved from the "
             "fold's training cases) stayed below the unadapted base's there: training did not help on them (⚠ in "
             "the per-fold table)."]
    if any(r["base_from_runs"] for r in rows):
        notes.append(f"{NOTE_BASE_FROM_RUNS} no `none` runs: the unadapted base as validated by the other runs "
                     "before tuning.")
    for r in rows:
        if r["settings_differ"]:
            notes.append(f"{NOTE_SETTINGS} `{r['method']}` pools folds trained with different settings: "
                         + "; ".join(f"`{d}`" for d in r["settings_differ"]) + ".")
    text = "\n".join([
        f"# Cross-validation report: {name} ({structure})",
        "",
        f"{len(runs)} runs, {len(rows)} methods. Over the validation cases of all folds pooled (each case scored "
        f"against its label file, on the file's grid; in k-fold CV each case is validated once): n cases, Dice "
        f"mean ± sd over cases, its 95% bootstrap interval (percentile method, {BOOTSTRAP_RESAMPLES:,} resamples "
        f"of the cases, seed {BOOTSTRAP_SEED}), and the two-sided Wilcoxon signed-rank p-value of the per-case "
        "Dice paired by case against `full` and `none`. Several methods are each tested against the same "
        f"reference, so the p-values shown are Holm–Bonferroni adjusted within each family ({tested['full']} tests "
        f"against `full`, {tested['none']} against `none`); report.csv holds them unadjusted (`p_vs_full`, "
        "`p_vs_none`) and adjusted (`..._holm`). Trainable parameters and training time (forward + backward + "
        f"optimiser step; training steps per fold: {', '.join(map(str, steps)) or '-'}) are means over folds.",
        "",
        markdown_table(table),
        "",
        *notes,
        "",
        "## Per fold",
        "",
        "Mean Dice of each fold's validation cases (n cases).",
        "",
        markdown_fold_table(folds),
        "",
        f"report.csv also holds, per method: HD95 ({'px' if unit == 'px' else 'mm'}), Dice by {size} bin (by true "
        f"{_size_word(unit)}: {', '.join(labels)}), the Pearson correlation of predicted with true {size}, the Dice "
        "of the last training step (the Dice above is the network selected on the inner split), the folds below "
        "the base, training steps and peak memory "
        f"({next((r['memory'] for r in rows if r['memory']), 'n/a')}); report_folds.csv the per-fold table.",
        "",
        "![Dice per method](dice_by_method.png) ([SVG](dice_by_method.svg), [PDF](dice_by_method.pdf))",
        f"![Dice vs {size}](dice_vs_volume.png) ([SVG](dice_vs_volume.svg), [PDF](dice_vs_volume.pdf))",
        "",
    ])
    paths = {"markdown": out / "report.md", "csv": out / "report.csv", "folds_csv": out / "report_folds.csv"}
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(text, encoding="utf-8")
    with atomic_path(paths["csv"]) as tmp:
        tmp.write_text(csv_text(table), encoding="utf-8")
    with atomic_path(paths["folds_csv"]) as tmp:
        tmp.write_text(csv_text(folds), encoding="utf-8")
    paths["dice_by_method"] = plot_dice_by_method(
        rows, out / "dice_by_method.png", f"{name}: {structure} Dice per method (validation cases of all folds pooled)")
    paths["dice_vs_volume"] = plot_dice_vs_volume(
        rows, edges, out / "dice_vs_volume.png", f"{name}: Dice against true {size}, per method", unit, structure)
    for key in ("dice_by_method", "dice_vs_volume"):
        for fmt in FIGURE_FORMATS[1:]:
            paths[f"{key}_{fmt}"] = paths[key].with_suffix(f".{fmt}")
    return paths
