"""The runs of a cross-validation report: every finished fold folder under an experiment folder, their method
names, the settings in which a method's folds differ, and what they segment (:mod:`segadapt.training.report`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from segadapt.runs import CONFIG_FILE, FINGERPRINT_FILE, read_metrics, read_run_config, run_changes

_FOLD_DIR = re.compile(r"fold\d+")

def runs_size_unit(runs: Sequence[dict[str, Any]]) -> str:
    """The runs' unit of lesion sizes ('mL'; 'mm^2' or 'px' for 2D images; runs written before it: 'mL')."""
    units = {run.get("size_unit", "mL") for run in runs}
    if len(units) > 1:
        raise ValueError(f"runs of one report must share the unit of lesion sizes, got {sorted(units)}")
    return units.pop()

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


def collect_runs(experiment_dir: str | os.PathLike, skip: Collection[Path] = (),
                 required: bool = True) -> list[dict[str, Any]]:
    """The metrics.json of every finished run in a ``fold<k>`` folder under `experiment_dir` (any depth;
    source pretraining runs left out), each with ``method_dir``: its method folder relative to `experiment_dir`.
    A ``fold<k>`` run folder without metrics.json (killed or still training) is refused, not left out; the
    folders in `skip` (``auto`` folds a search has not finished, :func:`~.report_auto.unfinished_auto_runs`) are
    left out. No finished run is an error when `required`."""
    root = Path(experiment_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"experiment folder not found: {root}")
    skipped = {Path(p).resolve() for p in skip}
    for config in sorted(root.rglob("config.yaml")):  # a run folder without metrics.json: killed or still training
        if _FOLD_DIR.fullmatch(config.parent.name) and config.parent.parent != root \
                and config.parent.resolve() not in skipped:
            read_metrics(config.parent)
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        if not _FOLD_DIR.fullmatch(path.parent.name) or path.parent.parent == root or path.parent.resolve() in skipped:
            continue
        run = _read_metrics(path)
        if run.get("run", {}).get("experiment") == "pretrain":
            continue
        runs.append({**run, "method_dir": path.parent.parent.relative_to(root).as_posix(), "fold_dir": str(path.parent)})
    if not runs and required:
        raise FileNotFoundError(f"no finished runs under {root} (expected <model>/<method>/fold<k>/metrics.json)")
    return runs


def method_names(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Each run's method: its method folder, less a first level that all runs share (e.g. one model folder)."""
    parts = [r["method_dir"].split("/") for r in runs]
    while all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    return ["/".join(p) for p in parts]

def check_each_case_once(method: str, folds: Sequence[dict[str, Any]]) -> None:
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
AUTO_METHOD = "auto"  # the method of the runs `segadapt auto` trains: each fold its own chosen adaptation
# config.yaml keys (and the keys under them) in which the folds of `auto` differ by design: what the search chose
AUTO_CHOSEN_KEYS = ("run.tuning", "module.adapter", "module.preset", "module.lr", "module.norms",
                    "module.reg_weight")  # reg_weight: the chosen method's own (configs/adapter/tlora.yaml)


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


def is_auto(folds: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the runs are the folds of ``segadapt auto`` (run.method ``auto``)."""
    return all(f["run"].get("method") == AUTO_METHOD for f in folds)


def settings_differences(folds: Sequence[dict[str, Any]]) -> list[str]:
    """``'fold k: key: old -> new'`` for each setting in which a fold's config.yaml differs from the first fold's
    (:data:`PER_FOLD_KEYS` and :data:`~segadapt.runs.NON_IDENTITY_KEYS` aside, and for ``auto`` the adaptation
    its search chose per fold, :data:`AUTO_CHOSEN_KEYS`); [] when they agree."""
    configs = [(f["run"]["fold"], _fold_config(f)) for f in folds]
    configs = [(fold, c) for fold, c in configs if c is not None]
    if not configs:
        return []
    chosen = AUTO_CHOSEN_KEYS if is_auto(folds) else ()
    first = configs[0][1]
    return [f"fold {fold}: {change}" for fold, config in configs[1:] for change in run_changes(first, config)
            if not any(re.match(re.escape(key) + r"[.:]", change) for key in chosen)]


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
