"""The ``train`` and ``pretrain`` jobs: from a composed ``configs/train.yaml`` request to a finished run folder.

A job plans its config (:mod:`segadapt.plan.apply`: every ``auto`` value from one dataset plan), turns it
into the planned run (:func:`~segadapt.training.config.planned_run`), decides what to do with an existing run
folder (:func:`check_request`: resume a killed run, skip a sweep's finished one, refuse the rest) and trains it
(:func:`~segadapt.training.fit.fit_run`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from segadapt.data import load_dataset_json, make_phantom_dataset
from segadapt.plan.apply import apply_plan, run_plan
from segadapt.runs import CHECKPOINT_FILE, METRICS_FILE, SKIP, WEIGHTS_FILE, read_metrics, run_folder_action

from .config import RunConfig, TrainConfig, configure_threads, planned_run
from .fit import fit_run
from .module import check_classes
from .timing import format_timing

log = logging.getLogger(__name__)


@rank_zero_only
def report_summary(text: str) -> None:
    """The end-of-run summary to the console and the job's log: in a Hydra job a log record (Hydra's handlers
    write it to the console and to ``<run_dir>/<job name>.log``, e.g. ``train.log``); elsewhere printed."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        log.info(text)
    else:
        print(text)


def prepare_dataset(data: Mapping[str, Any]) -> Path:
    """Absolute path of ``data.dataset_json``; writes the phantom described by ``data.phantom`` if absent."""
    path = Path(data["dataset_json"])
    if not path.exists():
        phantom = data.get("phantom")
        if not phantom:
            raise FileNotFoundError(f"dataset description not found: {path} (set data.dataset_json)")
        log.info("generating %s phantom cases of domain %r under %s", phantom["n"], phantom["domain"], path.parent)
        written = make_phantom_dataset(path.parent, **phantom)
        if written.resolve() != path.resolve():
            raise ValueError(f"a phantom dataset is written as <folder>/dataset.json, but data.dataset_json is {path}")
    return path.resolve()


def in_sweep() -> bool:
    """Whether this is a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def ensure_base(request: TrainConfig) -> Path:
    """The base checkpoint of a request; pretrains it on its source first when missing and ``pretrain.auto``."""
    base = Path(request.base_checkpoint)
    if base.is_file():
        return base.resolve()
    if not request.pretrain.auto:
        raise FileNotFoundError(f"base checkpoint not found: {base}; run scripts/pretrain.py or set pretrain.auto=true")
    pretrained = Path(request.pretrain.run_dir) / WEIGHTS_FILE
    if base.resolve() != pretrained.resolve():
        raise FileNotFoundError(f"base checkpoint not found: {base}; pretraining (pretrain.auto) would write "
                                f"{pretrained} instead, so it is not started")
    log.info("no base checkpoint at %s: pretraining on %s first", base, request.source["name"])
    pretrain(request)
    return base.resolve()


def _existing_dataset(data: Mapping[str, Any]) -> Path:
    """Absolute path of ``data.dataset_json``, which must exist (a check writes no phantom)."""
    path = Path(data["dataset_json"])
    if not path.is_file():
        raise FileNotFoundError(f"dataset description not found: {path} (set data.dataset_json)")
    return path.resolve()


def _prepare_once() -> Callable[[Mapping[str, Any]], Path]:
    """:func:`prepare_dataset` that prepares each dataset of a job once (the plan and the run share it)."""
    prepared: dict[str, Path] = {}

    def prepare(data: Mapping[str, Any]) -> Path:
        key = str(data["dataset_json"])
        if key not in prepared:
            prepared[key] = prepare_dataset(data)
        return prepared[key]

    return prepare


def check_request(cfg: Mapping[str, Any] | TrainConfig, kind: str = "train", sweep: Optional[bool] = None,
                  run: Optional[RunConfig] = None) -> Optional[str]:
    """Refuse a ``train`` / ``pretrain`` job before it writes anything (data, base, run folder): value types,
    threads, an existing dataset.json, and the run folder (:func:`~segadapt.runs.run_folder_action`: in use,
    finished run, resume). A resume compares the run's config.yaml with the planned run (`run`; None: planned
    here as train / pretrain plan it, :func:`~segadapt.plan.apply.apply_plan`, so `cfg` may hold ``auto``).
    Returns what the job does: :data:`~segadapt.runs.SKIP`, or the checkpoint it resumes from (None: a fresh run).
    `sweep`: the job is part of a ``-m`` sweep (None: ask Hydra, :func:`in_sweep`)."""
    request = TrainConfig.from_cfg(cfg)
    pretraining = kind == "pretrain"
    configure_threads(request.trainer.get("threads"))
    dataset = Path((request.source if pretraining else request.data)["dataset_json"])
    if dataset.is_file():
        check_classes(request.model["kwargs"].get("out_channels", 1), load_dataset_json(dataset))
    ckpt_path = None if pretraining else request.ckpt_path

    def record() -> dict[str, Any]:  # the config.yaml the job would write
        if run is not None:
            return run.record()
        if not dataset.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: dataset description not found: {dataset}")
        raw = request.to_dict()
        planned = apply_plan(raw, run_plan(raw, pretraining=pretraining, prepare=_existing_dataset), show=False,
                             pretraining=pretraining)
        return planned_run(planned, kind, dataset.resolve()).record()

    run_dir = request.pretrain.run_dir if pretraining else request.run_dir
    sweep = in_sweep() if sweep is None else sweep
    return run_folder_action(run_dir, record, ckpt_path, request.overwrite, sweep,
                             check_lock=rank_zero_only.rank == 0)  # DDP: the other ranks start while rank 0 holds it


def _kept_or_resumed(run_dir: str | os.PathLike, action: Optional[str], ckpt_path: Optional[str]) -> Optional[dict]:
    """For :data:`SKIP`, the finished run's metrics (one line says so); for a killed run resumed without
    ``ckpt_path`` one line saying so; None otherwise."""
    if action == SKIP:
        report_summary(f"skipped {run_dir}: a finished run with these settings ({METRICS_FILE}); overwrite=true "
                       "trains it again")
        return read_metrics(run_dir)
    if action is not None and ckpt_path is None:
        report_summary(f"resuming {run_dir} from its {CHECKPOINT_FILE}: it was stopped before it finished "
                       f"(no {METRICS_FILE})")
    return None


def pretrain(cfg: Mapping[str, Any] | TrainConfig) -> dict[str, Any]:
    """Full training of the network from random init on the source dataset (``cfg.source``), holding out
    fold ``pretrain.fold`` for validation; writes ``<pretrain.run_dir>/model.safetensors``, the base."""
    request = TrainConfig.from_cfg(cfg)
    prepare = _prepare_once()
    raw = request.to_dict()  # the plain mapping the plan reads; its `auto` values are filled by apply_plan only
    plan = run_plan(raw, pretraining=True, prepare=prepare)
    planned = apply_plan(raw, plan, pretraining=True)
    run = planned_run(planned, "pretrain", prepare(planned["source"]), plan)
    action = check_request(request, "pretrain", sweep=False, run=run)  # a finished base is kept, never skipped unseen
    kept = _kept_or_resumed(request.pretrain.run_dir, action, None)
    if kept is not None:
        return kept
    result = fit_run(run, ckpt_path=action)
    report_summary(f"pretrained base on {request.source['name']}: source-fold Dice {result['val']['dice']:.3f} "
                   f"-> {Path(request.pretrain.run_dir) / WEIGHTS_FILE}")
    return result


def train(cfg: Mapping[str, Any] | TrainConfig, callbacks: Optional[list[pl.Callback]] = None,
          started: Optional[float] = None) -> dict[str, Any]:
    """One fold of one method from a resolved ``configs/train.yaml`` config (what ``scripts/train.py`` runs);
    `started`: the ``time.perf_counter()`` its setup counts from (default: now)."""
    started = time.perf_counter() if started is None else started
    request = TrainConfig.from_cfg(cfg)
    prepare = _prepare_once()
    raw = request.to_dict()  # the plain mapping the plan reads; its `auto` values are filled by apply_plan only
    plan = run_plan(raw, pretraining=False, prepare=prepare)
    planned = apply_plan(raw, plan)
    run = planned_run(planned, "train", prepare(planned["data"]), plan)
    action = check_request(request, "train", run=run)  # before the base is pretrained or the run folder touched
    kept = _kept_or_resumed(request.run_dir, action, request.ckpt_path)
    if kept is not None:
        return kept
    if run.tuning != "scratch":
        ensure_base(request)
    result = fit_run(run, ckpt_path=action, callbacks=callbacks, started=started)
    report_summary(format_result(result, request.run_dir))
    return result


def format_result(result: Mapping[str, Any], run_dir: str | os.PathLike) -> str:
    """The lines printed at the end of a run: Dice and HD95 of the tuned and the untuned network."""
    run = result["run"]
    val, base, cost = result["val"], result["base_val"], result["cost"]
    length = "px" if result.get("size_unit") == "px" else "mm"  # HD95 of images without a pixel spacing
    lines = [f"\n{run['experiment']} / {run['method']} / fold {run['fold']}: {int(val['n_cases'])} validation volumes"]
    for name, m in (("unadapted base", base), (run["method"], val)):
        if m is not None:
            missed = f" ({int(m['hd95_undefined'])} with an empty mask)" if m["hd95_undefined"] else ""
            lines.append(f"  {name:<15}: Dice {m['dice']:.3f} +- {m['dice_sd']:.3f}   HD95 {m['hd95']:.1f} {length}{missed}"
                         f"   volume r = {m['volume_corr']:.2f}")
    selection = result.get("selection")
    if selection is not None and selection["selected_step"] is not None:
        last = result["val_last"]
        base_inner = result.get("base_inner_dice")
        stop = ", stopped early" if selection["stopped_early"] else ""
        lines.append(f"  model selection: step {selection['selected_step']} of {result['global_step']}{stop}, "
                     f"inner-split Dice {selection['selected_dice']:.3f} ({len(selection['inner_cases'])} inner cases)"
                     + ("" if base_inner is None else f", unadapted base {base_inner:.3f}")
                     + f"; last step on the validation cases: Dice {last['dice']:.3f}")
        if selection["below_base"]:
            lines.append(f"  WARNING: the selected network's inner-split Dice {selection['selected_dice']:.3f} is "
                         f"below the unadapted base's {base_inner:.3f}: training did not help on this fold")
    if "train_time_s" in cost:
        threads = f"{cost['threads']} thread" + ("s" if cost["threads"] > 1 else "")
        lines.append(f"  trainable parameters {cost['trainable_params']:,}, training {cost['train_time_s']:.0f} s "
                     f"({cost['train_steps']} steps, {threads}), peak memory {cost['peak_mem_mb']:.0f} MB ({cost['memory']})")
    timing = result.get("timing")
    if timing:
        lines.append(f"  {format_timing(timing)}")
    lines.append(f"  run folder: {run_dir}")
    return "\n".join(lines)

