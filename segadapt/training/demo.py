"""Run folders to predict with: those ``scripts/train.py`` wrote (:func:`trained_fold_runs`), or a tiny demo run
trained here in seconds for a fresh clone (:func:`make_demo_runs`; :func:`is_demo_run` tells one apart).

They train (:func:`segadapt.training.fit_run`), so they sit in the training layer; predict, the notebook, the ensemble
benchmark and the tests' ``demo_runs`` fixture open the folders they return.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from segadapt.data import PreprocessConfig, make_phantom_dataset

from segadapt.runs import ADAPTER_FILE, CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, read_run_config

from .config import RunConfig
from .fit import fit_run

TRAIN_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # scripts/train.py's Hydra configs (a source checkout)


def trained_fold_runs(overrides: Sequence[str] = (), root: str | os.PathLike = ".",
                      config_dir: str | os.PathLike = TRAIN_CONFIGS) -> tuple[Path, list[Path]]:
    """Where ``python scripts/train.py -m fold=0,1,... <overrides>``, run in `root`, writes its fold runs, and the
    finished ones there: (`root`/``run_dir`` of ``configs/train.yaml`` composed with `overrides` and ``fold=*``,
    e.g. ``runs/phantom_sah/multiview_unet/cp_lora/fold*``; the folders matching it that hold ``config.yaml``,
    ``adapter.safetensors`` and ``metrics.json``, by fold)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "fold='*'"])
    pattern = Path(root) / str(cfg.run_dir)
    runs = [r for r in pattern.parent.glob(pattern.name)
            if all((r / f).is_file() for f in (CONFIG_FILE, ADAPTER_FILE, METRICS_FILE))]
    return pattern, sorted(runs, key=lambda r: int(read_run_config(r)["run"]["fold"]))


def is_demo_run(run_dir: str | os.PathLike) -> bool:
    """A run made by :func:`make_demo_runs` (a few steps: its masks are not segmentations)."""
    return read_run_config(run_dir)["run"].get("experiment") == "demo"


DEMO_MODEL = {"out_channels": 1, "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0,
              "norm": "instance", "shared_weights": True, "fusion": "mean"}


def make_demo_runs(
    out_dir: str | os.PathLike,
    members: int = 3,
    method: str = "cp_lora",
    rank: int = 4,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    shape: Sequence[int] = (40, 40, 20),
    steps: tuple[int, int] = (10, 4),
    seed: int = 0,
) -> list[Path]:
    """Small real run folders to try inference on in seconds (CPU): returns the `members` fold runs.

    Writes the phantom source (``tbi``) and target (``sah``) datasets under ``out_dir/data``, a
    multi-view UNet base trained ``steps[0]`` steps from scratch on the source (``out_dir/runs/base``),
    and one `method` adapter per fold of the target trained ``steps[1]`` steps at a high learning rate, so
    that the folds differ (``out_dir/runs/demo/<method>/fold<k>``), all with :func:`segadapt.training.fit_run`.
    Complete folders of the same network are reused. The schedules are far too short to segment well: this
    exercises the pipeline; ``python scripts/train.py`` makes a real run.
    """
    out_dir = Path(out_dir).resolve()
    runs = [out_dir / "runs" / "demo" / method / f"fold{k}" for k in range(members)]
    model_kwargs = {"in_channels": PreprocessConfig().in_channels, **dict(model_kwargs or DEMO_MODEL)}
    if all((r / name).is_file() for r in runs for name in (ADAPTER_FILE, CONFIG_FILE, METRICS_FILE)) \
            and read_run_config(runs[0])["module"]["model_kwargs"] == model_kwargs:
        return runs
    spacing = [220.0 / shape[0], 220.0 / shape[1], 160.0 / shape[2]]  # the phantom head's field of view in mm
    divisor = math.prod(model_kwargs.get("strides", [2]))
    slice_size = [math.ceil(s / divisor) * divisor for s in shape[:2]]  # training slices are padded up to this
    preprocess = PreprocessConfig(slice_size=slice_size, samples_per_volume=4, augment=False).to_dict()
    trainer = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
               "num_sanity_val_steps": 0, "log_every_n_steps": 1, "check_val_every_n_epoch": 10_000}
    model = {"model": "multiview_unet", "model_kwargs": model_kwargs}

    def data(domain: str, fold: int) -> dict[str, Any]:
        n = max(members, 2)  # one validation case per fold
        dataset = make_phantom_dataset(out_dir / "data" / domain, domain, n, seed, shape, spacing)
        return {"dataset_json": str(dataset), "fold": fold, "n_folds": n, "split_seed": seed,
                "preprocess": preprocess, "batch_size": 2}

    base_run = out_dir / "runs" / "base"
    fit_run(RunConfig(base_run, {"experiment": "demo", "method": "scratch", "fold": 0}, {**model, "adapter": "scratch", "lr": 3e-3},
                      data("tbi", 0), {**trainer, "max_steps": steps[0]}, seed=seed, eval_base=False, overwrite=True))
    adapter = {"method": method, "rank": rank}
    for k, run in enumerate(runs):
        fit_run(RunConfig(run, {"experiment": "demo", "method": method, "fold": k},
                          {**model, "adapter": adapter, "preset": "all_conv", "lr": 3e-2,
                           "base_checkpoint": str(base_run / WEIGHTS_FILE)},
                          data("sah", k), {**trainer, "max_steps": steps[1]}, seed=seed + k, eval_base=False, overwrite=True))
    return runs
