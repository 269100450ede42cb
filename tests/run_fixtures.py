"""Tiny trained run folders that several test files build."""

from __future__ import annotations

from pathlib import Path


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
