"""The run config, typed: the request (:class:`TrainConfig`) and the planned run it becomes (:class:`RunConfig`).

* :class:`TrainConfig`: a composed ``configs/train.yaml`` / ``pretrain.yaml``, every value checked for its type
  (:meth:`TrainConfig.from_cfg`; a wrong one is one ValueError naming the key). Where the dataset plan decides
  (``<data group>.batch_size``, ``<data group>.preprocess.*``, ``model.kwargs.*``, and the schedule:
  ``trainer.max_steps``, ``pretrain.max_steps``, ``optim.warmup_steps``, ``selection.every_n_steps`` /
  ``patience``) a value may still be ``auto``.
* :class:`RunConfig`: the planned run, every ``auto`` filled by the plan's apply step
  (:func:`segadapt.plan.apply.apply_plan`, the only place that resolves ``auto``) and translated into the
  arguments of SegAdaptModule, SegDataModule and lightning.Trainer (:func:`planned_run`). It is what
  :func:`segadapt.training.fit.fit_run` trains, what the run folder stores (:meth:`RunConfig.record`,
  ``config.yaml``) and what a resume compares.

The types of the groups that are handed on as arguments are those of what receives them (the schema is not
written twice): ``model.kwargs`` the network's signature, ``model.inference`` and ``optim`` SegAdaptModule's,
``adapter.spec`` :class:`~segadapt.adapters.AdapterConfig`, ``<data group>.preprocess``
:class:`~segadapt.data.PreprocessConfig`, ``loss`` MONAI's DiceCELoss, ``trainer`` lightning.Trainer's.
(Why not Hydra structured configs as the schema of train.yaml: OmegaConf 2.3 has no Union types, so neither
``auto``-or-a-list nor Lightning's ``devices`` (1, 'auto', [0, 1]) can be typed there, and the per-network /
per-method groups have no one schema.)
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import logging
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from monai.losses import DiceCELoss

from segadapt.adapters import AdapterConfig
from segadapt.data import PreprocessConfig, load_dataset_json, make_phantom_dataset
from segadapt.data.config import parse_number, training_sampling
from segadapt.plan import Plan
from segadapt.data.transforms import flip_axes
from segadapt.models import MODELS
from segadapt.runs import leaves, run_record

from .module import SegAdaptModule, tuning_name
from segadapt.plan.apply import AUTO

log = logging.getLogger(__name__)

Planned = Annotated  # Planned[int, AUTO]: an int, or `auto` in the request (the plan decides it)

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


# ---- the request's types ------------------------------------------------------------------------------
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}
_SEQUENCES = (list, tuple, set, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection)


def _kind(value: Any) -> Optional[type]:
    """What a config value is: bool, int, float, str, list or dict (None: something else)."""
    for kind in (bool, int, float, str, list, dict):
        if isinstance(value, kind):
            return kind
    return None


def _wanted(annotation: Any) -> Optional[type]:
    """The config kind an annotation asks for; None: an object no config value stands for (not checked)."""
    origin = typing.get_origin(annotation) or annotation
    if origin in (bool, int, float, str):
        return origin
    if isinstance(origin, type) and issubclass(origin, PurePath):
        return str
    if origin in _SEQUENCES:
        return list
    if origin in (dict, collections.abc.Mapping):
        return dict
    return None


def _is_number(text: str) -> bool:
    """Whether a string stands for a number (``.inf`` from a command line, ``inf`` from YAML)."""
    try:
        parse_number(text)
    except ValueError:
        return False
    return True


def type_error(key: str, value: Any, annotation: Any, planned: bool = False) -> Optional[str]:
    """Why `value` cannot stand for `annotation` at config key `key` (``key=value: expected ...``), or None.

    Integers may stand for numbers, numbers for strings, a string that reads as a number (``.inf``) for a
    number; None stands for anything (the receiver's default); `planned`: ``auto`` may stand here."""
    if value is None or annotation is Any or (planned and value == AUTO):
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return type_error(key, value, args[0], planned or AUTO in args[1:])
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        errors = [type_error(key, value, a, planned) for a in members]
        if None in errors:
            return None
        alike = [e for a, e in zip(members, errors) if _wanted(a) == _kind(value)]  # the list's own error, ...
        return (alike or errors)[0]
    if origin is Literal:
        return None if any(_kind(a) == _kind(value) for a in args) else \
            f"{key}={value!r}: expected one of {list(args)}, got {type(value).__name__}"
    want, got = _wanted(annotation), _kind(value)
    if want is None:
        return None
    if not (got == want or (want is float and got is int) or (want is str and got in (int, float))
            or (want is float and got is str and _is_number(value))):
        return f"{key}={value!r}: expected {_TYPE_NAMES[want]}, got {type(value).__name__}"
    if want is list and args and args[0] is not Ellipsis:
        return next(filter(None, (type_error(f"{key}[{i}]", v, args[0], planned) for i, v in enumerate(value))), None)
    if want is dict and len(args) == 2:
        return next(filter(None, (type_error(f"{key}.{k}", v, args[1], planned) for k, v in value.items())), None)
    return None


@functools.cache
def _hints(receiver: Any) -> dict[str, Any]:
    """Parameter name -> annotation of a class (its ``__init__``; a dataclass: its fields) or function."""
    while isinstance(receiver, functools.partial):
        receiver = receiver.func
    target = receiver if dataclasses.is_dataclass(receiver) else \
        receiver.__init__ if inspect.isclass(receiver) else receiver
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # annotations that do not resolve: nothing to check against
        return {}
    hints.pop("return", None)
    return hints


def _check(prefix: str, values: Mapping[str, Any], hints: Mapping[str, Any], planned: bool = False) -> None:
    """Raise ValueError (one line, naming the key) at the first value of `values` that `hints` refuses."""
    for key, value in values.items():
        if key in hints:
            error = type_error(f"{prefix}{key}", value, hints[key], planned)
            if error:
                raise ValueError(error)


def _check_groups(cfg: Mapping[str, Any]) -> None:
    """The types of the groups handed on as arguments: those of what receives them (module docstring)."""
    model, adapter = cfg["model"], cfg["adapter"]
    _check("model.", model, {"name": str, "planned": bool, "sampling": str, "slice_axes": Optional[list[str]],
                             "base_checkpoint": Optional[str], "kwargs": dict, "inference": dict})
    if model["name"] in MODELS:  # an unknown name is the module's to refuse, with the names it knows
        _check("model.kwargs.", model.get("kwargs") or {}, _hints(MODELS[model["name"]].build), planned=True)
    _check("model.inference.", model.get("inference") or {}, _hints(SegAdaptModule))
    _check("adapter.", adapter, {"name": str, "preset": Optional[str], "lr": float, "reg_weight": float,
                                 "spec": Union[str, dict]})
    if isinstance(adapter.get("spec"), Mapping):
        _check("adapter.spec.", adapter["spec"], _hints(AdapterConfig))
    for group in ("data", "source"):
        data = cfg[group]
        _check(f"{group}.", data, _hints(DataGroup))
        _check(f"{group}.preprocess.", data.get("preprocess") or {}, _hints(PreprocessConfig), planned=True)
        _check(f"{group}.phantom.", data.get("phantom") or {}, _hints(make_phantom_dataset))
    _check("trainer.", cfg["trainer"], {"threads": Optional[int], "workers": int, **_hints(pl.Trainer),
                                        "max_steps": Planned[int, AUTO]})
    _check("optim.", cfg["optim"], {**_hints(SegAdaptModule), "warmup_steps": Planned[int, AUTO]})
    _check("loss.", cfg["loss"], _hints(DiceCELoss))


@dataclass(frozen=True)
class DataGroup:
    """A data group (``configs/data/*.yaml``: ``data`` and ``source``); `preprocess`: PreprocessConfig fields."""

    name: str
    dataset_json: str
    n_folds: int = 3
    split_seed: int = 0
    batch_size: Planned[int, AUTO] = 2
    volume_bins_ml: list[float] = field(default_factory=list)
    max_train_cases: Optional[int] = None
    splits_path: Optional[str] = None
    phantom: Optional[dict] = None
    preprocess: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PlanOptions:
    """``plan``: where plans are cached, and what they are planned for."""

    cache_dir: str
    memory_gb: float = 8.0
    base_filters: int = 32
    step_s: Optional[float] = None  # CPU trainer: seconds per training step the planned network is shrunk to
    measured_step_s: Optional[float] = None  # the planned network's step time instead of measuring it
    scheduled: list[str] = field(default_factory=list)  # the job keys the plan's schedule filled


@dataclass(frozen=True)
class Selection:
    """``selection``: model selection on an inner split of the training cases (0: off)."""

    inner_fraction: float = 0.0
    every_n_steps: Planned[Optional[int], AUTO] = None
    patience: Planned[Optional[int], AUTO] = None


@dataclass(frozen=True)
class PretrainOptions:
    """``pretrain``: the source pretraining of the base."""

    run_dir: str
    auto: bool = True
    fold: int = 0
    lr: float = 3e-3
    max_steps: Planned[int, AUTO] = 600


_NESTED = {"plan": PlanOptions, "selection": Selection, "pretrain": PretrainOptions}


@dataclass(frozen=True)
class TrainConfig:
    """A ``train`` / ``pretrain`` request: a composed ``configs/train.yaml``, its types checked
    (:meth:`from_cfg`); ``auto`` may stand where the plan decides. The groups handed on as arguments (model,
    adapter, data, source, trainer, optim, loss) stay mappings, typed by what receives them."""

    experiment: str
    run_dir: str
    base_checkpoint: str
    model: Mapping[str, Any]
    adapter: Mapping[str, Any]
    data: Mapping[str, Any]
    source: Mapping[str, Any]
    trainer: Mapping[str, Any]
    plan: PlanOptions
    pretrain: PretrainOptions
    selection: Selection = field(default_factory=Selection)
    optim: Mapping[str, Any] = field(default_factory=dict)
    loss: Mapping[str, Any] = field(default_factory=dict)
    paths: Mapping[str, Any] = field(default_factory=dict)
    fold: int = 0
    seed: int = 0
    ckpt_path: Optional[str] = None
    overwrite: bool = False
    eval_base: bool = True
    checkpoint_every: Optional[int] = 50
    threshold: float = 0.5

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | TrainConfig) -> TrainConfig:
        """The typed request of a resolved config (a plain mapping, e.g. ``OmegaConf.to_container(cfg,
        resolve=True)``); ValueError naming the first key whose value has the wrong type."""
        if isinstance(cfg, TrainConfig):
            return cfg
        hints = _hints(cls)
        _check("", {k: v for k, v in cfg.items() if k not in _NESTED}, hints)
        for name, kind in _NESTED.items():
            _check(f"{name}.", cfg.get(name) or {}, _hints(kind))
        _check_groups(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in cfg.items() if k in known}
        for name, kind in _NESTED.items():
            if name in values:
                values[name] = kind(**{k: v for k, v in (values[name] or {}).items()
                                       if k in {f.name for f in dataclasses.fields(kind)}})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The request as a plain mapping (what the plan's apply step reads and fills)."""
        return dataclasses.asdict(self)


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
        unplanned = [key for key, value in leaves({"module": self.module, "datamodule": self.datamodule,
                                                   "trainer": self.trainer}).items() if value == AUTO]
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
    :func:`~segadapt.plan.apply.apply_plan`); `dataset`: the absolute dataset.json it trains on; `plan`:
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
