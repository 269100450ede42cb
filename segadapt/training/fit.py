"""Train and validate one planned run (:class:`~segadapt.training.config.RunConfig`) into its run folder.

:func:`fit_run` writes nothing before the run is known to be sound (:func:`segadapt.runs.check_run_folder`;
every case read and checked, the network built); ``logs/metrics.csv`` keeps the steps before a resume
(:class:`KeepLogHistory`). The folder's files: :mod:`segadapt.runs`.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import pickle
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from segadapt.adapters import capped_ranks
from segadapt.data import PreprocessConfig
from segadapt.io import atomic_path, write_json
from segadapt.plan.apply import PLAN_FILE
from segadapt.plan.fingerprint import cache_fingerprint, fingerprint, load_or_make_fingerprint
from segadapt.runs import (ADAPTER_FILE, CHECKPOINT_FILE, CONFIG_FILE, FINGERPRINT_FILE, LOG_FILE, METRICS_FILE,
                           METRICS_FORMAT, WEIGHTS_FILE, check_not_in_use, check_run_folder, run_folder_lock,
                           settings_digest, unsafe_checkpoint, write_metrics, write_yaml)

from .callbacks import (TRAIN_STATS_KEYS, ExportWeights, LongerSchedule, PhaseTimes, RunSettings, SelectBest,
                        TrainStats, export_weights, progress_callbacks, standard_error)
from .config import RunConfig
from .datamodule import SegDataModule
from .metrics import bin_labels, summarize
from .module import SegAdaptModule
from .postprocessing import choose_postprocessing
from .sweep import BASE_SCORES, base_key
from .timing import LoopProfiler, RunClock

log = logging.getLogger(__name__)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


class KeepLogHistory(pl.Callback):
    """Keeps the rows of ``logs/metrics.csv`` from before a resume: Lightning's CSVLogger deletes the file
    when it starts. The rows are written back at once, and at the start of training those of steps at or
    after the resumed step (logged after the checkpoint was saved) are dropped."""

    def __init__(self, logger: CSVLogger) -> None:
        fields, rows = _read_csv(Path(logger.log_dir) / "metrics.csv")  # before the logger starts and deletes it
        self.writer = logger.experiment
        self.path = Path(self.writer.metrics_file_path)
        if fields:
            _write_csv(self.path, fields, rows)
            self.writer.metrics_keys = sorted(set(self.writer.metrics_keys) | set(fields))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fields, rows = _read_csv(self.path)
        if not fields:
            return
        kept = [r for r in rows if not r.get("step") or float(r["step"]) < trainer.global_step]
        fields = sorted(set(fields) | set(self.writer.metrics_keys))
        _write_csv(self.path, fields, kept)
        self.writer.metrics_keys = fields


def make_trainer(run_dir: Path, args: Mapping[str, Any], checkpoint_every: Optional[int],
                 resume: bool = False) -> pl.Trainer:
    """A Trainer writing into `run_dir`: last.ckpt every `checkpoint_every` steps, CSV (+ TensorBoard) logs
    (``resume``: logs/metrics.csv keeps the rows of the steps before the checkpoint)."""
    csv_logger = CSVLogger(run_dir, name="logs", version="")
    loggers: list = [csv_logger]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(run_dir, name="logs", version=""))
    callbacks = [
        ModelCheckpoint(dirpath=run_dir, save_top_k=0, save_last=True, every_n_train_steps=checkpoint_every,
                        enable_version_counter=False),
        TrainStats(),
        PhaseTimes(),
        ExportWeights(str(run_dir)),
        *progress_callbacks(args),
    ]
    if resume and rank_zero_only.rank == 0:
        callbacks.append(KeepLogHistory(csv_logger))
    return pl.Trainer(default_root_dir=run_dir, logger=loggers, callbacks=callbacks,
                      **{"profiler": LoopProfiler(), **args})  # LoopProfiler: the phases of metrics.json's timing


def _stats(trainer: pl.Trainer) -> dict[str, Any]:
    return next(c.stats for c in trainer.callbacks if isinstance(c, TrainStats))


def _phase_times(trainer: pl.Trainer) -> PhaseTimes:
    return next(c for c in trainer.callbacks if isinstance(c, PhaseTimes))


# lightning.Trainer arguments that decide how the base is evaluated (device, precision), not how a run trains
_EVALUATION_TRAINER_KEYS = ("accelerator", "devices", "precision", "deterministic", "inference_mode")


def _base_scores(trainer: pl.Trainer, module_kwargs: Mapping[str, Any], datamodule: SegDataModule,
                 datamodule_kwargs: Mapping[str, Any], trainer_kwargs: Mapping[str, Any], val: bool,
                 inner: bool) -> tuple[Optional[list[dict]], Optional[float], float]:
    """(case rows on the fold's validation cases, inner-split Dice, seconds spent) of the unadapted base.

    Scored on the plain base network (built under a forked RNG, so the run's own initialisation is
    unchanged) by a Trainer without loggers, and kept in :data:`~segadapt.training.sweep.BASE_SCORES`: the
    next method on the same fold in this process reuses them. Under DDP the run's own trainer scores them
    (one process per run there, nothing to share)."""
    start = time.perf_counter()
    base: list[SegAdaptModule] = []

    def network() -> SegAdaptModule:
        if not base:
            with torch.random.fork_rng(devices=[]):
                base.append(SegAdaptModule(**{**module_kwargs, "adapter": "none"}))
        return base[0]

    distributed = trainer.world_size > 1
    scorers: list[pl.Trainer] = [trainer] if distributed else []

    def scorer() -> pl.Trainer:  # built on the first miss only
        if not scorers:
            scorers.append(pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                      enable_model_summary=False,
                                      **{k: v for k, v in trainer_kwargs.items() if k in _EVALUATION_TRAINER_KEYS}))
        return scorers[0]

    def scored(kind: str, score: Callable[[], Any]) -> Any:
        key = None if distributed else base_key(module_kwargs, datamodule_kwargs, torch.get_num_threads(), kind)
        return score() if key is None else BASE_SCORES.get_or_build(key, score)

    def validated() -> list[dict]:
        scorer().validate(network(), datamodule=datamodule, verbose=False)
        return network().case_rows

    cases = scored("val", validated) if val else None
    inner_dice = scored("inner", lambda: _inner_dice(scorer(), network(), datamodule)[0]) if inner else None
    return cases, inner_dice, 0.0 if distributed else time.perf_counter() - start  # DDP: in PhaseTimes


def _data_fingerprint(datamodule_kwargs: Mapping[str, Any], cache_dir: Optional[str | os.PathLike],
                      write: bool = True) -> dict:
    """The fingerprint of the run's dataset on the grid its preprocessing reads (orientation, dimensions);
    `write=False`: not cached yet (:func:`_cache_data_fingerprint`)."""
    preprocess = PreprocessConfig.from_dict(dict(datamodule_kwargs.get("preprocess") or {}))
    where = (datamodule_kwargs["dataset_json"], preprocess.orientation, preprocess.spatial_dims)
    if cache_dir is None:
        return fingerprint(where[0], orientation=where[1], spatial_dims=where[2])
    return load_or_make_fingerprint(where[0], cache_dir, *where[1:], write=write)


def _cache_data_fingerprint(fp: dict, datamodule_kwargs: Mapping[str, Any],
                            cache_dir: Optional[str | os.PathLike]) -> None:
    if cache_dir is not None:
        preprocess = PreprocessConfig.from_dict(dict(datamodule_kwargs.get("preprocess") or {}))
        cache_fingerprint(fp, cache_dir, preprocess.orientation, preprocess.spatial_dims)


def fit_run(run: RunConfig, ckpt_path: Optional[str] = None, callbacks: Optional[list[pl.Callback]] = None,
            started: Optional[float] = None) -> dict[str, Any]:
    """Train (unless the tuning is 'none') and validate one planned run; write its folder; return ``metrics.json``'s dict.

    Nothing is written before the run is known to be sound: the folder is checked
    (:func:`~segadapt.runs.check_run_folder`), every case read and checked, the network built.

    Model selection runs when the data module has an inner split (``inner_fraction`` > 0): the validations
    while fitting score the inner cases (:class:`SelectBest` keeps the best state), the last step is scored
    there too, and the fold's validation cases are scored for the last (``val_last``) and the selected
    network (``val``, the one saved).

    Args:
        run: the planned run (its folder, settings and options: :class:`~segadapt.training.config.RunConfig`).
        ckpt_path: ``'last'`` (or a path) resumes training from that Lightning checkpoint.
        callbacks: extra Lightning callbacks.
        started: ``time.perf_counter()`` at which the run's setup began (default: now); metrics.json's
            ``timing`` splits the time since into the phases of :mod:`segadapt.training.timing`.

    The unadapted base's scores (``base_val``, ``base_inner_dice``) are those of the plain base network,
    shared by the runs of one process (:func:`_base_scores`).
    """
    clock = RunClock(started)
    clock.lap("startup_s")
    run_dir, tuning, overwrite = run.run_dir, run.tuning, run.overwrite
    module_kwargs, datamodule_kwargs, trainer_kwargs = run.module, run.datamodule, run.trainer
    identity, seed, fingerprint_cache = run.identity, run.seed, run.fingerprint_cache
    record = run.record()
    main_process = rank_zero_only.rank == 0  # under DDP every rank runs this function; one writes the files
    if main_process:
        check_not_in_use(run_dir)
        check_run_folder(run_dir, record, ckpt_path, overwrite)
    # before the split file is written (a dataset no network can be planned for is refused); cached below
    data_fingerprint = _data_fingerprint(datamodule_kwargs, fingerprint_cache, write=False) if main_process else None
    datamodule = SegDataModule(**datamodule_kwargs)
    datamodule.setup("fit")  # reads and checks the cases (memory cache: every case) before the folder is touched
    pl.seed_everything(seed, workers=True, verbose=False)  # the seed is in config.yaml
    module = SegAdaptModule(**module_kwargs)
    with run_folder_lock(run_dir) if main_process else nullcontext():  # until metrics.json is written
        if main_process:  # again, under the lock: another training may have finished here since the check
            check_run_folder(run_dir, record, ckpt_path, overwrite)
            _cache_data_fingerprint(data_fingerprint, datamodule_kwargs, fingerprint_cache)
            if ckpt_path is None:  # a fresh run: no results of an earlier run may outlive a crash of this one
                for stale in (METRICS_FILE, ADAPTER_FILE, WEIGHTS_FILE, CHECKPOINT_FILE, LOG_FILE):
                    (run_dir / stale).unlink(missing_ok=True)
            else:  # a resume rewrites the weights: until its metrics.json, the folder is an unfinished run
                (run_dir / METRICS_FILE).unlink(missing_ok=True)
            write_yaml(run_dir / CONFIG_FILE, record)
            if run.plan is not None:
                run.plan.to_json(run_dir / PLAN_FILE)
            write_json(run_dir / FINGERPRINT_FILE, data_fingerprint)
        trainer = make_trainer(run_dir, trainer_kwargs, run.checkpoint_every, resume=ckpt_path is not None)
        longer = LongerSchedule()
        for callback in [RunSettings(settings_digest(record)), longer, *(callbacks or [])]:
            trainer.callbacks.append(callback)
        selector, stopper = None, None
        if tuning != "none" and datamodule_kwargs.get("inner_fraction"):
            selector = SelectBest()
            trainer.callbacks.append(selector)
            if run.patience is not None:
                stopper = EarlyStopping(monitor="val/dice", mode="max", patience=int(run.patience))
                trainer.callbacks.append(stopper)

        phases = _phase_times(trainer)
        clock.lap("setup_s")
        base_cases, base_inner_dice, _ = _base_scores(
            trainer, module_kwargs, datamodule, datamodule_kwargs, trainer_kwargs,
            val=tuning == "none" or (run.eval_base and tuning != "scratch"), inner=selector is not None and tuning != "scratch")
        clock.lap("base_scores_s")
        if tuning == "none":
            module.case_rows = list(base_cases)
        if tuning != "none":
            validation_before = phases.validation_s  # DDP: the base was scored by this trainer
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # no code runs on load
            except pickle.UnpicklingError as error:  # the checkpoint was replaced since it was checked
                raise unsafe_checkpoint(run_dir / CHECKPOINT_FILE if ckpt_path == "last" else Path(ckpt_path), error) from None
            if trainer.interrupted:
                raise RuntimeError(f"training of {run_dir} was interrupted; resume with ckpt_path=last")
            clock.lap("lightning_s")
            clock.split_fit(phases.train_steps_s, phases.validation_s - validation_before, trainer.profiler)
            trainer.save_checkpoint(run_dir / CHECKPOINT_FILE, weights_only=False)
            clock.lap("checkpoints_s")
            if selector is not None and (not selector.curve or selector.curve[-1]["step"] != trainer.global_step):
                dice, se = _inner_dice(trainer, module, datamodule)
                selector.record(trainer.global_step, dice, module, se)
            trainer.validate(module, datamodule=datamodule, verbose=False)
            clock.lap("validation_s")
        last_cases = module.case_rows
        if selector is not None and selector.best_step not in (None, trainer.global_step):
            selector.restore(module)
            trainer.validate(module, datamodule=datamodule, verbose=False)
            clock.lap("validation_s")
            if main_process:
                export_weights(module, run_dir)  # replaces the last network's file that ExportWeights wrote
            clock.lap("checkpoints_s")
        cases = module.case_rows
        bins = module.bins
        result = {
            "format": METRICS_FORMAT,
            "run": {**identity, "tuning": tuning, "seed": seed},
            "val": summarize(cases, bins),  # the raw prediction's; postprocessing.dice: with the chosen postprocessing
            "postprocessing": choose_postprocessing(module.component_counts),
            "val_last": summarize(last_cases, bins),
            "base_inner_dice": base_inner_dice,
            "selection": None if selector is None else {
                "inner_cases": datamodule.inner_case_ids,
                "curve": selector.curve,
                "selected_step": selector.best_step,
                "selected_dice": selector.best_score,
                "stopped_early": stopper is not None and stopper.wait_count >= stopper.patience,
                "below_base": (None not in (base_inner_dice, selector.best_score)
                               and selector.best_score < base_inner_dice),
            },
            "base_val": None if base_cases is None or tuning == "none" else summarize(base_cases, bins),
            "volume_bins_ml": list(bins),
            "size_unit": datamodule.size_unit,  # of volume_bins_ml and the cases' pred_ml / true_ml
            "volume_bins": bin_labels(bins, datamodule.size_unit),
            "cost": {"trainable_params": module.trainable_params, "threads": torch.get_num_threads(),
                     **(_stats(trainer) if tuning != "none" else {})},
            "capped_ranks": capped_ranks(module.net),  # cap_rank: {layer: [asked, used]} of the layers it lowered
            "global_step": trainer.global_step,
            "extended_from_steps": longer.extended_from,  # a resume with more steps: the max_steps it had
            "cases": cases,
            "last_cases": last_cases,
            "base_cases": None if tuning == "none" else base_cases,
        }
        clock.lap("results_s")
        result["timing"] = clock.as_dict()  # seconds of this session (a resumed run: of the resumed part)
        missing = [k for k in TRAIN_STATS_KEYS if tuning != "none" and k not in result["cost"]]
        if missing:  # no metrics.json with holes (a resume whose checkpoint lacks figures must not write one)
            raise RuntimeError(f"{run_dir}: training figures {missing} are missing; {METRICS_FILE} not written")
        if main_process:
            write_metrics(run_dir, result)
        return result


def _inner_dice(trainer: pl.Trainer, module: SegAdaptModule, datamodule: SegDataModule) -> tuple[float, float]:
    """(mean Dice, its standard error) of the module's current network on the inner validation cases."""
    with datamodule.inner_validation():
        trainer.validate(module, datamodule=datamodule, verbose=False)
    summary = summarize(module.case_rows, module.bins)
    return summary["dice"], standard_error(summary["dice_sd"], summary["n_cases"])

