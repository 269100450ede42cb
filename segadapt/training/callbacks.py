"""Lightning callbacks: training cost (time, peak memory, trainable parameters), model selection on the
inner validation split, weight export, and a progress bar in optimiser steps.

``TrainStats`` keeps its totals in the Lightning checkpoint, so a resumed run reports the time of all its
sessions (``SelectBest`` keeps its curve and the selected state there too). Peak memory is the CUDA
allocator's peak on GPU, and the process's peak resident set size (Linux ``VmHWM``, reset at fit start
through ``/proc/self/clear_refs``) on CPU.
"""

from __future__ import annotations

import json

import math
import resource
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.trainer.states import TrainerFn

from segadapt.adapters import adapted_layers, save_adapter
from segadapt.io import save_safetensors
from segadapt.runs import ADAPTER_FILE, SCHEDULE_STATE, SETTINGS_STATE, WEIGHTS_FILE


def reset_peak_rss() -> None:
    """Make the process's peak RSS start again from the current RSS (Linux; a no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_mb(field: str) -> Optional[float]:
    """A memory field of /proc/self/status (e.g. 'VmHWM', 'VmRSS') in MB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB since the last :func:`reset_peak_rss`."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def rss_mb() -> float:
    """Current resident set size in MB (the peak where the current value cannot be read)."""
    current = _status_mb("VmRSS")
    return peak_rss_mb() if current is None else current


TRAIN_STATS_KEYS = ("trainable_params", "train_time_s", "train_steps", "fit_time_s", "peak_mem_mb", "memory",
                    "peak_mem_increase_mb", "resumed_from_step")


class TrainStats(pl.Callback):
    """Measures training cost; read :attr:`stats` after ``fit`` (also sent to the loggers as ``cost/*``).

    ``stats``: ``trainable_params``, ``train_time_s`` (forward + backward + optimiser steps, summed over
    training batches and over resumed sessions; data loading and validation excluded), ``train_steps``,
    ``fit_time_s`` (wall time of all fit sessions), ``peak_mem_mb`` and ``memory`` ('cuda' or 'cpu_rss';
    the peak of the training steps: validation rounds inside ``fit`` are left out),
    ``peak_mem_increase_mb`` (the peak minus the memory in use at fit start: what training itself needed,
    without the process's baseline), ``resumed_from_step`` (global step at the start of the last session).
    """

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {"train_time_s": 0.0, "fit_time_s": 0.0, "train_steps": 0}
        self._batch_start = self._fit_start = self._mem_start = self._train_peak = 0.0
        self._trained = False

    @staticmethod
    def _sync(trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    @staticmethod
    def _reset_peak(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()

    @staticmethod
    def _peak(device: torch.device) -> float:
        return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        self._trained = False
        self._reset_peak(device)
        self._mem_start = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mb()
        self._train_peak = 0.0
        self._fit_start = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # keep the training peak, then measure apart from validation
            self._train_peak = max(self._train_peak, self._peak(trainer.strategy.root_device))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_peak(trainer.strategy.root_device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True
        self.stats["resumed_from_step"] = trainer.global_step
        self.stats["trainable_params"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(trainer)
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._sync(trainer)
        self.stats["train_time_s"] += time.perf_counter() - self._batch_start
        self.stats["train_steps"] += 1

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resume from a checkpoint of the last step trains nothing (Lightning then calls neither
        on_train_start nor on_train_end): the figures of this session are completed here, so that
        :attr:`stats` has every key of :data:`TRAIN_STATS_KEYS` after any fit."""
        if not self._trained:
            self.on_train_start(trainer, pl_module)
            self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stats["fit_time_s"] += time.perf_counter() - self._fit_start
        device = trainer.strategy.root_device
        self.stats["peak_mem_mb"] = max(self._train_peak, self._peak(device))
        self.stats["memory"] = "cuda" if device.type == "cuda" else "cpu_rss"
        self.stats["peak_mem_increase_mb"] = self.stats["peak_mem_mb"] - self._mem_start
        numbers = {f"cost/{k}": float(v) for k, v in self.stats.items() if isinstance(v, (int, float))}
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": dict(self.stats)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stats.update(state_dict.get("stats", {}))


class RunSettings(pl.Callback):
    """Keeps a digest of the run's settings in the Lightning checkpoint (``callbacks['RunSettings']``), so that
    a resume can tell its own run's ``last.ckpt`` from one another training wrote into the same folder."""

    def __init__(self, digest: str) -> None:
        self.digest = digest

    @property
    def state_key(self) -> str:
        return SETTINGS_STATE  # what segadapt.runs.check_run_folder reads back

    def state_dict(self) -> dict[str, Any]:
        return {"digest": self.digest}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing: the resume checks the stored digest before it starts (:func:`segadapt.runs.check_run_folder`)."""


class LongerSchedule(pl.Callback):
    """Keeps the ``trainer.max_steps`` a checkpoint was trained for (``callbacks['LongerSchedule']``). A resume
    with a larger ``max_steps`` trains on with the LR schedule (warm-up, cosine) of the new total, advanced to
    the checkpoint's step: the restored one would end at the old total. `extended_from`: the old total, when so."""

    def __init__(self) -> None:
        self.max_steps: Optional[int] = None
        self.trained_for: Optional[int] = None  # the checkpoint's max_steps

    @property
    def state_key(self) -> str:
        return SCHEDULE_STATE  # what segadapt.runs.check_run_folder reads back

    @property
    def extended_from(self) -> Optional[int]:
        longer = None not in (self.trained_for, self.max_steps) and 0 < self.trained_for < self.max_steps
        return self.trained_for if longer else None

    def state_dict(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.trained_for = state_dict.get("max_steps")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.max_steps = trainer.max_steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After Lightning restored the checkpoint's optimizer and schedule state (before the first step)."""
        if self.extended_from is None or not trainer.lr_scheduler_configs:
            return
        fresh = pl_module.configure_optimizers()  # a throwaway optimizer over the same parameters; it never steps
        optimizer, schedule = fresh["optimizer"], fresh["lr_scheduler"]["scheduler"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(trainer.global_step):
                schedule.step()
        trainer.lr_scheduler_configs[0].scheduler.load_state_dict(schedule.state_dict())
        for group, planned in zip(trainer.optimizers[0].param_groups, optimizer.param_groups):
            group["lr"] = planned["lr"]


def export_weights(module: pl.LightningModule, folder: str | Path) -> Path:
    """Write what was trained: the adapter (``adapter.safetensors``) or, without adapters, the network's
    state dict (``model.safetensors``, loadable by ``segadapt.models.load_pretrained``). Atomic."""
    net = module.net
    folder = Path(folder)
    if any(True for _ in adapted_layers(net)):
        return save_adapter(net, folder / ADAPTER_FILE)
    # clone: some networks alias one tensor under two names (DynUNet's skip_layers), which safetensors refuses
    state = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}
    # the architecture, so that model=auto adapts a base with its own network (segadapt.plan.apply.base_architecture)
    architecture = {"name": module.hparams.get("model"), "kwargs": dict(module.hparams.get("model_kwargs") or {})}
    return save_safetensors(folder / WEIGHTS_FILE, state, metadata={"format": "segadapt-weights",
                                                                    "model": json.dumps(architecture)})


class ExportWeights(pl.Callback):
    """At the end of training, :func:`export_weights` into `dirpath` (default: the trainer's log dir)."""

    def __init__(self, dirpath: Optional[str] = None) -> None:
        self.dirpath = dirpath
        self.path: Optional[Path] = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path = export_weights(pl_module, self.dirpath or trainer.log_dir or trainer.default_root_dir)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of what training changes in `module`: the parameters that require grad (the adapter, or
    the fine-tuned layers) and the persistent buffers (e.g. BatchNorm running statistics, which move in
    training mode even in a frozen base)."""
    return {name: value.detach().cpu().clone() for name, value in module.state_dict(keep_vars=True).items()
            if not isinstance(value, torch.nn.Parameter) or value.requires_grad}


def standard_error(sd: Any, n: Any) -> float:
    """sd / sqrt(n) of a mean over n cases (0 when unknown: one case, or no sd logged)."""
    sd, n = (float(v) if v is not None else math.nan for v in (sd, n))
    return sd / math.sqrt(n) if math.isfinite(sd) and n > 1 else 0.0


class SelectBest(pl.Callback):
    """Model selection on the inner validation split (the data module validates on it while fitting).

    After each validation while fitting (Trainer ``val_check_interval`` / ``check_val_every_n_epoch``) the
    logged `monitor` (inner Dice) and its standard error over the inner cases (``<monitor>_sd`` /
    sqrt(``n_cases``)) are appended to :attr:`curve` as ``{'step', 'dice', 'se'}``. Selection follows the
    one-standard-error rule: the latest step whose Dice is within one standard error of the best Dice
    (so a few inner cases, whose mean Dice wobbles by about its standard error from one check to the next,
    do not send the selection back to an undertrained early step, while a real decline or collapse is
    left behind). The selected step's :func:`trainable_state` is kept in memory; :meth:`restore` loads it.
    Curve and selected state are kept in the Lightning checkpoint, so a resumed run selects over all its
    sessions; only the check at the very step the checkpoint was written is lost (Lightning saves
    ``last.ckpt`` before that step's validation and does not repeat it on resume).
    """

    def __init__(self, monitor: str = "val/dice") -> None:
        self.monitor = monitor
        self.curve: list[dict[str, float]] = []
        self.best_step: Optional[int] = None
        self.best_score: Optional[float] = None
        self.best_state: Optional[dict[str, torch.Tensor]] = None

    def record(self, step: int, score: float, pl_module: torch.nn.Module, se: float = 0.0) -> bool:
        """Add (step, score, se) to the curve; keep the module's state if this step is selected (see the class
        docstring). True if kept."""
        self.curve.append({"step": int(step), "dice": float(score), "se": float(se)})
        if not math.isfinite(score):
            return False
        finite = [c for c in self.curve if math.isfinite(c["dice"])]
        top = max(finite, key=lambda c: c["dice"])
        if score < top["dice"] - (top["se"] if math.isfinite(top["se"]) else 0.0):
            return False
        self.best_step, self.best_score, self.best_state = int(step), float(score), trainable_state(pl_module)
        return True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if not fitting or self.monitor not in trainer.callback_metrics:
            return
        metrics = trainer.callback_metrics
        self.record(trainer.global_step, float(metrics[self.monitor]), pl_module,
                    standard_error(metrics.get(f"{self.monitor}_sd"), metrics.get(self.monitor.rsplit("/", 1)[0] + "/n_cases")))

    def restore(self, pl_module: torch.nn.Module) -> None:
        """Load the selected state into `pl_module` (the module whose state was recorded)."""
        if self.best_state is None:
            raise RuntimeError("no network was selected: no validation ran while fitting")
        keys = pl_module.load_state_dict(self.best_state, strict=False)
        if keys.unexpected_keys:
            raise RuntimeError(f"the selected state does not fit this module: unexpected {keys.unexpected_keys[:5]}")

    def state_dict(self) -> dict[str, Any]:
        return {"curve": list(self.curve), "best_step": self.best_step, "best_score": self.best_score,
                "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = list(state_dict.get("curve", []))
        self.best_step, self.best_score = state_dict.get("best_step"), state_dict.get("best_score")
        self.best_state = state_dict.get("best_state")


class StepProgressBar(TQDMProgressBar):
    """One training bar for the whole fit, in optimiser steps: ``Training 120/300 [00:41<01:02, 2.9it/s, ...]``
    (step / the steps the trainer will run, elapsed, ETA). Lightning's bars count the batches of the current
    epoch, and with ``max_steps`` set (``max_epochs=-1``) its rich bar reads "Epoch 74/-2". A resumed fit
    starts at its checkpoint's step, the ETA from the steps of this session. The validations of a fit (sanity
    check, inner split, the final scoring) add no bar; a validation alone (``segadapt validate``) shows its own."""

    _trained = False  # this trainer has fitted: its later validations belong to the fit

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True
        super().on_train_start(trainer, pl_module)
        total = trainer.estimated_stepping_batches  # max_steps, or what max_epochs x batches allow
        bar = self.train_progress_bar
        bar.reset(total=int(total) if math.isfinite(total) else None)
        bar.initial = bar.n = trainer.global_step
        bar.set_description("Training")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """Nothing: the bar runs across epochs (Lightning's resets it for every epoch)."""

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)  # the sanity check belongs to a fit

    def init_validation_tqdm(self) -> Tqdm:
        if self._trained or self.trainer.state.fn == "fit":
            return Tqdm(disable=True)
        return super().init_validation_tqdm()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if self.is_enabled and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)


def progress_callbacks(trainer_args: Mapping[str, Any]) -> list[pl.Callback]:
    """``[StepProgressBar()]`` for a Trainer made with `trainer_args` that shows a bar (``enable_progress_bar``
    not false) and gets no progress bar of its own in ``callbacks``; ``[]`` otherwise."""
    own = any(isinstance(c, ProgressBar) for c in trainer_args.get("callbacks") or [])
    return [] if own or trainer_args.get("enable_progress_bar") is False else [StepProgressBar()]


class PhaseTimes(pl.Callback):
    """Where the wall time of one session goes: ``train_steps_s`` (training batches: forward, backward,
    optimiser; like :class:`TrainStats` but of this session only), ``validation_s`` (every validation round,
    while fitting and standalone), ``first_step_at`` (``time.perf_counter()`` at the first training step, None
    before it) and ``validation_before_first_step_s``."""

    def __init__(self) -> None:
        self.train_steps_s = self.validation_s = self.validation_before_first_step_s = 0.0
        self.first_step_at: Optional[float] = None
        self._val_start = self._batch_start = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validation_s += time.perf_counter() - self._val_start
        if self.first_step_at is None:
            self.validation_before_first_step_s = self.validation_s

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        TrainStats._sync(trainer)
        self._batch_start = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = self._batch_start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        TrainStats._sync(trainer)
        self.train_steps_s += time.perf_counter() - self._batch_start


class LoadedCheckpoint(pl.Callback):
    """The global step of the checkpoint the trainer loaded (``ckpt_path`` of validate / test / fit): :attr:`step`,
    None when none was loaded. Lightning does not restore the step outside ``fit``; this says which network a
    standalone validation scored."""

    def __init__(self) -> None:
        self.step: Optional[int] = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.step = int(checkpoint.get("global_step", 0))
