"""Where the wall time of a run goes: named phases that sum to its total (``metrics.json`` ``timing``).

``total_s = startup_s + setup_s + base_scores_s + data_s + train_steps_s + validation_s + checkpoints_s
+ lightning_s + results_s + other_s``, with ``other_s`` the small remainder no phase claims:

* ``startup_s``: before the run's folder is set up: imports (the first run of a process), the plan, the request
  checks, the base checkpoint (pretrained here when missing);
* ``setup_s``: the cases read and cached, the network built, the run folder written, the Trainer built;
* ``base_scores_s``: the unadapted base scored (shared by the runs of a sweep on the same fold);
* ``data_s``: the training batches drawn (sampling, crops, augmentation), Lightning's
  ``train_dataloader_next``;
* ``train_steps_s``: forward, backward and optimiser of the training batches;
* ``validation_s``: every validation round of the run's own network (inner split while fitting, the final
  scoring of the fold's validation cases);
* ``checkpoints_s``: ``last.ckpt`` and the weights file written (while fitting and after it);
* ``lightning_s``: the rest of ``trainer.fit``: Lightning's set-up and tear-down, its hooks, the loggers;
* ``results_s``: the metrics of the cases summarised and the postprocessing chosen.

Lightning's own profiler hooks tell the phases inside ``trainer.fit`` apart (:class:`LoopProfiler`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Optional

from lightning.pytorch.profilers import Profiler

PHASES = ("startup_s", "setup_s", "base_scores_s", "data_s", "train_steps_s", "validation_s", "checkpoints_s",
          "lightning_s", "results_s")

# Lightning profiler actions (lightning/pytorch/loops, trainer/call.py) that write checkpoints
_CHECKPOINT_ACTIONS = ("ModelCheckpoint", "ExportWeights", "save_checkpoint")
_DATA_ACTION = "[_TrainingEpochLoop].train_dataloader_next"


class LoopProfiler(Profiler):
    """Sums the seconds of Lightning's profiled actions (``trainer.profiler``); writes and prints nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[str, float] = {}

    def start(self, action_name: str) -> None:
        self._started[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        start = self._started.pop(action_name, None)
        if start is not None:
            self.seconds[action_name] += time.perf_counter() - start

    def summary(self) -> str:
        return ""

    def data_s(self) -> float:
        """Seconds spent drawing training batches."""
        return self.seconds.get(_DATA_ACTION, 0.0)

    def checkpoints_s(self) -> float:
        """Seconds of the checkpoint callbacks' hooks (where they write last.ckpt and the weights file)."""
        return sum(s for action, s in self.seconds.items()
                   if action.startswith("[Callback]") and any(name in action for name in _CHECKPOINT_ACTIONS))


class RunClock:
    """Laps of one run: :meth:`lap` gives the seconds since the previous lap (or `started`) to a phase."""

    def __init__(self, started: Optional[float] = None) -> None:
        self.started = time.perf_counter() if started is None else started
        self._mark = self.started
        self.seconds: dict[str, float] = {name: 0.0 for name in PHASES}

    def lap(self, phase: str) -> float:
        """Add the seconds since the last lap to `phase`; returns them."""
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        self.add(phase, seconds)
        return seconds

    def add(self, phase: str, seconds: float) -> None:
        if phase not in self.seconds:
            raise KeyError(f"unknown timing phase {phase!r}; one of {', '.join(PHASES)}")
        self.seconds[phase] += seconds

    def split_fit(self, train_steps_s: float, validation_s: float, profiler: LoopProfiler) -> None:
        """Split the seconds of ``trainer.fit`` (lapped as ``lightning_s``) into the phases inside it; the part
        none of them claims stays ``lightning_s``."""
        inside = {"data_s": profiler.data_s(), "train_steps_s": train_steps_s, "validation_s": validation_s,
                  "checkpoints_s": profiler.checkpoints_s()}
        for phase, seconds in inside.items():
            self.add(phase, seconds)
        self.add("lightning_s", -sum(inside.values()))

    def as_dict(self) -> dict[str, float]:
        """The phases, ``other_s`` (total minus their sum) and ``total_s``, from `started` to now."""
        total = time.perf_counter() - self.started
        named = dict(self.seconds)
        return {**named, "other_s": total - sum(named.values()), "total_s": total,
                "started_at": time.time() - total}  # epoch seconds, for the wall time of a sweep


def format_timing(timing: dict[str, float]) -> str:
    """One line: every phase of `timing` with its seconds, the remainder and the total."""
    parts = [f"{name[:-2].replace('_', ' ')} {timing[name]:.1f}" for name in (*PHASES, "other_s") if name in timing]
    return f"time (s): {', '.join(parts)} (total {timing['total_s']:.1f})"
