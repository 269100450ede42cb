"""Tiny trained run folders that several test files build."""

from __future__ import annotations

from pathlib import Path

_GRID = ["shape=[32,32,16]", "spacing=[6.9,6.9,10.0]"]
_PREPROCESS = ["preprocess.slice_size=[32,32]", "preprocess.patch_size=[32,32,16]", "preprocess.samples_per_volume=2"]
# Hydra overrides of configs/train.yaml for the tiny phantom world: 6 target and 4 source phantoms of 32x32x16
# voxels, batch 1, 2 steps of pretraining and of adaptation, no progress bar
TINY_PHANTOM = [
    *[f"data.phantom.{g}" for g in _GRID], *[f"source.phantom.{g}" for g in _GRID],
    *[f"data.{p}" for p in _PREPROCESS], *[f"source.{p}" for p in _PREPROCESS],
    "data.phantom.n=6", "source.phantom.n=4", "source.n_folds=2", "data.batch_size=1", "source.batch_size=1",
    "trainer.max_steps=2", "pretrain.max_steps=2", "trainer.enable_progress_bar=false",
]


def tiny_phantom(*overrides: str) -> list[str]:
    """TINY_PHANTOM with each `key=value` of `overrides` in place of the entry of the same key (new keys after)."""
    given = dict(override.split("=", 1) for override in overrides)
    kept = [f"{key}={given.pop(key)}" if key in given else entry
            for entry in TINY_PHANTOM for key in [entry.split("=", 1)[0]]]
    return [*kept, *(f"{key}={value}" for key, value in given.items())]


def fit_scratch_unet(run: Path, dataset: Path, experiment: str, model_kwargs: dict, preprocess: dict,
                     roi_size: list[int], max_steps: int, n_folds: int = 2, batch_size: int = 1,
                     lr: float | None = None) -> Path:
    """A tiny MONAI UNet trained from scratch on fold 0 of `dataset` (no progress bar, no validation before the
    end, no base scores): a finished run folder at `run` for the predict / DICOM-SEG tests."""
    from segadapt.training import RunConfig, fit_run

    module = {"model": "unet3d", "model_kwargs": {"num_res_units": 0, **model_kwargs}, "adapter": "scratch",
              "roi_size": roi_size, **({} if lr is None else {"lr": lr})}
    data = {"dataset_json": str(dataset), "fold": 0, "n_folds": n_folds, "preprocess": preprocess,
            "sampling": "patch", "batch_size": batch_size}
    trainer = {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "enable_progress_bar": False,
               "enable_model_summary": False, "num_sanity_val_steps": 0, "check_val_every_n_epoch": 10_000}
    fit_run(RunConfig(run, {"experiment": experiment, "method": "scratch", "fold": 0}, module, data, trainer, eval_base=False))
    return run


def run_script_in_process(script: Path, *args: str) -> int:
    """``python script args`` (its ``__main__`` block) in this process; its exit code (0 when it returns). For
    refusals, which end before the script runs a job: no interpreter start-up to pay, stderr left to capsys."""
    import runpy
    import sys

    argv, sys.argv = sys.argv, [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        return stop.code
    finally:
        sys.argv = argv
    return 0
