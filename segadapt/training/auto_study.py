"""The studies of ``segadapt auto``: interrupted trials retried, the choice per fold, a trial as ``auto.json``
lists it (:mod:`segadapt.training.auto`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from segadapt.runs import read_metrics

from .callbacks import standard_error

AUTO_FILE = "auto.json"  # the search's record in the experiment folder

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # trials the budget counts (and those that failed with an error)


def trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial as ``auto.json`` lists it (the state INTERRUPTED: a FAIL without an error, retried later)."""
    attrs = trial.user_attrs
    state = trial.state.name
    if trial.state in (TrialState.FAIL, TrialState.RUNNING) and "error" not in attrs:
        state = "INTERRUPTED"
    return {"number": trial.number, "state": state, "params": trial.params, "choice": attrs.get("choice"),
            "value": trial.value if trial.state == TrialState.COMPLETE else None,
            "inner_dice": attrs.get("inner_dice"), "se": attrs.get("se"), "adapter": attrs.get("adapter"),
            "trainable_params": attrs.get("trainable_params"), "time_s": attrs.get("time_s"),
            "train_steps_s": attrs.get("train_steps_s"), "curve": attrs.get("curve"),
            "intermediate": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
            "cases": attrs.get("cases"), "run_dir": attrs.get("run_dir"), "error": attrs.get("error"),
            "retry_of": attrs.get("retry_of")}


def retry_interrupted(study: optuna.Study) -> None:
    """Each interrupted trial (FAIL without an ``error`` attribute: a Ctrl-C, or a dead worker's trial failed by
    :func:`~segadapt.training.auto_workers.fail_dead_trials`) not yet retried is enqueued again with its
    parameters and run folder (which resumes from its ``last.ckpt``). A trial that failed with an error is not
    retried."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if trial.state == TrialState.FAIL and "error" not in trial.user_attrs and trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number,
                                                          **({"run_dir": trial.user_attrs["run_dir"]}
                                                             if "run_dir" in trial.user_attrs else {})})


def inner_case_dice(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    """case id -> Dice of a completed trial's network on the inner split (its run folder's ``metrics.json``)."""
    return {c["case_id"]: float(c["dice"]) for c in read_metrics(trial.user_attrs["run_dir"])["cases"]}


def paired_difference(better: Mapping[str, float], other: Mapping[str, float]) -> tuple[float, float]:
    """(mean, standard error) of ``better - other`` over their common cases. Two networks scored on the same cases
    differ by noise of the size of their per-case differences' spread, not of the cases' own spread: on 4 retinal
    images whose Dice ranges 0.78-0.81, a network 0.006 better on every image is better, although 0.006 is within
    one SE of either mean."""
    cases = sorted(set(better) & set(other))
    if not cases:
        raise ValueError("no inner case scored by both trials")
    differences = np.array([better[c] - other[c] for c in cases])
    return float(differences.mean()), standard_error(differences.std(ddof=1) if len(cases) > 1 else None, len(cases))


def choose(trials: Sequence[optuna.trial.FrozenTrial], rule: str, fold: int) -> optuna.trial.FrozenTrial:
    """The trial whose configuration fold `fold` keeps. ``best``: the best inner Dice. ``one_se``: among the trials
    within one standard error of the best, the one with the fewest trainable parameters (ties: the better Dice), as
    model selection prefers the simpler of equally good choices. A trial is within reach when the best beats it by
    at most the standard error of their per-case differences over the inner cases (:func:`paired_difference`)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    if not done:
        errors = sorted({t.user_attrs["error"] for t in trials if "error" in t.user_attrs})
        raise ValueError(f"no trial of fold {fold} finished" + (f" (errors: {'; '.join(errors[:3])})" if errors else
                                                               "; give a larger budget"))
    best = max(done, key=lambda t: (t.value, -t.number))
    if rule == "best":
        return best
    reference = inner_case_dice(best)

    def within_reach(trial: optuna.trial.FrozenTrial) -> bool:
        mean, se = paired_difference(reference, inner_case_dice(trial))
        return mean <= se

    return min((t for t in done if t is best or within_reach(t)),
               key=lambda t: (t.user_attrs.get("trainable_params", math.inf), -t.value, t.number))


def describe(choice: Mapping[str, Any]) -> str:
    parts = [str(choice["method"])]
    if "rank" in choice:
        pattern = choice.get("rank_pattern", "uniform")
        parts += [f"rank {choice['rank']}" + ("" if pattern == "uniform" else f" ({pattern})"), str(choice["placement"])]
        parts += ["+norms"] if choice.get("norms") else []
    return " ".join(parts + [f"lr x{choice['lr_factor']:.2f}"])


def fold_entry(study: optuna.Study) -> dict[str, Any]:
    """A fold as ``auto.json`` lists it, read from its study (``fold<k>``): every trial, the chosen one, the outer
    fold's result (the study's ``final``) and the ensemble comparison."""
    trials = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    final = study.user_attrs.get("final") or {}
    chosen = next((t for t in trials if t["number"] == final.get("trial")), None)
    return {"fold": int(study.study_name[len("fold"):]), "study": study.study_name,
            "cases": study.user_attrs.get("cases"),
            "chosen": None if chosen is None else {k: chosen[k] for k in ("number", "choice", "value", "se")},
            "outer": final if "dice" in final else None, "ensemble": study.user_attrs.get("ensemble"),
            "trials": trials}
