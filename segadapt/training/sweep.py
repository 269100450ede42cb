"""What the runs of one process share, and the time summary of a sweep.

A local sweep (``scripts/train.py -m ...`` with Hydra's basic launcher) runs every job in one process, one
after the other. What does not depend on the method is then built once for all of them:

* the preprocessed cases: :data:`segadapt.data.cache.CASES` (``cache: memory``), keyed by the dataset, the
  preprocessing config (the plan's decisions) and each case's files;
* the base weights: :func:`segadapt.models.read_state_dict` keeps the last files it read, keyed by path,
  size and modification time; every run loads them into its own freshly built network;
* the unadapted base's scores on a fold (:data:`BASE_SCORES`): the validation cases (``base_val``) and the
  inner split (``base_inner_dice``), computed on the plain base network, which is the same for every method
  of the fold, and keyed by everything they depend on (:func:`base_key`).

Each run still writes its own complete run folder, and a run alone computes the same numbers.
Slurm (``hydra/launcher=submitit_slurm``) keeps one process per run; nothing is shared there.

:class:`SweepSummary` (a Hydra callback, ``hydra.callbacks`` in ``configs/train.yaml``) prints at the end of
a multirun the wall time and the share of it spent in training steps, from the runs' ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from segadapt.data.cache import MemoryStore

# SegAdaptModule arguments the unadapted base's predictions depend on (the others say how it would be tuned).
_BASE_MODULE_KEYS = ("model", "model_kwargs", "base_checkpoint", "volume_bins_ml", "threshold", "slice_batch_size",
                     "roi_size", "sw_batch_size", "overlap", "tta", "mirror_axes")
# SegDataModule arguments its validation and inner cases do not depend on.
_TRAINING_ONLY_KEYS = ("seed", "batch_size", "num_workers", "max_train_cases")


BASE_SCORES = MemoryStore()  # the unadapted base's fold scores


def base_key(module_kwargs: Mapping[str, Any], datamodule_kwargs: Mapping[str, Any], threads: int,
             kind: str) -> Optional[str]:
    """Key of the base's scores (`kind`: ``'val'`` or ``'inner'``) for a run; None without a base checkpoint."""
    checkpoint = module_kwargs.get("base_checkpoint")
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    stat = Path(checkpoint).stat()
    dataset = Path(str(datamodule_kwargs.get("dataset_json", "")))
    return json.dumps({
        "dataset": [str(dataset), dataset.stat().st_mtime_ns] if dataset.is_file() else str(dataset),
        "kind": kind,
        "module": {k: module_kwargs.get(k) for k in _BASE_MODULE_KEYS},
        "checkpoint": [str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns],
        "data": {k: v for k, v in datamodule_kwargs.items() if k not in _TRAINING_ONLY_KEYS},
        "threads": threads,  # float sums, hence thresholded masks, depend on it
    }, sort_keys=True, default=str)


def clear_caches() -> None:
    """Forget what the runs of this process shared (cases, base weights, base scores)."""
    from segadapt.data.cache import CASES
    from segadapt.models.pretrained import clear_read_cache

    CASES.clear()
    BASE_SCORES.clear()
    clear_read_cache()


def _runs_since(folder: Path, since: float) -> list[dict]:
    """The metrics.json of the runs under `folder` written after `since` (time.time())."""
    runs = []
    for path in folder.rglob("metrics.json"):
        try:
            if path.stat().st_mtime >= since:
                runs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return runs


def sweep_summary(runs: list[dict], wall_s: float) -> str:
    """Runs, wall time (`wall_s`), the share of it in training steps, and the summed phases of the runs'
    ``timing`` (:mod:`segadapt.training.timing`); runs per hour = 3600 runs / wall."""
    from segadapt.training.timing import PHASES

    timing = [r.get("timing") or {} for r in runs]
    total = {k: sum(t.get(k) or 0.0 for t in timing) for k in (*PHASES, "other_s")}
    share = total["train_steps_s"] / wall_s if wall_s > 0 else float("nan")
    per_hour = 3600 * len(runs) / wall_s if wall_s > 0 else float("nan")
    phases = ", ".join(f"{k[:-2].replace('_', ' ')} {v:.0f}" for k, v in total.items() if k != "train_steps_s")
    return (f"sweep: {len(runs)} runs in {wall_s:.0f} s wall ({per_hour:.0f} runs per hour); training steps "
            f"{total['train_steps_s']:.0f} s ({share:.0%} of the wall time); {phases} (s)")


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, :func:`sweep_summary` of the runs it wrote (any launcher)."""

    def __init__(self) -> None:
        self._start_wall = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start_wall = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(os.path.expanduser(str(config.hydra.sweep.dir)))
        runs = _runs_since(folder, self._start_wall - 1.0) if folder.is_dir() else []
        if runs:
            # from the earliest run's start: the first run of a process counts from the process start
            # (imports, the check of every job), which comes before Hydra's multirun starts
            first = min([self._start_wall] + [(r.get("timing") or {}).get("started_at") or self._start_wall for r in runs])
            print(sweep_summary(runs, time.time() - first), flush=True)
