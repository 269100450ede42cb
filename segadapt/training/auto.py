"""``segadapt auto``: the adaptation (method, rank, placement, learning rate) chosen by nested inner validation.

For each outer fold k of the experiment's k-fold split:

1. the fold's *training* patients only are written as a dataset of their own
   (``<runs>/<experiment>/auto/fold<k>/data/``: dataset.json + a two-fold splits file): its fold 0 holds out
   ``auto.inner_fraction`` of the patients as the **inner split** (:func:`segadapt.data.splits.inner_split`);
   the fold's validation cases are not in it, so no trial can load them; with ``data.max_train_cases=N`` (a point
   of a learning curve) only the patients a fixed run of that fold sees (its N training cases and its model
   selection's inner cases) are in it;
2. an Optuna study (TPE sampler, median or Hyperband pruner) runs trials; each trial is an ordinary run
   (:func:`segadapt.training.jobs.train`, folder ``auto/fold<k>/trial<NNN>/``) of the sampled configuration on
   that dataset, with its own model selection on a split carved from its training cases; the pruner sees the
   Dice of each selection checkpoint (``selection.every_n_steps``), the trial's score is its selected network's
   Dice on the inner split, which neither trained nor selected it;
3. the configuration chosen (``auto.rule``: one standard error, or the best) is trained once as an ordinary run
   of the outer fold (``<runs>/<experiment>/<model>/auto/fold<k>/``, method ``auto``) and scored on the fold's
   validation cases: ``segadapt report`` shows it beside the fixed methods. When the top trials' ensemble beats
   that choice on the inner split by more than its standard error (:mod:`segadapt.training.auto_ensemble`), the
   ensemble is trained and scored instead: its members as ordinary runs inside that folder, with ``ensemble.json``.

The studies live in ``auto/study.journal`` (Optuna's JournalStorage), one study per fold. The same command after
a kill or Ctrl-C goes on: finished trials stay, the interrupted one is run again with its parameters (its run
folder resumes from ``last.ckpt``), the budget counts the finished trials. ``auto.json`` in the experiment
folder records every trial, the choice and the outer Dice per fold (rewritten after each trial). Several
processes may work on one search (``--workers N``, or the same command in another shell or Slurm job):
:mod:`segadapt.training.auto_workers`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import optuna
from filelock import FileLock
from lightning.pytorch.trainer.states import TrainerFn

from segadapt.data import load_dataset_json
from segadapt.io import write_json
from segadapt.data.splits import fold_cases, inner_split, load_or_create_splits, training_and_inner
from segadapt.data.dataset_json import write_dataset_json
from segadapt.adapters import norm_layers
from segadapt.errors import exits_on_user_error, one_line
from segadapt.models import head_modules, preset_targets
from segadapt.models.presets import target_presets
from segadapt.parsers import auto_parser

from .auto_ensemble import ensemble_candidates, inner_comparison, remove_final, write_ensemble
from .auto_space import (apply_choice, check_placements, check_space, describe_space, draw, fit_norms, load_space,
                         trial_sampler)
from .auto_study import AUTO_FILE, choose, describe, fold_entry
from .auto_workers import (STUDY_FILE, base_lock, deadline, finishes_fold, fold_lock, next_trial, open_storage,
                           run_and_tell, run_workers, study_names)
from .callbacks import standard_error
from .datamodule import SegDataModule
from .module import SegAdaptModule
from segadapt.plan.apply import apply_plan, run_plan
from segadapt.runs import METRICS_FILE, read_metrics

from .config import TrainConfig, configure_threads, datamodule_args, module_args
from .jobs import ensure_base, prepare_dataset, train

INNER_SPLITS = "splits_inner.json"
TRIAL_ERRORS = (ValueError, RuntimeError)  # a configuration that cannot run (e.g. a rank a layer cannot hold)
OWN_KEYS = ("fold=", "adapter=", "adapter.", "run_dir=", "ckpt_path=", "overwrite=")  # what a search sets per run


class InnerDiceReport(pl.Callback):
    """Reports the Dice of each selection checkpoint to the Optuna trial at its global step and stops the
    run (``trainer.should_stop``) when the pruner says so. Written here rather than taken from
    optuna-integration, whose Lightning callback reports per epoch and raises inside the fit loop: here the
    run ends as an ordinary run (its selected network scored, its folder complete) and the trial is pruned after."""

    def __init__(self, trial: optuna.Trial, monitor: str = "val/dice") -> None:
        self.trial, self.monitor, self.pruned_at = trial, monitor, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if not math.isfinite(score):
            return
        self.trial.report(score, trainer.global_step)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = trainer.global_step
            trainer.should_stop = True


def compose(config_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved ``train.yaml`` config of `overrides`, as ``scripts/train.py`` composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        return OmegaConf.to_container(hydra_compose("train", overrides=list(overrides)), resolve=True)


class Search:
    """One ``segadapt auto`` command: checks everything before the first write, then :meth:`run`."""

    def __init__(self, config_dir: str | Path, overrides: Sequence[str], space_overrides: Sequence[str] = (),
                 space_file: Optional[str | Path] = None, trials: Optional[int] = None,
                 timeout: Optional[float] = None, folds: Optional[Sequence[int]] = None) -> None:
        self.config_dir = Path(config_dir)
        if not (self.config_dir / "train.yaml").is_file():
            raise FileNotFoundError(f"no train.yaml in {self.config_dir} (give --config-dir, the repository's configs/)")
        if trials is None and timeout is None:
            raise ValueError("give a budget: --trials N (per fold) and/or --timeout SECONDS (per fold)")
        if (trials is not None and trials < 1) or (timeout is not None and not timeout > 0):
            raise ValueError(f"the budget must be positive: --trials {trials}, --timeout {timeout}")
        self.trials, self.timeout = trials, timeout
        self.space = load_space(space_file or self.config_dir / "auto.yaml", space_overrides)
        check_space(self.space, self.config_dir / "adapter")
        chosen_here = [o for o in overrides if o.lstrip("+~").startswith(OWN_KEYS)]
        if chosen_here:
            raise ValueError(f"{chosen_here[0]}: segadapt auto sets the fold, the adapter and the run folders "
                             "itself (--folds; auto.methods=[...])")
        self.overrides = list(overrides)
        cfg = compose(self.config_dir, self.overrides)
        TrainConfig.from_cfg(cfg)  # the types of the run settings, as scripts/train.py checks them
        n_folds = int(cfg["data"]["n_folds"])
        self.folds = list(range(n_folds)) if folds is None else [int(f) for f in folds]
        bad = [f for f in self.folds if not 0 <= f < n_folds]
        if bad or len(set(self.folds)) != len(self.folds):
            raise ValueError(f"--folds {self.folds}: folds of data.n_folds={n_folds} are 0..{n_folds - 1}, each once")
        configure_threads(cfg["trainer"].get("threads"))
        self.dataset = prepare_dataset(cfg["data"])  # the phantom is written here when it is the data
        self.cfg = apply_plan(cfg, run_plan(cfg, pretraining=False, prepare=prepare_dataset))
        self.description = load_dataset_json(self.dataset)
        if any(isinstance(c.image, tuple) for c in self.description.cases):
            raise ValueError(f"{self.dataset}: segadapt auto does not yet take datasets with one file per channel")
        self.auto_dir = Path(cfg["paths"]["runs"]).resolve() / cfg["experiment"] / "auto"
        self.record_path = self.auto_dir.parent / AUTO_FILE
        self._net = self._network()
        check_placements(self.space, list(target_presets(self._net)), cfg["model"]["name"])
        self.space, note = fit_norms(self.space, bool(norm_layers(self._net)), cfg["model"]["name"])
        print(f"auto: search space: {describe_space(self.space)}{note}", flush=True)
        self._methods: dict[str, dict] = {}
        self.command = ["segadapt", "auto", *sys.argv[2:]]  # main() sets the argv it was given
        self.studies: dict[int, optuna.Study] = {}
        self.held = ExitStack()  # the final-run claim of the fold this process finishes
        self.storage: Optional[optuna.storages.BaseStorage] = None  # opened by the first write

    # ---- configurations ---------------------------------------------------------------------------
    def _network(self) -> Any:
        """The plain planned network (no base weights): its presets and module names."""
        in_channels = SegDataModule(str(self.dataset), preprocess=dict(self.cfg["data"]["preprocess"])).in_channels
        args = module_args(self.cfg, self.cfg["data"], in_channels, None, {"spec": "scratch", "lr": 0.0})
        return SegAdaptModule(**args).net

    def module_names(self, name: str) -> list[str]:
        return head_modules(self._net) if name == "head" else preset_targets(self._net, name)

    def method_config(self, method: str) -> dict[str, Any]:
        """The run config of `method` with the planned network and preprocessing of the search."""
        if method not in self._methods:
            cfg = compose(self.config_dir, [*self.overrides, f"adapter={method}"])
            cfg["model"]["kwargs"] = self.cfg["model"]["kwargs"]
            cfg["data"]["preprocess"], cfg["data"]["batch_size"] = self.cfg["data"]["preprocess"], self.cfg["data"]["batch_size"]
            self._methods[method] = cfg
        return self._methods[method]

    def run_config(self, choice: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
        cfg = apply_choice(self.method_config(choice["method"]), choice, self.space, self.module_names)
        cfg.update(changes)
        return cfg

    def trial_config(self, fold: int, choice: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
        """A trial: an ordinary run on the fold's training patients (:meth:`write_fold_data`), fold 0 of that
        dataset being the inner split."""
        cfg = self.run_config(choice, fold=0, run_dir=str(run_dir), eval_base=False, overwrite=False, ckpt_path=None)
        data_dir = self.auto_dir / f"fold{fold}" / "data"
        cfg["data"] = {**cfg["data"], "dataset_json": str(data_dir / "dataset.json"),
                       "splits_path": str(data_dir / INNER_SPLITS), "n_folds": 2, "max_train_cases": None}
        cfg["trainer"] = {**cfg["trainer"], "enable_progress_bar": False}
        return cfg

    def final_config(self, fold: int, choice: Mapping[str, Any], overwrite: bool,
                     run_dir: Optional[Path] = None) -> dict[str, Any]:
        """The chosen configuration as an ordinary run of outer fold `fold` (method folder ``auto``; `run_dir`: an
        ensemble member's folder instead)."""
        run_dir = run_dir or self.auto_dir.parent / self.cfg["model"]["name"] / "auto" / f"fold{fold}"
        cfg = self.run_config(choice, fold=fold, run_dir=str(run_dir), overwrite=overwrite, ckpt_path=None)
        cfg["adapter"] = {**cfg["adapter"], "name": "auto"}
        return cfg

    # ---- data of a fold ---------------------------------------------------------------------------
    def fold_cases(self, fold: int) -> dict[str, list[str]]:
        """Case ids of outer fold `fold`: its validation cases, and its training cases split into the trials'
        training cases and the inner split."""
        data = self.cfg["data"]
        splits = load_or_create_splits(self.description, int(data["n_folds"]), int(data["split_seed"]),
                                       data.get("splits_path"))
        train_cases, val_cases = fold_cases(self.description, splits, fold)
        seed = int(data["split_seed"])
        if data.get("max_train_cases") is not None:  # a learning-curve point: only the patients a fixed run sees
            selection = datamodule_args(self.cfg, data, self.dataset, fold)["inner_fraction"]
            seen = {c.case_id for part in training_and_inner(train_cases, selection, data["max_train_cases"], seed, fold)
                    for c in part}
            train_cases = [c for c in train_cases if c.case_id in seen]
        rest, inner = inner_split(train_cases, float(self.space["inner_fraction"]), seed, fold)
        return {"outer_val": [c.case_id for c in val_cases], "trial_train": [c.case_id for c in rest],
                "inner": [c.case_id for c in inner]}

    def write_fold_data(self, fold: int, cases: Mapping[str, list[str]]) -> None:
        """The trials' dataset of `fold`: its training patients only; fold 0 of its splits file = the inner split."""
        data_dir = self.auto_dir / f"fold{fold}" / "data"
        keep = set(cases["trial_train"]) | set(cases["inner"])
        entries = [{"image": c.image, "label": c.label, "case_id": c.case_id, "patient_id": c.patient_id}
                   for c in self.description.cases if c.case_id in keep]
        write_dataset_json(data_dir / "dataset.json", self.description.name, entries, self.description.labels,
                           self.description.modality)
        write_json(data_dir / INNER_SPLITS, [{"train": cases["trial_train"], "val": cases["inner"]},
                                             {"train": cases["inner"], "val": cases["trial_train"]}])

    # ---- the search -------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What a resumed study must share with the one it continues (the budget may change)."""
        return {"overrides": self.overrides, "space": self.space}

    def study(self, fold: int, cases: Mapping[str, list[str]]) -> optuna.Study:
        pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=int(self.space["startup_trials"])),
                  "hyperband": optuna.pruners.HyperbandPruner(),
                  "none": optuna.pruners.NopPruner()}[self.space["pruner"]]
        study = optuna.create_study(storage=self.storage, study_name=f"fold{fold}", direction="maximize",
                                    sampler=trial_sampler(self.space, fold, 0), pruner=pruner, load_if_exists=True)
        for key, value in (("settings", self.settings()), ("cases", dict(cases))):
            stored = study.user_attrs.get(key)
            if stored is None:
                study.set_user_attr(key, value)
            elif stored != value:
                raise ValueError(f"{self.auto_dir / STUDY_FILE}: fold {fold}'s study was made with other {key} "
                                 f"({_difference(stored, value)}); run it with its own, or delete {self.auto_dir} to "
                                 "start anew")
        return study

    def run(self) -> dict[str, Any]:
        """Search every fold, train and score each choice; returns the record written as ``auto.json``."""
        orphans = [] if (self.auto_dir / STUDY_FILE).is_file() else sorted(self.auto_dir.glob("fold*/trial[0-9]*"))
        if orphans:
            raise FileExistsError(f"{orphans[0]}: trial folders of a search whose study ({self.auto_dir / STUDY_FILE}) "
                                  f"is gone; delete {self.auto_dir} to start anew")
        self.auto_dir.mkdir(parents=True, exist_ok=True)
        self.storage = open_storage(self.auto_dir)
        with base_lock(self.auto_dir):
            ensure_base(TrainConfig.from_cfg(self.cfg))
        try:
            for fold in self.folds:
                self.search_fold(fold)
        finally:
            self.held.close()
            record = self.write_record() if self.studies else None
        return record

    def write_record(self) -> dict[str, Any]:
        """``auto.json`` from a fresh read of the storage, written atomically under a lock (the last of several
        workers to write leaves the newest record)."""
        self.storage = self.storage or open_storage(self.auto_dir)
        with FileLock(self.auto_dir / ".record.lock"):
            record = self.record()
            write_json(self.record_path, record)
        return record

    def search_fold(self, fold: int) -> None:
        self.held.close()  # the final-run claim of the previous fold, held until its final run was written
        study = self.studies[fold] = self.run_trials(fold)
        if not finishes_fold(study, fold, self.auto_dir / f"fold{fold}", self.held):
            return
        chosen = choose(study.get_trials(deepcopy=False), self.space["rule"], fold)
        members = self.ensemble_choice(fold, study, chosen)
        final = study.user_attrs.get("final") or {}
        numbers = [t.number for t in members]
        same = final.get("trial") == chosen.number and final.get("members", []) == numbers
        run_dir = self.auto_dir.parent / self.cfg["model"]["name"] / "auto" / f"fold{fold}"
        if not same:
            remove_final(run_dir)  # the folder of an earlier choice (a run or an ensemble) goes as a whole
        study.set_user_attr("final", {"trial": chosen.number, "members": numbers, "run_dir": str(run_dir)})
        if (run_dir / METRICS_FILE).is_file():
            result = read_metrics(run_dir)
        elif members:
            result = self.train_ensemble(fold, members, run_dir)
        else:
            result = train(self.final_config(fold, chosen.user_attrs["choice"], overwrite=False))
        val = result["val"]
        study.set_user_attr("final", {"trial": chosen.number, "members": numbers, "run_dir": str(run_dir),
                                      "dice": val["dice"], "dice_sd": val["dice_sd"], "n_cases": val["n_cases"],
                                      "cases": [c["case_id"] for c in result["cases"]]})
        what = (f"an ensemble of trials {', '.join(map(str, numbers))} (inner Dice "
                f"{study.user_attrs['ensemble']['inner_dice']:.3f})" if members else
                f"trial {chosen.number} ({describe(chosen.user_attrs['choice'])}, inner Dice {chosen.value:.3f})")
        print(f"auto fold {fold}: chose {what}; outer-fold Dice {val['dice']:.3f} -> {run_dir}", flush=True)

    def ensemble_choice(self, fold: int, study: optuna.Study, chosen: optuna.trial.FrozenTrial) -> list:
        """The member trials of the fold's ensemble when it beats the single `chosen` trial on the inner split
        (:func:`~segadapt.training.auto_ensemble.prefer_ensemble`), else []; the comparison is kept in the study
        (``ensemble``, in auto.json) and reused by a resumed search with the same trials."""
        candidates = ensemble_candidates(study.get_trials(deepcopy=False), int(self.space["ensemble"]))
        if not candidates:
            study.set_user_attr("ensemble", None)
            return []
        stored, rule = study.user_attrs.get("ensemble") or {}, self.space["ensemble_rule"]
        numbers = [t.number for t in candidates]
        reusable = (stored.get("members") == numbers and (stored.get("single") or {}).get("trial") == chosen.number
                    and stored.get("rule") == rule and "difference_se" in stored)  # (not an unpaired, older one)
        if not reusable:
            stored = inner_comparison(candidates, chosen, rule)
            study.set_user_attr("ensemble", stored)
            print(f"auto fold {fold}: ensemble of trials {', '.join(map(str, numbers))}: inner Dice "
                  f"{stored['inner_dice']:.3f} vs {chosen.value:.3f} of trial {chosen.number}, difference "
                  f"{stored['difference']:+.3f} +- {stored['difference_se']:.3f} (paired by case) -> "
                  f"{'ensemble' if stored['chosen'] else 'single'}", flush=True)
        return candidates if stored["chosen"] else []

    def train_ensemble(self, fold: int, members: Sequence[optuna.trial.FrozenTrial], run_dir: Path) -> dict[str, Any]:
        """Each member configuration trained on outer fold `fold` (``<run_dir>/trial<NNN>/``, ordinary run folders),
        then the ensemble scored on the fold's validation cases and written as an ensemble folder."""
        folders, results = [], []
        for trial in members:
            cfg = self.final_config(fold, trial.user_attrs["choice"], overwrite=False,
                                    run_dir=run_dir / f"trial{trial.number:03d}")
            folders.append(Path(cfg["run_dir"]))
            done = (folders[-1] / METRICS_FILE).is_file()
            results.append(read_metrics(folders[-1]) if done else train(cfg))
        identity = {k: v for k, v in results[0]["run"].items() if k not in ("tuning", "seed")}
        return write_ensemble(run_dir, folders, identity, results)

    def run_trials(self, fold: int) -> optuna.Study:
        """Claim and run trials of `fold` until its budget is spent (counted from the storage, trials of every
        worker included; :mod:`~segadapt.training.auto_workers`); returns the fold's study."""
        cases, fold_dir = self.fold_cases(fold), self.auto_dir / f"fold{fold}"
        with fold_lock(fold_dir):
            study = self.study(fold, cases)
            self.write_fold_data(fold, cases)
            until = deadline(study, self.timeout)
        while True:
            with ExitStack() as claim:
                trial = next_trial(study, fold_dir, self.trials, until, claim)
                if trial is None:
                    return study
                run_and_tell(study, trial, lambda t: self.objective(fold, t), TRIAL_ERRORS)
            self.write_record()

    def objective(self, fold: int, trial: optuna.Trial) -> float:
        choice = draw(trial, self.space, fold)
        run_dir = Path(trial.user_attrs.get("run_dir") or self.auto_dir / f"fold{fold}" / f"trial{trial.number:03d}")
        cfg = self.trial_config(fold, choice, run_dir)
        for key, value in (("choice", choice), ("run_dir", str(run_dir)),
                           ("adapter", {k: cfg["adapter"].get(k) for k in ("name", "spec", "preset", "lr")})):
            trial.set_user_attr(key, value)
        reporter = InnerDiceReport(trial)
        started = time.perf_counter()
        try:
            result = train(cfg, callbacks=[reporter])
        except TRIAL_ERRORS as error:
            trial.set_user_attr("error", one_line(error))
            print(f"auto fold {fold} trial {trial.number} ({describe(choice)}) failed: {one_line(error)}", flush=True)
            raise
        finally:
            trial.set_user_attr("time_s", time.perf_counter() - started)
        val, selection = result["val"], result.get("selection") or {}
        trial.set_user_attr("inner_dice", val["dice"])  # a pruned trial's too (Optuna's value is its last report)
        trial.set_user_attr("se", standard_error(val["dice_sd"], val["n_cases"]))
        trial.set_user_attr("trainable_params", int(result["cost"]["trainable_params"]))
        trial.set_user_attr("train_steps_s", (result.get("timing") or {}).get("train_steps_s"))
        trial.set_user_attr("curve", [{"step": c["step"], "dice": c["dice"]} for c in selection.get("curve") or []])
        trial.set_user_attr("cases", {"inner": [c["case_id"] for c in result["cases"]],
                                      "selection": list(selection.get("inner_cases") or [])})
        pruned = "" if reporter.pruned_at is None else f", pruned at step {reporter.pruned_at}"
        print(f"auto fold {fold} trial {trial.number}: {describe(choice)} -> inner Dice {val['dice']:.3f}"
              f"{pruned} ({time.perf_counter() - started:.0f} s)", flush=True)
        if reporter.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {reporter.pruned_at}")
        return float(val["dice"])

    # ---- the record -------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        folds = [fold_entry(optuna.load_study(study_name=name, storage=self.storage))  # every worker's and every
                 for name in sorted(study_names(self.storage), key=lambda n: int(n[4:]))  # command's folds, read now
                 if name.startswith("fold") and name[4:].isdigit()]
        finished = [t for f in folds for t in f["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
        trials_done = len(finished)
        trial_s = sum(t["time_s"] or 0.0 for t in finished)
        steps_s = sum(t["train_steps_s"] or 0.0 for t in finished)
        outer = [f["outer"]["dice"] for f in folds if f["outer"]]
        return {
            "format": "segadapt-auto/1", "experiment": self.cfg["experiment"], "command": self.command,
            "settings": self.settings(), "budget": {"trials": self.trials, "timeout_s": self.timeout},
            "storage": str(self.auto_dir / STUDY_FILE), "folds": folds,
            "summary": {"outer_dice_mean": sum(outer) / len(outer) if outer else None,
                        "finished_trials": trials_done,
                        "trials_per_hour": 3600.0 * trials_done / trial_s if trial_s else None,
                        "training_step_share": steps_s / trial_s if trial_s else None},
        }


def _difference(stored: Any, new: Any) -> str:
    if isinstance(stored, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(stored) | set(new) if stored.get(k) != new.get(k))
        return f"{keys[0]}: {stored.get(keys[0])!r} -> {new.get(keys[0])!r}" if keys else "?"
    return f"{stored!r} -> {new!r}"


@exits_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """``segadapt auto [OVERRIDE ...] --trials N``: see the module docstring."""
    argv = list(sys.argv[2:] if argv is None else argv)
    args = auto_parser().parse_intermixed_args(argv)  # options and KEY=VALUE in any order
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give 1 or more worker processes")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = [o[len("auto."):] for o in args.overrides if o.startswith("auto.")]
    search = Search(args.config_dir, [o for o in args.overrides if not o.startswith("auto.")], space, args.space,
                    args.trials, args.timeout, args.folds)
    search.command = ["segadapt", "auto", *argv]
    if args.workers > 1:  # each worker runs the command with --workers 1
        run_workers(argv, args.workers)
        record = search.write_record()
    else:
        record = search.run()
    summary = record["summary"]
    rate = summary["trials_per_hour"]
    print(f"auto: {summary['finished_trials']} trials"
          + ("" if rate is None else f" ({rate:.0f} per hour of trial time)")
          + ("" if summary["outer_dice_mean"] is None else f", outer-fold Dice {summary['outer_dice_mean']:.3f}")
          + f" -> {search.record_path}", flush=True)
    return record
