"""The report section of a ``segadapt auto`` search (:mod:`segadapt.training.auto`): read from the experiment
folder's ``auto.json``, the studies in ``auto/study.journal`` and the trials' run folders.

* the chosen configuration per fold, for the folds whose search and final run finished (and whose run folder
  ``<model>/auto/fold<k>`` holds the outer Dice the record names; any other ``auto`` fold folder is left out of
  the report, :func:`unfinished_auto_runs`, and named on a line);
* the search trace: each trial's inner Dice by trial number, the best so far (the running maximum over the
  completed trials), trials per hour of trial time and the share of it spent in training steps (the trials'
  ``metrics.json`` ``timing``);
* the importance of each option: Optuna's fANOVA (``FanovaImportanceEvaluator``, a random forest of
  scikit-learn's) over the completed trials of each fold's study, and pooled over the folds (each trial's inner
  Dice less its fold's mean, so that a fold's level is not read as an option's effect);
* ``auto_trials.csv`` (one row per trial) and ``auto_importance.csv``, to plot the figures again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from segadapt.io import atomic_path

from .report_plots import FIGURE_FORMATS, plot_auto_trace
from .auto_study import AUTO_FILE, fold_entry
from .auto_workers import STUDY_FILE, open_storage, study_names
from .report_runs import AUTO_METHOD
from .report_stats import paired_against

AUTO_FORMAT = "segadapt-auto/1"
MIN_IMPORTANCE_TRIALS = 8  # completed trials below which fANOVA's forest fits noise: no importance shown
IMPORTANCE_SEED = 0  # of fANOVA's random forest, so that a report is reproduced exactly
TRIALS_CSV, IMPORTANCE_CSV, TRACE_PLOT = "auto_trials.csv", "auto_importance.csv", "auto_trace.png"


def read_record(experiment_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The experiment folder's auto.json, or None without one; a file that is not one is a one-line error. The
    folds of ``auto/study.journal`` that it lacks (a search killed before it rewrote its record) are added from
    their studies (``from_storage``)."""
    path = Path(experiment_dir) / AUTO_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); run segadapt auto again to rewrite it") from None
    if not isinstance(record, dict) or record.get("format") != AUTO_FORMAT or not isinstance(record.get("folds"), list):
        raise ValueError(f"{path} is not a segadapt auto record (format {AUTO_FORMAT})")
    listed = {int(e["fold"]) for e in record["folds"]}
    more = [{**fold_entry(study), "from_storage": True} for fold, study in load_studies(experiment_dir).items() if fold not in listed]
    return {**record, "folds": sorted([*record["folds"], *more], key=lambda e: int(e["fold"]))}


def load_studies(experiment_dir: str | os.PathLike) -> dict[int, Any]:
    """The folds' Optuna studies (``fold<k>``) in ``auto/study.journal``, by fold (read only; {} without the file)."""
    import optuna

    path = Path(experiment_dir) / "auto" / STUDY_FILE
    if not path.is_file():
        return {}
    storage = open_storage(path.parent)
    names = sorted(n for n in study_names(storage) if n.startswith("fold") and n[4:].isdigit())
    return {int(n[4:]): optuna.load_study(study_name=n, storage=storage) for n in names}


def _final_folders(root: Path) -> dict[int, list[Path]]:
    """The ``<model>/auto/fold<k>`` folders under the experiment folder `root`, by fold."""
    found: dict[int, list[Path]] = {}
    for folder in sorted(root.glob(f"*/{AUTO_METHOD}/fold*")):
        if folder.is_dir() and folder.name[4:].isdigit():
            found.setdefault(int(folder.name[4:]), []).append(folder)
    return found


def _matches(folder: Path, outer: Mapping[str, Any]) -> bool:
    """Whether the run folder holds the outer result the record names (its Dice and its cases)."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        return (metrics["run"]["method"] == AUTO_METHOD and math.isclose(metrics["val"]["dice"], outer["dice"],
                                                                         rel_tol=1e-12, abs_tol=1e-15)
                and sorted(c["case_id"] for c in metrics["cases"]) == sorted(outer.get("cases") or []))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def fold_states(experiment_dir: str | os.PathLike, record: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Per fold of the record (and per fold with an ``auto`` run folder): ``complete`` (the search chose, the chosen
    configuration was trained and its folder holds the recorded outer Dice), ``folder`` and ``why`` not."""
    root = Path(experiment_dir)
    finals = _final_folders(root)
    states = {}
    for entry in record["folds"]:
        fold, outer = int(entry["fold"]), entry.get("outer")
        folders = finals.get(fold, [])
        named = [f for f in folders if outer and Path(str(outer.get("run_dir", ""))).parts[-3:] == f.parts[-3:]]
        folder = (named or folders or [None])[0]
        if not outer:
            done = sum(t["state"] in ("COMPLETE", "PRUNED") for t in entry["trials"])
            why = (f"search stopped or still running after {done} finished trials" if not entry.get("chosen")
                   else "the chosen configuration's run has not finished")
        elif folder is None or not (folder / "metrics.json").is_file():
            why = f"its run folder <model>/auto/fold{fold} is missing or unfinished"
        elif not _matches(folder, outer):
            why = f"{folder} does not hold the outer Dice auto.json records (trained again after the search?)"
        else:
            why = None
        states[fold] = {"complete": why is None, "why": why, "folder": folder, "entry": entry}
    for fold, folders in finals.items():
        if fold not in states:
            states[fold] = {"complete": False, "why": "not in auto.json (a search of another command?)",
                            "folder": folders[0], "entry": None}
    return dict(sorted(states.items()))


def unfinished_auto_runs(experiment_dir: str | os.PathLike, record: Mapping[str, Any]) -> list[Path]:
    """The ``<model>/auto/fold<k>`` folders the main table leaves out: those of folds :func:`fold_states` does not
    count complete (a fold must not be scored by a run the search has not finished or no longer names)."""
    root = Path(experiment_dir)
    states = fold_states(root, record)
    return [f for fold, folders in _final_folders(root).items() for f in folders
            if not states[fold]["complete"] or f != states[fold]["folder"]]


# ---- the trials ---------------------------------------------------------------------------------------------
def _trial_metrics(root: Path, fold: int, trial: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's metrics.json (its recorded folder, else the same name under this experiment folder's
    ``auto/fold<k>/``, the folder having moved); {} when there is none (pruned before its end, failed)."""
    recorded = Path(str(trial.get("run_dir") or ""))
    for folder in (recorded, root / "auto" / f"fold{fold}" / recorded.name):
        try:
            return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return {}


def best_so_far(trials: Sequence[Mapping[str, Any]]) -> list[float]:
    """After each trial (by number): the best value of the completed trials so far (NaN before the first)."""
    best, out = -math.inf, []
    for t in sorted(trials, key=lambda t: t["number"]):
        if t["state"] == "COMPLETE" and t.get("value") is not None and math.isfinite(t["value"]):
            best = max(best, t["value"])
        out.append(best if math.isfinite(best) else math.nan)
    return out


def trial_table(experiment_dir: str | os.PathLike, record: Mapping[str, Any],
                states: Mapping[int, Mapping[str, Any]]) -> pd.DataFrame:
    """auto_trials.csv: one row per trial of every fold: state, parameters (``param_<name>``), inner Dice (a pruned
    trial's too: its selected network scored), SE, best so far, seconds (of the trial, and by ``timing`` phase of
    its run), trainable parameters, learning rate, whether its fold chose it."""
    root, records = Path(experiment_dir), []
    for entry in record["folds"]:
        fold, trials = int(entry["fold"]), sorted(entry["trials"], key=lambda t: t["number"])
        chosen = (entry.get("chosen") or {}).get("number") if states[fold]["complete"] else None
        for trial, best in zip(trials, best_so_far(trials)):
            timing = _trial_metrics(root, fold, trial).get("timing") or {}
            records.append({
                "fold": fold, "number": trial["number"], "state": trial["state"],
                **{f"param_{k}": v for k, v in (trial.get("params") or {}).items()},
                "inner_dice": trial.get("inner_dice"), "se": trial.get("se"), "value": trial.get("value"),
                "best_so_far": best, "time_s": trial.get("time_s"),
                **{f"timing_{k}": v for k, v in timing.items() if k.endswith("_s") and isinstance(v, (int, float))},
                "trainable_params": trial.get("trainable_params"), "lr": (trial.get("adapter") or {}).get("lr"),
                "pruned_at_step": max(map(int, trial["intermediate"])) if trial["state"] == "PRUNED"
                and trial.get("intermediate") else None,
                "chosen": int(trial["number"] == chosen), "error": trial.get("error"),
            })
    columns = ["fold", "number", "state", "inner_dice", "se", "value", "best_so_far", "time_s", "trainable_params",
               "lr", "pruned_at_step", "chosen", "error"]
    table = pd.DataFrame(records, dtype=object)  # object: an integer parameter stays one beside missing values
    return table.reindex(columns=columns + [c for c in table.columns if c not in columns])


def throughput(trials: pd.DataFrame) -> dict[str, float]:
    """Over the finished (completed or pruned) trials: their number, trial seconds (as the search timed each run),
    trials per hour = 3600 n / seconds, and the share of those seconds each ``timing`` phase of the runs took
    (``share_train_steps_s``: the training steps); NaN where undefined."""
    done = trials[trials["state"].isin(["COMPLETE", "PRUNED"])]
    seconds = float(pd.to_numeric(done["time_s"], errors="coerce").sum())
    phases = [c for c in done.columns if c.startswith("timing_") and c != "timing_total_s"]
    return {"trials": len(done), "seconds": seconds,
            "per_hour": 3600.0 * len(done) / seconds if seconds > 0 else math.nan,
            **{f"share_{c[len('timing_'):]}": float(pd.to_numeric(done[c], errors="coerce").sum()) / seconds
               if seconds > 0 else math.nan for c in phases}}


# ---- importance ---------------------------------------------------------------------------------------------
def _subsets(trials: Sequence[Any]) -> list[tuple[str, list[str]]]:
    """The parameter sets to assess: those every completed trial has, and (a conditional space: rank and placement
    only for the adapters) the largest set the most trials share, over the trials that have it."""
    sets = [frozenset(t.params) for t in trials]
    if not sets:
        return []
    common = sorted(frozenset.intersection(*sets))
    most = max(set(sets), key=lambda s: (sets.count(s), len(s)))
    out = [("all completed trials", common)]
    if len(most) > len(common):
        out.append(("trials with " + ", ".join(sorted(most - set(common))), sorted(most)))
    return out


def _fanova(trials: Sequence[Any], params: Sequence[str]) -> dict[str, float]:
    """``optuna.importance.get_param_importances`` with fANOVA over `trials` (their values as given)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study made here
    try:
        study = optuna.create_study(direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials(trials)
    return get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=IMPORTANCE_SEED), params=list(params))


def importance_table(studies: Mapping[int, Any], pool: bool) -> tuple[pd.DataFrame, list[str]]:
    """fANOVA importance (normalised to sum 1) per fold and, with `pool`, over the folds' completed trials together
    (values less their fold's mean); rows scope, subset, n_trials, param, importance. With the lines that say
    where none was computed (too few completed trials, no variation)."""
    from optuna.trial import TrialState, create_trial

    done = {fold: [t for t in s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if t.value is not None and math.isfinite(t.value)] for fold, s in studies.items()}
    scopes = [(f"fold {fold}", trials) for fold, trials in done.items()]
    if pool and len(done) > 1:
        centred = []
        for trials in done.values():
            mean = sum(t.value for t in trials) / max(len(trials), 1)
            centred += [create_trial(params=t.params, distributions=t.distributions, value=t.value - mean)
                        for t in trials]
        scopes.append(("pooled", centred))
    rows, lines = [], []
    for scope, trials in scopes:
        if len(trials) < MIN_IMPORTANCE_TRIALS:
            lines.append(f"{scope}: {len(trials)} completed trials, too few for fANOVA (it needs "
                         f"{MIN_IMPORTANCE_TRIALS} here); no importance shown.")
            continue
        for subset, params in _subsets(trials):
            chosen = [t for t in trials if set(params) <= set(t.params)]
            if len(chosen) < MIN_IMPORTANCE_TRIALS:
                lines.append(f"{scope}, {subset}: {len(chosen)} completed trials, too few for fANOVA (it needs "
                             f"{MIN_IMPORTANCE_TRIALS} here); no importance shown.")
                continue
            try:
                values = _fanova(chosen, params)
            except ValueError as error:  # e.g. the folds searched different spaces
                lines.append(f"{scope}, {subset}: no importance ({' '.join(str(error).split())}).")
                continue
            except ImportError:  # a dependency of segadapt, but an environment may lack it
                lines.append("fANOVA needs scikit-learn (pip install scikit-learn): no importance shown.")
                return pd.DataFrame(columns=["scope", "subset", "n_trials", "param", "importance"]), lines
            if not all(math.isfinite(v) for v in values.values()) or not any(values.values()):
                lines.append(f"{scope}, {subset}: the inner Dice did not vary with the options; no importance.")
                continue
            rows += [{"scope": scope, "subset": subset, "n_trials": len(chosen), "param": p, "importance": v}
                     for p, v in values.items()]
    return pd.DataFrame.from_records(rows, columns=["scope", "subset", "n_trials", "param", "importance"]), lines


# ---- the section --------------------------------------------------------------------------------------------
def _cell(value: Any, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else (
        f"{value:.{digits}g}" if isinstance(value, float) else str(value))


def chosen_table(record: Mapping[str, Any], states: Mapping[int, Mapping[str, Any]]) -> pd.DataFrame:
    """The chosen configuration of each complete fold: trial, method, rank, placement, the layers trained in full
    beside the adapter, lr, trainable parameters (of the fold's run), inner Dice and SE, outer Dice and n. A fold
    whose ensemble was kept lists its members, joined by ``+``, with the ensemble's inner Dice and SE."""
    placements = ((record.get("settings") or {}).get("space") or {}).get("placements") or {}
    rows = []
    for fold, state in states.items():
        if not state["complete"]:
            continue
        entry = state["entry"]
        numbers = entry["outer"].get("members") or [entry["chosen"]["number"]]
        trials = [next(t for t in entry["trials"] if t["number"] == n) for n in numbers]
        columns: dict[str, list] = {}
        for trial in trials:
            choice, adapter = trial.get("choice") or trial["params"], trial.get("adapter") or {}
            beside = (placements.get(choice.get("placement")) or {}).get("train")
            modules = (adapter.get("spec") or {}).get("train_modules") if isinstance(adapter.get("spec"), dict) else None
            for key, value in (("trial", trial["number"]), ("method", choice.get("method")), ("rank", choice.get("rank")),
                               ("placement", choice.get("placement")),
                               ("train_modules", f"{beside} ({len(modules)} modules)" if beside and modules else beside),
                               ("lr", adapter.get("lr")), ("lr_factor", choice.get("lr_factor"))):
                columns.setdefault(key, []).append(value)
        joined = {k: v[0] if len(v) == 1 else " + ".join(_cell(x, 2 if k.startswith("lr") else 3) for x in v)
                  for k, v in columns.items()}
        ensemble = entry.get("ensemble") if len(trials) > 1 else None
        metrics = json.loads((state["folder"] / "metrics.json").read_text(encoding="utf-8"))
        rows.append({"fold": fold, **joined, "trainable_params": metrics["cost"]["trainable_params"],
                     "inner_dice": ensemble["inner_dice"] if ensemble else trials[0].get("value"),
                     "inner_se": ensemble["inner_se"] if ensemble else trials[0].get("se"),
                     "outer_dice": entry["outer"]["dice"], "outer_n": entry["outer"].get("n_cases")})
    return pd.DataFrame.from_records(rows)


def _markdown_chosen(table: pd.DataFrame) -> str:
    cells = pd.DataFrame({
        "fold": table["fold"].astype(str), "trial": table["trial"].astype(str), "method": table["method"],
        "rank": table["rank"].map(_cell), "placement": table["placement"].map(_cell),
        "trained beside": table["train_modules"].map(_cell), "lr": table["lr"].map(lambda v: _cell(v, 2)),
        "trainable params": table["trainable_params"].map(lambda v: f"{int(v):,}"),
        "inner Dice ± SE": [f"{d:.3f} ± {s:.3f}" for d, s in zip(table["inner_dice"], table["inner_se"].fillna(0))],
        "outer Dice (n)": [f"{d:.3f} ({int(n)})" for d, n in zip(table["outer_dice"], table["outer_n"])],
    })
    return cells.to_markdown(index=False, disable_numparse=True)


def _markdown_importance(table: pd.DataFrame) -> str:
    """One table per subset of trials: a row per parameter, a column per fold (and pooled) with its trials."""
    parts = []
    for subset, rows in table.groupby("subset", sort=False):
        rows = rows.assign(column=rows["scope"] + " (n=" + rows["n_trials"].astype(str) + ")")
        wide = rows.pivot_table(index="param", columns="column", values="importance", sort=False)
        parts += [f"{subset[0].upper()}{subset[1:]}:", "",
                  wide.reset_index().to_markdown(index=False, floatfmt=".2f", missingval="-"), ""]
    return "\n".join(parts)


def _timing_line(label: str, figures: Mapping[str, float]) -> str:
    phases = sorted(((k[len("share_"):-2].replace("_", " "), v) for k, v in figures.items()
                     if k.startswith("share_") and math.isfinite(v)), key=lambda kv: -kv[1])
    shares = ", ".join(f"{name} {100 * v:.0f}%" for name, v in phases)
    steps = figures.get("share_train_steps_s", math.nan)
    return (f"- {label}: {figures['trials']} finished trials in {figures['seconds']:.0f} s of trial time: "
            f"**{figures['per_hour']:.0f} trials per hour**; training steps "
            f"{'-' if not math.isfinite(steps) else f'{100 * steps:.0f}%'} of it"
            + (f" (by phase of the runs' timing: {shares})" if shares else ""))


def _signed(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:+.3f}"


def _dice(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.3f}"


def _markdown_paired(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per group with an ``auto`` row: `auto` against each other method of the group, paired by case."""
    lines = []
    for auto_row in (r for r in rows if r["tuning"] == AUTO_METHOD):
        table = paired_against(rows, auto_row["method"])
        if not table:
            continue
        lines += [f"| `{auto_row['method']}` against | n cases | it | `auto` | `auto` - it | p | p (Holm) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {e['method']} | {e['n']} | {_dice(e['other_mean'])} | {_dice(e['mean'])} | "
                  f"{_signed(e['difference'])} | {_cell(e['p'], 2)} | {_cell(e['p_holm'], 2)} |" for e in table]
        lines.append("")
    return lines


def auto_section(experiment_dir: str | os.PathLike, record: Mapping[str, Any], out: Path, name: str,
                 folds: Collection[int] = (), rows: Sequence[Mapping[str, Any]] = ()) -> tuple[str, dict[str, Path]]:
    """The "Automatic adaptation" section of report.md, and the files it writes beside it (`folds`: those of the
    experiment's other runs, named incomplete when the record lacks them; `rows`: the report's method rows, for
    `auto` against each fixed method)."""
    root = Path(experiment_dir)
    states = fold_states(root, record)
    for fold in sorted(set(folds) - set(states)):
        states[fold] = {"complete": False, "why": "not searched (not in auto.json)", "folder": None, "entry": None}
    trials = trial_table(root, record, states)
    chosen = chosen_table(record, states)
    studies = load_studies(root)
    settings = [s.user_attrs.get("settings") for s in studies.values()]
    importance, notes = importance_table(studies, pool=all(s == settings[0] for s in settings))
    if not studies:
        notes.append(f"No {root / 'auto' / STUDY_FILE}: the importance of the options is not computed.")
    paths = {"auto_trials_csv": out / TRIALS_CSV, "auto_importance_csv": out / IMPORTANCE_CSV}
    for key, table in (("auto_trials_csv", trials), ("auto_importance_csv", importance)):
        with atomic_path(paths[key]) as tmp:
            tmp.write_text(table.to_csv(index=False, na_rep="", lineterminator="\r\n"), encoding="utf-8")
    paths["auto_trace"] = plot_auto_trace(trials, out / TRACE_PLOT, f"{name}: segadapt auto, inner Dice per trial")
    for fmt in FIGURE_FORMATS[1:]:
        paths[f"auto_trace_{fmt}"] = paths["auto_trace"].with_suffix(f".{fmt}")
    paired = _markdown_paired(rows)
    incomplete = [f"fold {fold} ({s['why']})" for fold, s in states.items() if not s["complete"]]
    stored = [str(e["fold"]) for e in record["folds"] if e.get("from_storage")]
    space = (record.get("settings") or {}).get("space") or {}
    timing = [_timing_line(f"fold {fold}", throughput(trials[trials["fold"] == fold]))
              for fold in sorted(trials["fold"].unique())] if len(trials) else []
    if len(timing) > 1:
        timing.append(_timing_line("all folds", throughput(trials)))
    text = [
        "## Automatic adaptation", "",
        f"`segadapt auto` searched {len(record['folds'])} fold{'s' * (len(record['folds']) != 1)} (`{' '.join(record.get('command') or [])}`): each "
        "trial trained on the fold's training patients and scored on its inner split; the choice per fold "
        f"(rule `{space.get('rule', '?')}`) was trained on the fold and scored once on its validation cases "
        "(outer Dice): the `auto` row of the main table.", "",
        *([f"Fold {', '.join(stored)}: read from {STUDY_FILE} (auto.json lacks it: the search was killed before "
           "it rewrote its record).", ""] if stored else []),
        *([f"**Incomplete** (reported as far as the search got; left out of the `auto` row and the chosen configurations): "
           f"{'; '.join(incomplete)}.", ""] if incomplete else []),
        "### Chosen configuration per fold", "",
        _markdown_chosen(chosen) if len(chosen) else "No fold has finished.", "",
        *(["### `auto` against each fixed method", "",
            "Paired by case over the validation cases both scored (the folds `auto` finished): the means over "
            "those cases, their mean difference, the two-sided Wilcoxon signed-rank p and its Holm–Bonferroni "
            "adjustment over these comparisons.", "", *paired] if paired else []),
        "### Search trace", "",
        "Inner Dice of each trial by trial number (pruned trials: the selected network of the steps they ran), the "
        "best completed trial so far, the chosen one starred. Trials per hour of trial time (the seconds each "
        "trial's run took, as the search timed it) and the share of it in the runs' timing phases (metrics.json).",
        "", *timing, "",
        f"![search trace]({TRACE_PLOT}) ([SVG](auto_trace.svg), [PDF](auto_trace.pdf)); every trial in "
        f"{TRIALS_CSV}.", "",
        "### Importance of each option", "",
        "Optuna's fANOVA (random forest seed 0) over the completed trials' inner Dice, normalised to sum 1 per "
        "column: per fold, and pooled over the folds (each trial's Dice less its fold's mean). Pruned trials are "
        "left out (their value is that of a shortened run). Rank and placement exist only for the adapter "
        f"methods, so they are assessed over the trials that have them. In {IMPORTANCE_CSV}.", "",
        *([_markdown_importance(importance)] if len(importance) else []),
        *[f"- {line}" for line in notes], "",
    ]
    return "\n".join(text), paths
