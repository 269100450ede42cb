"""Training and cross-validation: Lightning module and data module, run folders, the CV report.

Public API::

    SegAdaptModule(model, model_kwargs, base_checkpoint, adapter, preset, lr, ...)  # LightningModule
    SegDataModule(dataset_json, fold, n_folds, split_seed, preprocess, sampling, ...)  # LightningDataModule
    train(cfg) -> metrics dict        # one fold from a resolved configs/train.yaml (scripts/train.py)
    pretrain(cfg) -> metrics dict     # source pretraining -> the base checkpoint (scripts/pretrain.py)
    fit_run(run_dir, identity, module_kwargs, datamodule_kwargs, trainer_kwargs, ...)  # the core of both
    load_run(run_dir) -> (module, config)   # tuned network rebuilt from a run folder's files
    read_metrics(run_dir) -> dict
    write_report(experiment_dir, out_dir=None) -> paths   # markdown + CSV table, PNG plots
    case_metrics(pred, truth, affine), summarize(cases, bin_edges), bin_labels, volume_bin, mask_volume_ml
    TrainStats, SelectBest, ExportWeights   # callbacks: cost figures; inner-split model selection; export

Run-folder layout and config keys: see :mod:`segadapt.training.run`.
"""

from .callbacks import ADAPTER_FILE, WEIGHTS_FILE, ExportWeights, SelectBest, TrainStats, export_weights
from .datamodule import SegDataModule
from .metrics import bin_labels, case_metrics, mask_volume_ml, summarize, voxel_volume_ml, volume_bin
from .module import BASELINES, SegAdaptModule, tuning_name
from .report import write_report
from .run import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, fit_run, load_run, pretrain, read_metrics, read_run_config, train

__all__ = [
    "ADAPTER_FILE",
    "BASELINES",
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "METRICS_FILE",
    "WEIGHTS_FILE",
    "ExportWeights",
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
    "read_metrics",
    "read_run_config",
    "summarize",
    "train",
    "tuning_name",
    "volume_bin",
    "voxel_volume_ml",
    "write_report",
]
