"""The run config: the composed ``configs/train.yaml`` request, and the planned run it becomes.

Two kinds of config, two types:

* the request, a composed ``configs/train.yaml`` / ``pretrain.yaml`` (a plain mapping): its values are checked
  for their types (:func:`check_config_types`) and may say ``auto`` where the dataset plan decides;
* :class:`RunConfig`, the planned run: every ``auto`` filled by the plan's apply step
  (:func:`segadapt.training.planning.apply_plan`, the only place that resolves ``auto``), translated into the
  arguments of SegAdaptModule, SegDataModule and lightning.Trainer (:func:`planned_run`). It is what
  :func:`segadapt.training.fit.fit_run` trains, what the run folder stores (:meth:`RunConfig.record`,
  ``config.yaml``) and what a resume compares.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from segadapt.data import PreprocessConfig, load_dataset_json
from segadapt.data.config import parse_number
from segadapt.data.plan import Plan
from segadapt.data.transforms import flip_axes
from segadapt.runs import leaves, run_record

from .datamodule import training_sampling
from .module import tuning_name
from .planning import AUTO, planned_example

log = logging.getLogger(__name__)

DEFAULT_THREADS = 1


def configure_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op threads: `threads`, or :data:`DEFAULT_THREADS` when None; returns the number set.

    A fixed default, not one read from the machine's cores or load: results depend on the thread count
    (float sums are split differently), and the same command and seed must give the same metrics on any
    machine, idle or busy. One thread also never waits for a core taken by another job."""
    n = DEFAULT_THREADS if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"trainer.threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(n)
    return n


# Expected types of the config keys whose value in the config files does not tell it (null, or an integer
# that may be any number); None: any type (Lightning's devices: 1, 'auto', [0, 1]). The others take the
# type of their value in the config files.
DECLARED_TYPES: dict[str, Optional[type]] = {"trainer.threads": int, "ckpt_path": str, "adapter.spec.alpha": float,
                                             "trainer.devices": None, "model.inference.sw_batch_size": int}


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}


def _kind(value: Any) -> Optional[type]:
    for kind in (bool, int, float, str, list, dict):
        if isinstance(value, kind):
            return kind
    return None


def _element(values: list) -> Any:
    """What the elements of a list from the config files look like: the first one when all have its type,
    a float when they are numbers, None (unchecked) otherwise."""
    kinds = {_kind(v) for v in values}
    if len(kinds) == 1 and None not in kinds:
        return values[0]
    return 0.0 if kinds <= {int, float} and kinds else None


def _is_number(text: str) -> bool:
    """Whether a string stands for a number (``.inf`` from a command line, ``inf`` from YAML)."""
    try:
        parse_number(text)
    except ValueError:
        return False
    return True


def _type_error(key: str, value: Any, expected: Any) -> Optional[str]:
    """Why `value` cannot stand where the config files have `expected` (a value, or a type), or None."""
    want = expected if isinstance(expected, type) else _kind(expected)
    got = _kind(value)
    if value is None or want is None or got == want or (want is float and got is int) or \
            (want is str and got in (int, float)) or (want is float and got is str and _is_number(value)):
        if isinstance(expected, list) and isinstance(value, list) and _element(expected) is not None:
            element = _element(expected)
            return next(filter(None, (_type_error(f"{key}[{i}]", v, element) for i, v in enumerate(value))), None)
        return None
    return f"{key}={value!r}: expected {_TYPE_NAMES[want]}, got {type(value).__name__}"


def check_config_types(cfg: Mapping[str, Any], reference: Mapping[str, Any]) -> None:
    """Raise ValueError naming the key and the expected type where a value of `cfg` (a composed config with
    overrides) has another type than in `reference` (the same config groups, no overrides): ``rank=abc``.
    Integers may stand for floats; :data:`DECLARED_TYPES` types the keys the config files cannot."""
    values, reference = leaves(cfg), leaves(reference)
    for key in [k for k, v in reference.items() if v == AUTO]:  # the planned type; `auto` itself stays allowed
        reference[key] = None if values.get(key) == AUTO else planned_example(key)
    for key, expected in DECLARED_TYPES.items():
        reference.pop(key, None)
        if expected is not None and values.get(key) is not None:
            error = _type_error(key, values[key], expected)
            if error:
                raise ValueError(error)
    error = next(filter(None, (_type_error(k, values[k], v) for k, v in reference.items() if k in values)), None)
    if error:
        raise ValueError(error)


def module_args(cfg: Mapping[str, Any], data: Mapping[str, Any], in_channels: int, base: Optional[Path],
                tuning: Mapping[str, Any]) -> dict[str, Any]:
    """SegAdaptModule arguments from the model group, a data group, a tuning (an adapter group: spec,
    preset, lr, reg_weight) and the top-level optim/loss/threshold settings."""
    model = cfg["model"]
    inference = dict(model.get("inference") or {})
    preprocess = PreprocessConfig.from_dict(dict(data["preprocess"]))
    if inference.get("roi_size") is None:  # the training sample size (the multi-view UNet does not use it)
        sampling = training_sampling(model, preprocess.to_dict())
        inference["roi_size"] = list(preprocess.slice_size if sampling == "slice" else preprocess.patch_size)
    if "sw_batch_size" in inference and inference["sw_batch_size"] is None:
        # the training batch (samples per step, from the plan unless the config sets it): it fits in memory with
        # gradients, so windows batched as many at a time do without
        inference["sw_batch_size"] = int(data["batch_size"]) * preprocess.samples_per_volume
    if inference.get("tta"):  # test-time mirroring along the axes training flips (none: it does not augment)
        inference["mirror_axes"] = flip_axes(preprocess)
    return {
        "model": model["name"],
        "model_kwargs": {"in_channels": in_channels, **model["kwargs"]},
        "base_checkpoint": None if base is None else str(base),
        "adapter": tuning["spec"],
        "preset": tuning.get("preset"),
        "lr": tuning["lr"],
        "reg_weight": tuning.get("reg_weight", 0.0),
        **cfg["optim"],
        "loss": dict(cfg["loss"]),
        "volume_bins_ml": [parse_number(b, "volume_bins_ml") for b in data["volume_bins_ml"]],
        "threshold": cfg["threshold"],
        **inference,
    }


def datamodule_args(cfg: Mapping[str, Any], data: Mapping[str, Any], dataset_json: Path, fold: int) -> dict[str, Any]:
    """SegDataModule arguments; the preprocessing config is written out in full (defaults filled in).

    A model group's ``slice_axes`` (the views a 2D network predicts along) replaces the data group's, so
    that it trains on the views it is used on."""
    preprocess = dict(data["preprocess"])
    if cfg["model"].get("slice_axes"):
        preprocess["slice_axes"] = list(cfg["model"]["slice_axes"])
    preprocess = PreprocessConfig.from_dict(preprocess).to_dict()
    return {
        "dataset_json": str(dataset_json),
        "fold": fold,
        "n_folds": data["n_folds"],
        "split_seed": data["split_seed"],
        "preprocess": preprocess,
        "sampling": training_sampling(cfg["model"], preprocess),
        "batch_size": data["batch_size"],
        "num_workers": cfg["trainer"].get("workers", 0),
        "seed": cfg["seed"],
        "inner_fraction": float(_selection(cfg).get("inner_fraction") or 0.0),
        "max_train_cases": data.get("max_train_cases"),
        **({"splits_path": str(Path(data["splits_path"]).resolve())} if data.get("splits_path") else {}),
    }


def _selection(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    return cfg.get("selection") or {}


def trainer_args(cfg: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """lightning.Trainer arguments: the trainer group without segadapt's own keys (threads, workers); with
    model selection, the inner validation every ``selection.every_n_steps`` training steps; bf16 precision
    on a GPU without bf16 becomes 16-mixed (:func:`gpu_precision`)."""
    args = {k: v for k, v in cfg["trainer"].items() if k not in ("threads", "workers")}
    selection = _selection(cfg)
    if selection.get("inner_fraction") and selection.get("every_n_steps"):
        args.update(val_check_interval=int(selection["every_n_steps"]), check_val_every_n_epoch=None)
    args = {**args, **overrides}
    if args.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available():
        args["precision"] = gpu_precision(args.get("precision"), torch.cuda.is_bf16_supported())
    return args


def gpu_precision(precision: Any, bf16_supported: bool) -> Any:
    """Lightning precision for a GPU: ``bf16-mixed`` / ``bf16-true`` where the GPU has bf16 (Ampere and later),
    else ``16-mixed`` (fp16 autocast with loss scaling; V100, T4, ...), with a warning; others unchanged."""
    if isinstance(precision, str) and precision.startswith("bf16") and not bf16_supported:
        log.warning("trainer.precision=%s: this GPU has no bf16; training with 16-mixed instead", precision)
        return "16-mixed"
    return precision



@dataclass(frozen=True)
class RunConfig:
    """A planned run: every value concrete (no ``auto``). :meth:`record` is its ``config.yaml``.

    `module`, `datamodule`, `trainer`: the arguments of SegAdaptModule, SegDataModule and lightning.Trainer;
    `identity`: experiment, method, fold, dataset (``run`` in config.yaml and metrics.json); `eval_base`: also
    validate the network before tuning (``base_val``); `checkpoint_every`: steps between last.ckpt saves;
    `overwrite`: a fresh run may replace a finished one; `patience`: stop after this many inner validations
    without improvement (None: never); `fingerprint_cache`: the plan cache folder holding the dataset's
    fingerprint (None: fingerprinted afresh); `plan`: the dataset plan the values came from (``plan.json``)."""

    run_dir: Path
    identity: Mapping[str, Any]
    module: Mapping[str, Any]
    datamodule: Mapping[str, Any]
    trainer: Mapping[str, Any]
    seed: int = 0
    eval_base: bool = True
    checkpoint_every: Optional[int] = None
    overwrite: bool = False
    patience: Optional[int] = None
    fingerprint_cache: Optional[str] = None
    plan: Optional[Plan] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir).resolve())
        unplanned = [key for key, value in leaves({"module": self.module, "datamodule": self.datamodule}).items()
                     if value == AUTO]
        if unplanned:  # only the plan's apply step resolves `auto`
            raise ValueError(f"{unplanned[0]}=auto: not planned (a planned run config has concrete values only)")

    @property
    def tuning(self) -> str:
        return tuning_name(self.module["adapter"])

    def record(self, threads: Optional[int] = None) -> dict[str, Any]:
        """The run's ``config.yaml`` (as read back from YAML); `threads`: torch's (default: the current number)."""
        return run_record(self.run_dir, self.identity, self.tuning, self.module, self.datamodule, self.trainer,
                          self.seed, torch.get_num_threads() if threads is None else threads)


def planned_run(cfg: Mapping[str, Any], kind: str, dataset: Path, plan: Optional[Plan] = None) -> RunConfig:
    """The :class:`RunConfig` of a ``train`` or ``pretrain`` job from its planned config (`cfg`, after
    :func:`~segadapt.training.planning.apply_plan`); `dataset`: the absolute dataset.json it trains on; `plan`:
    the plan it was planned with."""
    pretraining = kind == "pretrain"
    data = cfg["source"] if pretraining else cfg["data"]
    in_channels = load_dataset_json(dataset).channels * PreprocessConfig.from_dict(dict(data["preprocess"])).in_channels
    options = {"seed": cfg["seed"], "checkpoint_every": cfg["checkpoint_every"],
               "overwrite": bool(cfg.get("overwrite", False)), "patience": _selection(cfg).get("patience"),
               "fingerprint_cache": cfg["plan"]["cache_dir"], "plan": plan}
    if pretraining:
        settings = cfg["pretrain"]
        return RunConfig(
            run_dir=settings["run_dir"],
            identity={"experiment": "pretrain", "method": "scratch", "fold": settings["fold"], "dataset": data["name"]},
            module=module_args(cfg, data, in_channels, None, {"spec": "scratch", "lr": settings["lr"]}),
            datamodule=datamodule_args(cfg, data, dataset, settings["fold"]),
            trainer=trainer_args(cfg, max_steps=settings["max_steps"]), **options)
    adapter = cfg["adapter"]
    base = None if tuning_name(adapter["spec"]) == "scratch" else Path(cfg["base_checkpoint"]).resolve()
    return RunConfig(
        run_dir=cfg["run_dir"],
        identity={"experiment": cfg["experiment"], "method": adapter["name"], "fold": cfg["fold"], "dataset": data["name"]},
        module=module_args(cfg, data, in_channels, base, adapter),
        datamodule=datamodule_args(cfg, data, dataset, cfg["fold"]),
        trainer=trainer_args(cfg), eval_base=cfg["eval_base"], **options)
