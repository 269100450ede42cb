"""Ensembles of the top trials of a ``segadapt auto`` fold (:mod:`segadapt.training.auto`).

After a fold's search, the top ``auto.ensemble`` completed trials of adapter methods (all adapt the same frozen
base; ``full`` / ``decoder`` trials replace it and are left out) are scored together on the inner split: the mean
of their selected networks' probabilities (each loaded with :func:`segadapt.training.load.load_run`, each with its
run's test-time mirroring), scored per case through a run's own validation path
(:meth:`SegAdaptModule._evaluate` under ``trainer.validate``: back to the file grid, no postprocessing, as the
trials' inner Dice). :func:`prefer_ensemble` decides. A chosen ensemble is stored as an ensemble folder
(:data:`segadapt.runs.ENSEMBLE_FILE`): each member configuration trained on the outer fold as an ordinary run
folder inside it, and a ``metrics.json`` of the ensemble's outer-fold scores.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from segadapt.io import write_json
from segadapt.adapters import load_adapter
from segadapt.runs import ADAPTER_FILE, CONFIG_FILE, ENSEMBLE_FILE, ENSEMBLE_FORMAT, METRICS_FORMAT, read_run_config, write_metrics

from .auto_space import BASELINE_METHODS
from .auto_study import inner_case_dice, paired_difference
from .callbacks import standard_error
from .datamodule import SegDataModule
from .fit import _EVALUATION_TRAINER_KEYS
from .load import load_run
from .metrics import bin_labels, summarize
from .module import SegAdaptModule
from .postprocessing import choose_postprocessing

class MeanOfRuns(SegAdaptModule):
    """The validation path of a run (:class:`SegAdaptModule`, settings of the first run) whose whole-volume
    probabilities are the mean over the finished runs' networks: p(x) = 1/K sum_k p_k(x), each p_k with its own
    run's mirroring."""

    def __init__(self, run_dirs: Sequence[str | Path]) -> None:
        loaded = [load_run(r) for r in run_dirs]
        super().__init__(**{**loaded[0][1]["module"], "adapter": "none"})
        self.members = nn.ModuleList(module for module, _ in loaded)
        self.eval()

    @torch.no_grad()
    def predict_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        total = None
        for member in self.members:
            probabilities = member.predict_probabilities(image)
            total = probabilities if total is None else total.add_(probabilities)
        return total / len(self.members)


def score_runs(run_dirs: Sequence[str | Path], datamodule_kwargs: Mapping[str, Any],
               trainer_kwargs: Mapping[str, Any]) -> tuple[list[dict], dict, list[float], str]:
    """(case rows, postprocessing choice, volume bins, size unit) of the mean of the runs' probabilities on the
    validation cases of `datamodule_kwargs` (a run config's ``datamodule``)."""
    module = MeanOfRuns(run_dirs)
    datamodule = SegDataModule(**datamodule_kwargs)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **{k: v for k, v in trainer_kwargs.items() if k in _EVALUATION_TRAINER_KEYS})
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return module.case_rows, choose_postprocessing(module.component_counts), module.bins, datamodule.size_unit


def ensemble_candidates(trials: Sequence[optuna.trial.FrozenTrial], size: int) -> list[optuna.trial.FrozenTrial]:
    """The top `size` completed trials of adapter methods by inner Dice (ties: the earlier trial) whose adapters
    can sit on one base together (:func:`share_a_base`; a trial that cannot join the better ones is passed
    over); [] when fewer than two qualify or `size` < 2 (no ensemble)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
            and t.user_attrs.get("choice", {}).get("method") not in BASELINE_METHODS]
    members: list[optuna.trial.FrozenTrial] = []
    for trial in sorted(done, key=lambda t: (-t.value, t.number)) if size >= 2 else []:
        if len(members) < size and share_a_base([t.user_attrs["run_dir"] for t in [*members, trial]]):
            members.append(trial)
    return members if len(members) >= 2 else []


def share_a_base(run_dirs: Sequence[str | Path]) -> bool:
    """Whether the runs' adapters load onto one base side by side, as ``segadapt predict`` holds an ensemble
    (e.g. not when one adapts a layer that another trains in full beside its adapter)."""
    config = read_run_config(run_dirs[0])
    net = SegAdaptModule(**{**config["module"], "adapter": "none"}).net
    try:
        for i, run_dir in enumerate(run_dirs):
            load_adapter(net, Path(run_dir) / ADAPTER_FILE, name=f"m{i}", active=False)
    except ValueError:
        return False
    return True


def prefer_ensemble(difference: float, difference_se: float, rule: str) -> bool:
    """Whether the fold keeps the ensemble rather than the single choice, given the mean and standard error of the
    ensemble's per-case inner Dice less the single choice's. ``one_se``: the mean beats its standard error. The
    one-SE rule already treats differences within one standard error as noise; an ensemble costs K times the
    parameters and the inference time, so it has to clear the same yardstick to count as better.
    ``always`` / ``never``: forced."""
    if rule == "always" or rule == "never":
        return rule == "always"
    return difference > difference_se


def inner_comparison(members: Sequence[optuna.trial.FrozenTrial], single: optuna.trial.FrozenTrial,
                     rule: str) -> dict[str, Any]:
    """The ensemble of the `members` trials scored on the inner split, against the `single` choice paired by case
    (``auto.json``)."""
    first = read_run_config(members[0].user_attrs["run_dir"])
    cases, _, bins, _ = score_runs([t.user_attrs["run_dir"] for t in members], first["datamodule"], first["trainer"])
    summary = summarize(cases, bins)
    difference, difference_se = paired_difference({c["case_id"]: float(c["dice"]) for c in cases},
                                                  inner_case_dice(single))
    return {"members": [t.number for t in members], "inner_dice": float(summary["dice"]),
            "inner_se": standard_error(summary["dice_sd"], summary["n_cases"]),
            "inner_cases": [{"case_id": c["case_id"], "dice": c["dice"]} for c in cases],
            "single": {"trial": single.number, "inner_dice": single.value},
            "difference": difference, "difference_se": difference_se,
            "rule": rule, "chosen": prefer_ensemble(difference, difference_se, rule)}


def remove_final(run_dir: Path) -> None:
    """Delete the folder of a fold's earlier final choice, a run folder (``config.yaml``) or an ensemble folder
    (``ensemble.json``) as the search wrote it, before another choice is trained there."""
    if (run_dir / CONFIG_FILE).is_file() or (run_dir / ENSEMBLE_FILE).is_file():
        shutil.rmtree(run_dir)


def write_ensemble(folder: Path, members: Sequence[Path], identity: Mapping[str, Any],
                   results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Score the ensemble of the finished member runs (folders inside `folder`) on their validation cases and
    write the ensemble folder: ``metrics.json`` (the ensemble's), then ``ensemble.json``. `results`: the members'
    metrics; `identity`: the ``run`` entry (experiment, method, fold)."""
    first = read_run_config(members[0])
    cases, postprocessing, bins, unit = score_runs(members, first["datamodule"], first["trainer"])
    costs = [r["cost"] for r in results]
    metrics = {
        "format": METRICS_FORMAT, "run": {**identity, "tuning": "ensemble"},
        "val": summarize(cases, bins), "postprocessing": postprocessing,
        "volume_bins_ml": list(bins), "size_unit": unit, "volume_bins": bin_labels(bins, unit),
        "cost": {"trainable_params": sum(int(c["trainable_params"]) for c in costs),
                 **{k: sum(float(c.get(k) or 0.0) for c in costs) for k in ("train_time_s", "train_steps")}},
        "ensemble": [m.name for m in members], "cases": cases, "base_cases": None,
    }
    write_json(folder / ENSEMBLE_FILE, {"format": ENSEMBLE_FORMAT, "members": [m.name for m in members]})
    write_metrics(folder, metrics)  # last: the folder holds a finished ensemble from here on
    return metrics
