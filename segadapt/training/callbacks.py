"""Lightning callbacks: training cost (time, peak memory, trainable parameters) and weight export.

``TrainStats`` keeps its totals in the Lightning checkpoint, so a resumed run reports the time of all its
sessions. Peak memory is the CUDA allocator's peak on GPU, and the process's peak resident set size
(Linux ``VmHWM``, reset at fit start through ``/proc/self/clear_refs``) on CPU.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from safetensors.torch import save_file

from segadapt.adapters import adapted_layers, save_adapter
from segadapt.data.files import atomic_path

ADAPTER_FILE = "adapter.safetensors"
WEIGHTS_FILE = "model.safetensors"


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

    def _sync(self, trainer: pl.Trainer) -> None:
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


def export_weights(module: pl.LightningModule, folder: str | Path) -> Path:
    """Write what was trained: the adapter (``adapter.safetensors``) or, without adapters, the network's
    state dict (``model.safetensors``, loadable by ``segadapt.models.load_pretrained``). Atomic."""
    net = module.net
    folder = Path(folder)
    if any(True for _ in adapted_layers(net)):
        return save_adapter(net, folder / ADAPTER_FILE)
    # clone: some networks alias one tensor under two names (DynUNet's skip_layers), which safetensors refuses
    state = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "segadapt-weights"})
    return folder / WEIGHTS_FILE


class ExportWeights(pl.Callback):
    """At the end of training, :func:`export_weights` into `dirpath` (default: the trainer's log dir)."""

    def __init__(self, dirpath: Optional[str] = None) -> None:
        self.dirpath = dirpath
        self.path: Optional[Path] = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path = export_weights(pl_module, self.dirpath or trainer.log_dir or trainer.default_root_dir)
