"""Training and cross-validation: Lightning module and data module, run folders, the CV report.

Public API::

    SegAdaptModule(model, model_kwargs, base_checkpoint, adapter, preset, lr, ...)  # LightningModule
    SegDataModule(dataset_json, fold, n_folds, split_seed, preprocess, sampling, ...)  # LightningDataModule
    train(cfg) -> metrics dict        # one fold from a resolved configs/train.yaml (scripts/train.py)
    pretrain(cfg) -> metrics dict     # source pretraining -> the base checkpoint (scripts/pretrain.py)
    RunConfig(run_dir, identity, module, datamodule, trainer, seed, ...)  # a planned run (config.yaml)
    fit_run(run: RunConfig, ckpt_path=None, callbacks=None) -> metrics dict  # the core of both
    load_run(run_dir, strict=True) -> (module, config)   # tuned network rebuilt from a run folder's files
    write_report(experiment_dir, out_dir=None) -> paths   # markdown + CSV table, PNG plots
    case_metrics(pred, truth, affine), summarize(cases, bin_edges), bin_labels, volume_bin, mask_volume_ml
    TrainStats, SelectBest, ExportWeights   # callbacks: cost figures; inner-split model selection; export

Run-folder layout, file names and reading a run's files (``read_metrics``, ``read_run_config``, ``open_run``):
:mod:`segadapt.runs`.
"""

from .callbacks import ExportWeights, SelectBest, TrainStats, export_weights
from .config import RunConfig
from .datamodule import SegDataModule
from .fit import fit_run
from .jobs import pretrain, train
from .load import load_run
from .metrics import bin_labels, case_metrics, mask_volume_ml, summarize, voxel_volume_ml, volume_bin
from .module import BASELINES, SegAdaptModule, tuning_name
from .report import write_report

__all__ = [
    "BASELINES",
    "ExportWeights",
    "RunConfig",
    "SegAdaptModule",
    "SegDataModule",
    "SelectBest",
    "TrainStats",
    "bin_labels",
    "case_metrics",
    "export_weights",
    "fit_run",
    "load_run",
    "mask_volume_ml",
    "pretrain",
    "summarize",
    "train",
    "tuning_name",
    "volume_bin",
    "voxel_volume_ml",
    "write_report",
]
