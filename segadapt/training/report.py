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

With an ``auto.json`` (a ``segadapt auto`` search) in the experiment folder, report.md ends with the section
"Automatic adaptation" (:mod:`segadapt.training.report_auto`): the chosen configuration per fold, the search
trace (``auto_trace``), trials per hour, the importance of each option; ``auto_trials.csv`` and
``auto_importance.csv`` beside it. The ``auto`` runs are a row of the main table like any method.

A learning curve or a study of several models is either one experiment folder per point (one report each)
or method folders whose names say the setting (``lora_c_n5``, ``lora_c_n10``): both need nothing more.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segadapt.io import atomic_path

from .report_auto import auto_section, read_record, unfinished_auto_runs
from .report_plots import FIGURE_FORMATS, plot_dice_by_method, plot_dice_vs_volume, size_word
from .report_runs import collect_runs, runs_size_unit, structure_name
from .report_stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, REFERENCES, bin_edges, method_rows
from .report_tables import (NOTE_BASE_FROM_RUNS, NOTE_BELOW_BASE, NOTE_SETTINGS, csv_text, fold_table,
                            markdown_fold_table, markdown_table, report_table)


def _warn_mixed_settings(rows: Sequence[dict[str, Any]]) -> None:
    """One warning per method whose folds were trained with different settings (flagged in the table too)."""
    for r in rows:
        if r["settings_differ"]:
            shown = "; ".join(r["settings_differ"][:3]) + ("; ..." if len(r["settings_differ"]) > 3 else "")
            warnings.warn(f"method {r['method']!r} pools folds trained with different settings ({shown}): its row "
                          f"is flagged {NOTE_SETTINGS} in the report", UserWarning, stacklevel=3)


def _search_report(experiment_dir: str | os.PathLike, record: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.md of an experiment folder that holds a search and no finished run: the search as far as it got."""
    name = Path(experiment_dir).resolve().name
    section, paths = auto_section(experiment_dir, record, out, name)
    text = (f"# Search report: {name}\n\nNo finished run yet (a search's chosen configuration is trained after its "
            f"trials): the search as far as it got.\n\n{section}")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return {"markdown": out / "report.md", **paths}


def write_report(experiment_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Aggregate the runs of `experiment_dir` into report.md, report.csv, report_folds.csv and two plots (PNG,
    SVG, PDF); returns their paths (the plots' PNGs under ``dice_by_method`` / ``dice_vs_volume``)."""
    record = read_record(experiment_dir)
    runs = collect_runs(experiment_dir, skip=unfinished_auto_runs(experiment_dir, record) if record else (),
                        required=record is None)
    if not runs:  # a search whose chosen configurations have not been trained yet, and no other run
        return _search_report(experiment_dir, record, Path(out_dir or experiment_dir))
    rows, labels = method_rows(runs)
    _warn_mixed_settings(rows)
    table, folds = report_table(rows, labels), fold_table(rows)
    out = Path(out_dir or experiment_dir)
    out.mkdir(parents=True, exist_ok=True)
    edges = bin_edges(runs[0]["volume_bins_ml"])
    name = Path(experiment_dir).resolve().name
    unit = runs_size_unit(runs)
    structure = structure_name(runs)
    size = f"{structure} {size_word(unit)}"
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
        f"{size_word(unit)}: {', '.join(labels)}), the Pearson correlation of predicted with true {size}, the Dice "
        "of the last training step (the Dice above is the network selected on the inner split), the folds below "
        "the base, training steps and peak memory "
        f"({next((r['memory'] for r in rows if r['memory']), 'n/a')}); report_folds.csv the per-fold table.",
        "",
        "![Dice per method](dice_by_method.png) ([SVG](dice_by_method.svg), [PDF](dice_by_method.pdf))",
        f"![Dice vs {size}](dice_vs_volume.png) ([SVG](dice_vs_volume.svg), [PDF](dice_vs_volume.pdf))",
        "",
    ])
    auto_paths: dict[str, Path] = {}
    if record is not None:
        section, auto_paths = auto_section(experiment_dir, record, out, name, {int(r["run"]["fold"]) for r in runs}, rows)
        text += "\n" + section
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
    return paths | auto_paths
