"""Run folders: train one fold (or pretrain a base) from a resolved config, and load a run back.

A run folder (``runs/<experiment>/<model>/<method>/fold<k>/`` from ``scripts/train.py``;
``runs/base/<source>_<model>/`` from ``scripts/pretrain.py``; ``trainer.default_root_dir`` from ``segadapt fit``,
:mod:`segadapt.training.lightning_cli`) holds::

    config.yaml           how to rebuild everything (format 'segadapt-run/1'):
                            run:        experiment, method, tuning, fold, seed, threads, run_dir
                            module:     SegAdaptModule arguments (model name + kwargs, absolute
                                        base_checkpoint, adapter spec or baseline, preset, optimiser,
                                        loss, volume bins, inference settings)
                            datamodule: SegDataModule arguments (absolute dataset_json, fold,
                                        n_folds, split_seed, the full preprocessing config, sampling)
                            trainer:    lightning.Trainer arguments
    plan.json             the dataset plan the ``auto`` settings came from (:mod:`segadapt.plan.apply`)
    fingerprint.json      the run's own dataset as :func:`segadapt.plan.fingerprint.fingerprint` describes it (spacing,
                          intensities, modality, labels); ``segadapt predict`` checks inputs against it
    metrics.json          final validation metrics of the fold (and of the untuned network), per case;
                          with model selection: ``val`` / ``cases`` of the selected network, ``val_last`` /
                          ``last_cases`` of the last one, ``selection`` (inner cases, inner-Dice curve,
                          selected step, ``below_base``) and ``base_inner_dice``; ``timing``: seconds of
                          the session's phases (:mod:`segadapt.training.timing`), which sum to its total
    adapter.safetensors   the trained adapter (adapter methods), or
    model.safetensors     the trained network's state dict (full / decoder / scratch, and pretraining);
                          the selected network where model selection ran
    last.ckpt             resumable Lightning checkpoint (``ckpt_path=last``): tensors, numbers, strings and plain
                          containers only, read back with ``torch.load(weights_only=True)``; carries a digest of
                          the settings it was trained with (:class:`~segadapt.training.callbacks.RunSettings`)
    .lock                 locked (``fcntl.flock``) by the training writing the folder; holds its pid
    logs/metrics.csv      training curves (CSV; TensorBoard events beside it when installed)
    .hydra/               Hydra's own record of the run (when started through Hydra)

:func:`load_run` rebuilds the tuned network from ``config.yaml`` + base checkpoint + the weights file.

:func:`fit_run` writes nothing before the run is known to be sound (:func:`check_run_folder`: a finished
folder is kept unless ``overwrite``, a resume needs its checkpoint and the folder's own settings, but for a
larger ``trainer.max_steps``, which trains on with the LR schedule rebuilt for the new total
(:class:`~segadapt.training.callbacks.LongerSchedule`); every case read and checked, the network built);
``logs/metrics.csv`` keeps the steps before a resume. From its first
write to ``metrics.json`` it holds the folder's lock: a second training into the folder is refused.
:func:`run_folder_action` decides what a ``train`` / ``pretrain`` request does with an existing folder: resume a
killed run (``last.ckpt``, no ``metrics.json``, no live lock, the same settings), skip a sweep's finished run
with the same settings, refuse the rest.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import math
import os
import pickle
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there
    fcntl = None

from segadapt.adapters import load_adapter
from segadapt.data import PreprocessConfig, load_dataset_json, make_phantom_dataset
from segadapt.data.config import parse_number, training_sampling
from segadapt.io import atomic_path, write_json
from segadapt.plan import Plan
from segadapt.plan.apply import AUTO, PLAN_FILE, apply_plan, planned_example, run_plan
from segadapt.plan.fingerprint import cache_fingerprint, fingerprint, load_or_make_fingerprint
from segadapt.data.transforms import flip_axes
from segadapt.models import load_pretrained

from .callbacks import (ADAPTER_FILE, TRAIN_STATS_KEYS, WEIGHTS_FILE, ExportWeights, PhaseTimes, RunSettings, SelectBest,
                        LongerSchedule, TrainStats, export_weights,
                        progress_callbacks, standard_error)
from .datamodule import SegDataModule
from .metrics import bin_labels, summarize
from .module import SegAdaptModule, check_classes, tuning_name
from .postprocessing import choose_postprocessing
from .sweep import BASE_SCORES, base_key
from .timing import LoopProfiler, RunClock, format_timing

log = logging.getLogger(__name__)

RUN_FORMAT = "segadapt-run/1"


@rank_zero_only
def report_summary(text: str) -> None:
    """The end-of-run summary to the console and the job's log: in a Hydra job a log record (Hydra's handlers
    write it to the console and to ``<run_dir>/<job name>.log``, e.g. ``train.log``); elsewhere printed."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        log.info(text)
    else:
        print(text)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "last.ckpt"
FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = ".lock"  # held (fcntl.flock) by the training that writes the folder; holds its pid
SKIP = "skip"  # check_request: a sweep's finished run with the requested settings is kept as it is


# ---- configuration ------------------------------------------------------------------------------
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
    leaves, reference = _leaves(cfg), _leaves(reference)
    for key in [k for k, v in reference.items() if v == AUTO]:  # the planned type; `auto` itself stays allowed
        reference[key] = None if leaves.get(key) == AUTO else planned_example(key)
    for key, expected in DECLARED_TYPES.items():
        reference.pop(key, None)
        if expected is not None and leaves.get(key) is not None:
            error = _type_error(key, leaves[key], expected)
            if error:
                raise ValueError(error)
    error = next(filter(None, (_type_error(k, leaves[k], v) for k, v in reference.items() if k in leaves)), None)
    if error:
        raise ValueError(error)


def prepare_dataset(data: Mapping[str, Any]) -> Path:
    """Absolute path of ``data.dataset_json``; writes the phantom described by ``data.phantom`` if absent."""
    path = Path(data["dataset_json"])
    if not path.exists():
        phantom = data.get("phantom")
        if not phantom:
            raise FileNotFoundError(f"dataset description not found: {path} (set data.dataset_json)")
        log.info("generating %s phantom cases of domain %r under %s", phantom["n"], phantom["domain"], path.parent)
        written = make_phantom_dataset(path.parent, **phantom)
        if written.resolve() != path.resolve():
            raise ValueError(f"a phantom dataset is written as <folder>/dataset.json, but data.dataset_json is {path}")
    return path.resolve()


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


# ---- running ------------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_yaml(path: Path, obj: Mapping[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        OmegaConf.save(OmegaConf.create(dict(obj)), tmp)
    return path


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.yaml`` of a run folder, checked for its format."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a segadapt run folder (no {CONFIG_FILE}): {Path(run_dir)}")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise ValueError(f"{path} is not a segadapt run config (format {RUN_FORMAT!r} expected)")
    return config


# Keys of config.yaml that do not change what a run computes: a resume may change them.
NON_IDENTITY_KEYS = frozenset({"run.run_dir", "datamodule.num_workers", "trainer.enable_progress_bar",
                               "trainer.enable_model_summary", "trainer.log_every_n_steps"})


def run_record(run_dir: Path, identity: Mapping[str, Any], module_kwargs: Mapping[str, Any],
               datamodule_kwargs: Mapping[str, Any], trainer_kwargs: Mapping[str, Any], seed: int,
               threads: int) -> dict[str, Any]:
    """The content of a run's ``config.yaml`` (as read back from YAML)."""
    record = {
        "format": RUN_FORMAT,
        "run": {**identity, "tuning": tuning_name(module_kwargs["adapter"]), "seed": seed, "threads": threads,
                "run_dir": str(run_dir)},
        "module": dict(module_kwargs),
        "datamodule": dict(datamodule_kwargs),
        "trainer": dict(trainer_kwargs),
    }
    return OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(OmegaConf.create(record))), resolve=True)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return {k: v for key, value in tree.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def run_changes(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``'key: old -> new'`` for every setting that differs between two run configs (NON_IDENTITY_KEYS aside)."""
    old, now = _leaves(stored), _leaves(new)
    missing = object()
    return [f"{key}: {old.get(key, missing)!r} -> {now.get(key, missing)!r}".replace(repr(missing), "(absent)")
            for key in sorted(set(old) | set(now))
            if key not in NON_IDENTITY_KEYS and old.get(key, missing) != now.get(key, missing)]


def added_steps(stored: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[int]:
    """The stored run config's ``trainer.max_steps`` when `new` asks for more steps (a resume trains on), else None."""
    old, now = (config.get("trainer", {}).get("max_steps") for config in (stored, new))
    return old if isinstance(old, int) and isinstance(now, int) and 0 < old < now else None


def resume_changes(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """:func:`run_changes` that a resume refuses: all but a larger ``trainer.max_steps`` (it trains on)."""
    changes = run_changes(stored, new)
    if added_steps(stored, new) is None:
        return changes
    return [change for change in changes if not change.startswith("trainer.max_steps:")]


def check_run_folder(run_dir: str | os.PathLike, record: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
                     ckpt_path: Optional[str] = None, overwrite: bool = False) -> None:
    """Refuse, before anything is written, a run that would silently lose or mix results in `run_dir`.

    A fresh run (``ckpt_path`` None) may not replace a finished run (``metrics.json`` present) unless
    `overwrite`. A resume needs its checkpoint, readable without unpickling code (:func:`read_resume_checkpoint`),
    and its settings (`record`, the config.yaml it would write, or a function computing it) must equal the
    folder's config.yaml up to :data:`NON_IDENTITY_KEYS` and a larger ``trainer.max_steps``
    (:func:`resume_changes`), and ``last.ckpt`` must have been written with the folder's config.yaml.
    """
    run_dir = Path(run_dir)
    if ckpt_path is None:
        if (run_dir / METRICS_FILE).exists() and not overwrite:
            raise FileExistsError(f"{run_dir} holds a finished run ({METRICS_FILE}); overwrite=true replaces it, "
                                  f"ckpt_path=last resumes it")
        return
    checkpoint = run_dir / CHECKPOINT_FILE if ckpt_path == "last" else Path(ckpt_path)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: nothing to resume, no checkpoint {checkpoint}")
    callbacks = read_resume_checkpoint(checkpoint).get("callbacks", {})
    stored = callbacks.get(RunSettings.__name__, {}).get("digest")
    if not (run_dir / CONFIG_FILE).is_file():
        if ckpt_path == "last":
            raise FileNotFoundError(f"ckpt_path=last: {run_dir} has {CHECKPOINT_FILE} but no {CONFIG_FILE}")
        return  # a new run folder started from another run's checkpoint
    record = record() if callable(record) else record
    config = read_run_config(run_dir)
    changes = resume_changes(config, record)
    if changes:
        raise ValueError(f"ckpt_path={ckpt_path}: these settings differ from the run in {run_dir}: {_shown(changes)}; "
                         "resume with the run's own settings, or start it anew (overwrite=true, or another run_dir)")
    longer = added_steps(config, record)
    if longer is not None and LongerSchedule.__name__ not in callbacks:
        raise ValueError(f"ckpt_path={ckpt_path}: {checkpoint} does not say how many steps its LR schedule was made "
                         f"for (written before resumes could add steps), so trainer.max_steps: {longer} -> "
                         f"{record['trainer']['max_steps']} is refused; resume it with its own max_steps")
    if ckpt_path == "last" and stored not in (None, settings_digest(config)):
        raise ValueError(f"ckpt_path=last: {checkpoint} was written by a training with other settings than "
                         f"{run_dir / CONFIG_FILE} (two trainings in one run folder?); start it anew with overwrite=true")


def _shown(changes: list[str]) -> str:
    return "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")


def settings_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 of a run config's settings (:data:`NON_IDENTITY_KEYS` aside): what :class:`RunSettings` keeps in
    ``last.ckpt``."""
    settings = {k: v for k, v in _leaves(record).items() if k not in NON_IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def read_resume_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint to resume from, read with ``torch.load(weights_only=True)``: tensors, numbers,
    strings and plain containers only (no allow-listed classes: what segadapt writes into ``last.ckpt`` needs
    none), so no code in the file can run. A file that needs more, or is no checkpoint: ValueError naming it."""
    path = Path(path)
    if not zipfile.is_zipfile(path):  # torch.save's format since torch 1.6, and what mmap needs
        raise ValueError(f"{path} is not a readable checkpoint: not a zip archive written by torch.save")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: tensors read lazily
    except pickle.UnpicklingError as error:
        raise _unsafe_checkpoint(path, error) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} is not a readable checkpoint: {str(error).splitlines()[0] if str(error) else error!r}") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step", "loops"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict, global_step and loops)")
    return checkpoint


def _unsafe_checkpoint(path: Path, error: pickle.UnpicklingError) -> ValueError:
    # torch's message goes on to advise allow-listing the class; keep the class it met
    detail = next((line.strip().split(" was not an allowed")[0] for line in str(error).splitlines()
                   if "Unsupported global" in line), type(error).__name__)
    return ValueError(f"refused to resume from {path}: it holds pickled objects other than tensors and plain "
                      f"containers, and unpickling them could run code ({detail})")


def check_not_in_use(run_dir: str | os.PathLike) -> None:
    """Raise (one line, with the holder's pid) when another training holds `run_dir`'s lock (:func:`run_folder_lock`).
    Writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(Path(run_dir), fd) from None
    finally:
        os.close(fd)  # releases the shared lock taken to test


def _in_use(run_dir: Path, fd: int) -> BlockingIOError:
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    return BlockingIOError(f"{run_dir} is in use by another training (pid {pid}); wait for it to end, or use "
                           "another run_dir")


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` while the block runs: ``fcntl.flock`` on its ``.lock`` file, which
    holds this process's pid. The kernel releases it when the process ends, kill -9 included; another
    training into the folder is refused (:func:`check_not_in_use`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)  # not O_TRUNC: the holder's pid stays readable
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir, fd) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def run_folder_action(run_dir: str | os.PathLike, record: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
                      ckpt_path: Optional[str] = None, overwrite: bool = False, sweep: bool = False) -> Optional[str]:
    """What a ``train`` / ``pretrain`` request does with its run folder, refused (one line) as
    :func:`check_run_folder` refuses, or when another training holds the folder. Returns the checkpoint to
    resume from (None: a fresh run) or :data:`SKIP`.

    Without ``ckpt_path`` and ``overwrite``: a killed run (``config.yaml`` and ``last.ckpt``, no
    ``metrics.json``, no live lock) is resumed (``'last'``) when its settings equal the requested ones, and
    refused otherwise; in a sweep (`sweep`), a finished run with the requested settings is skipped, while a
    single run into a finished folder stays refused (``overwrite=true`` replaces it)."""
    run_dir = Path(run_dir)
    if rank_zero_only.rank == 0:  # DDP: the other ranks start while rank 0 holds the folder
        check_not_in_use(run_dir)
    if ckpt_path is None and not overwrite and (run_dir / CONFIG_FILE).is_file():
        finished, killed = (run_dir / METRICS_FILE).is_file(), (run_dir / CHECKPOINT_FILE).is_file()
        if finished or killed:
            record = record() if callable(record) else record
            changes = run_changes(read_run_config(run_dir), record)
            if finished and sweep and not changes:
                return SKIP
            if not finished:
                if changes:
                    raise ValueError(f"{run_dir} holds a killed run ({CHECKPOINT_FILE}, no {METRICS_FILE}) with other "
                                     f"settings: {_shown(changes)}; rerun it with its own settings to resume it, or "
                                     "start it anew (overwrite=true, or another run_dir)")
                ckpt_path = "last"
    check_run_folder(run_dir, record, ckpt_path, overwrite)
    return ckpt_path


def in_sweep() -> bool:
    """Whether this is a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


class KeepLogHistory(pl.Callback):
    """Keeps the rows of ``logs/metrics.csv`` from before a resume: Lightning's CSVLogger deletes the file
    when it starts. The rows are written back at once, and at the start of training those of steps at or
    after the resumed step (logged after the checkpoint was saved) are dropped."""

    def __init__(self, logger: CSVLogger) -> None:
        fields, rows = _read_csv(Path(logger.log_dir) / "metrics.csv")  # before the logger starts and deletes it
        self.writer = logger.experiment
        self.path = Path(self.writer.metrics_file_path)
        if fields:
            _write_csv(self.path, fields, rows)
            self.writer.metrics_keys = sorted(set(self.writer.metrics_keys) | set(fields))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fields, rows = _read_csv(self.path)
        if not fields:
            return
        kept = [r for r in rows if not r.get("step") or float(r["step"]) < trainer.global_step]
        fields = sorted(set(fields) | set(self.writer.metrics_keys))
        _write_csv(self.path, fields, kept)
        self.writer.metrics_keys = fields


def make_trainer(run_dir: Path, args: Mapping[str, Any], checkpoint_every: Optional[int],
                 resume: bool = False) -> pl.Trainer:
    """A Trainer writing into `run_dir`: last.ckpt every `checkpoint_every` steps, CSV (+ TensorBoard) logs
    (``resume``: logs/metrics.csv keeps the rows of the steps before the checkpoint)."""
    csv_logger = CSVLogger(run_dir, name="logs", version="")
    loggers: list = [csv_logger]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(run_dir, name="logs", version=""))
    callbacks = [
        ModelCheckpoint(dirpath=run_dir, save_top_k=0, save_last=True, every_n_train_steps=checkpoint_every,
                        enable_version_counter=False),
        TrainStats(),
        PhaseTimes(),
        ExportWeights(str(run_dir)),
        *progress_callbacks(args),
    ]
    if resume and rank_zero_only.rank == 0:
        callbacks.append(KeepLogHistory(csv_logger))
    return pl.Trainer(default_root_dir=run_dir, logger=loggers, callbacks=callbacks,
                      **{"profiler": LoopProfiler(), **args})  # LoopProfiler: the phases of metrics.json's timing


def _stats(trainer: pl.Trainer) -> dict[str, Any]:
    return next(c.stats for c in trainer.callbacks if isinstance(c, TrainStats))


def _phase_times(trainer: pl.Trainer) -> PhaseTimes:
    return next(c for c in trainer.callbacks if isinstance(c, PhaseTimes))


# lightning.Trainer arguments that decide how the base is evaluated (device, precision), not how a run trains
_EVALUATION_TRAINER_KEYS = ("accelerator", "devices", "precision", "deterministic", "inference_mode")


def _base_scores(trainer: pl.Trainer, module_kwargs: Mapping[str, Any], datamodule: SegDataModule,
                 datamodule_kwargs: Mapping[str, Any], trainer_kwargs: Mapping[str, Any], val: bool,
                 inner: bool) -> tuple[Optional[list[dict]], Optional[float], float]:
    """(case rows on the fold's validation cases, inner-split Dice, seconds spent) of the unadapted base.

    Scored on the plain base network (built under a forked RNG, so the run's own initialisation is
    unchanged) by a Trainer without loggers, and kept in :data:`~segadapt.training.sweep.BASE_SCORES`: the
    next method on the same fold in this process reuses them. Under DDP the run's own trainer scores them
    (one process per run there, nothing to share)."""
    start = time.perf_counter()
    base: list[SegAdaptModule] = []

    def network() -> SegAdaptModule:
        if not base:
            with torch.random.fork_rng(devices=[]):
                base.append(SegAdaptModule(**{**module_kwargs, "adapter": "none"}))
        return base[0]

    distributed = trainer.world_size > 1
    scorers: list[pl.Trainer] = [trainer] if distributed else []

    def scorer() -> pl.Trainer:  # built on the first miss only
        if not scorers:
            scorers.append(pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                      enable_model_summary=False,
                                      **{k: v for k, v in trainer_kwargs.items() if k in _EVALUATION_TRAINER_KEYS}))
        return scorers[0]

    def scored(kind: str, score: Callable[[], Any]) -> Any:
        key = None if distributed else base_key(module_kwargs, datamodule_kwargs, torch.get_num_threads(), kind)
        return score() if key is None else BASE_SCORES.get_or_build(key, score)

    def validated() -> list[dict]:
        scorer().validate(network(), datamodule=datamodule, verbose=False)
        return network().case_rows

    cases = scored("val", validated) if val else None
    inner_dice = scored("inner", lambda: _inner_dice(scorer(), network(), datamodule)[0]) if inner else None
    return cases, inner_dice, 0.0 if distributed else time.perf_counter() - start  # DDP: in PhaseTimes


def _data_fingerprint(datamodule_kwargs: Mapping[str, Any], cache_dir: Optional[str | os.PathLike],
                      write: bool = True) -> dict:
    """The fingerprint of the run's dataset on the grid its preprocessing reads (orientation, dimensions);
    `write=False`: not cached yet (:func:`_cache_data_fingerprint`)."""
    preprocess = PreprocessConfig.from_dict(dict(datamodule_kwargs.get("preprocess") or {}))
    where = (datamodule_kwargs["dataset_json"], preprocess.orientation, preprocess.spatial_dims)
    if cache_dir is None:
        return fingerprint(where[0], orientation=where[1], spatial_dims=where[2])
    return load_or_make_fingerprint(where[0], cache_dir, *where[1:], write=write)


def _cache_data_fingerprint(fp: dict, datamodule_kwargs: Mapping[str, Any],
                            cache_dir: Optional[str | os.PathLike]) -> None:
    if cache_dir is not None:
        preprocess = PreprocessConfig.from_dict(dict(datamodule_kwargs.get("preprocess") or {}))
        cache_fingerprint(fp, cache_dir, preprocess.orientation, preprocess.spatial_dims)


def fit_run(
    run_dir: str | os.PathLike,
    identity: Mapping[str, Any],
    module_kwargs: Mapping[str, Any],
    datamodule_kwargs: Mapping[str, Any],
    trainer_kwargs: Mapping[str, Any],
    seed: int = 0,
    ckpt_path: Optional[str] = None,
    eval_base: bool = True,
    checkpoint_every: Optional[int] = None,
    callbacks: Optional[list[pl.Callback]] = None,
    overwrite: bool = False,
    plan: Optional[Plan] = None,
    patience: Optional[int] = None,
    started: Optional[float] = None,
    fingerprint_cache: Optional[str | os.PathLike] = None,
) -> dict[str, Any]:
    """Train (unless the tuning is 'none') and validate one run; write its folder; return ``metrics.json``'s dict.

    Nothing is written before the run is known to be sound: the folder is checked
    (:func:`check_run_folder`), every case read and checked, the network built.

    Model selection runs when the data module has an inner split (``inner_fraction`` > 0): the validations
    while fitting score the inner cases (:class:`SelectBest` keeps the best state), the last step is scored
    there too, and the fold's validation cases are scored for the last (``val_last``) and the selected
    network (``val``, the one saved).

    Args:
        identity: experiment, method, fold, ... (written under ``run`` in config.yaml and metrics.json).
        eval_base: also validate the network before tuning (``base_val`` in metrics.json).
        ckpt_path: ``'last'`` (or a path) resumes training from that Lightning checkpoint.
        callbacks: extra Lightning callbacks.
        overwrite: a fresh run may replace a finished one in `run_dir`.
        plan: the dataset plan the settings came from, written as ``plan.json``.
        patience: stop early after this many inner validations without improvement (Lightning
            ``EarlyStopping``); None: train all steps.
        fingerprint_cache: plan cache folder holding the dataset's fingerprint (made there when missing);
            None: the dataset is fingerprinted afresh. Written as ``fingerprint.json``.
        started: ``time.perf_counter()`` at which the run's setup began (default: now); metrics.json's
            ``timing`` splits the time since into the phases of :mod:`segadapt.training.timing`.

    The unadapted base's scores (``base_val``, ``base_inner_dice``) are those of the plain base network,
    shared by the runs of one process (:func:`_base_scores`).
    """
    clock = RunClock(started)
    clock.lap("startup_s")
    run_dir = Path(run_dir).resolve()
    tuning = tuning_name(module_kwargs["adapter"])
    record = run_record(run_dir, identity, module_kwargs, datamodule_kwargs, trainer_kwargs, seed,
                        torch.get_num_threads())
    main_process = rank_zero_only.rank == 0  # under DDP every rank runs this function; one writes the files
    if main_process:
        check_not_in_use(run_dir)
        check_run_folder(run_dir, record, ckpt_path, overwrite)
    # before the split file is written (a dataset no network can be planned for is refused); cached below
    data_fingerprint = _data_fingerprint(datamodule_kwargs, fingerprint_cache, write=False) if main_process else None
    datamodule = SegDataModule(**datamodule_kwargs)
    datamodule.setup("fit")  # reads and checks the cases (memory cache: every case) before the folder is touched
    pl.seed_everything(seed, workers=True, verbose=False)  # the seed is in config.yaml
    module = SegAdaptModule(**module_kwargs)
    with run_folder_lock(run_dir) if main_process else nullcontext():  # until metrics.json is written
        if main_process:  # again, under the lock: another training may have finished here since the check
            check_run_folder(run_dir, record, ckpt_path, overwrite)
            _cache_data_fingerprint(data_fingerprint, datamodule_kwargs, fingerprint_cache)
            if ckpt_path is None:  # a fresh run: no results of an earlier run may outlive a crash of this one
                for stale in (METRICS_FILE, ADAPTER_FILE, WEIGHTS_FILE, CHECKPOINT_FILE, "logs/metrics.csv"):
                    (run_dir / stale).unlink(missing_ok=True)
            else:  # a resume rewrites the weights: until its metrics.json, the folder is an unfinished run
                (run_dir / METRICS_FILE).unlink(missing_ok=True)
            write_yaml(run_dir / CONFIG_FILE, record)
            if plan is not None:
                plan.to_json(run_dir / PLAN_FILE)
            write_json(run_dir / FINGERPRINT_FILE, data_fingerprint)
        trainer = make_trainer(run_dir, trainer_kwargs, checkpoint_every, resume=ckpt_path is not None)
        longer = LongerSchedule()
        for callback in [RunSettings(settings_digest(record)), longer, *(callbacks or [])]:
            trainer.callbacks.append(callback)
        selector, stopper = None, None
        if tuning != "none" and datamodule_kwargs.get("inner_fraction"):
            selector = SelectBest()
            trainer.callbacks.append(selector)
            if patience is not None:
                stopper = EarlyStopping(monitor="val/dice", mode="max", patience=int(patience))
                trainer.callbacks.append(stopper)

        phases = _phase_times(trainer)
        clock.lap("setup_s")
        base_cases, base_inner_dice, _ = _base_scores(
            trainer, module_kwargs, datamodule, datamodule_kwargs, trainer_kwargs,
            val=tuning == "none" or (eval_base and tuning != "scratch"), inner=selector is not None and tuning != "scratch")
        clock.lap("base_scores_s")
        if tuning == "none":
            module.case_rows = list(base_cases)
        if tuning != "none":
            validation_before = phases.validation_s  # DDP: the base was scored by this trainer
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # no code runs on load
            except pickle.UnpicklingError as error:  # the checkpoint was replaced since it was checked
                raise _unsafe_checkpoint(run_dir / CHECKPOINT_FILE if ckpt_path == "last" else Path(ckpt_path), error) from None
            if trainer.interrupted:
                raise RuntimeError(f"training of {run_dir} was interrupted; resume with ckpt_path=last")
            clock.lap("lightning_s")
            clock.split_fit(phases.train_steps_s, phases.validation_s - validation_before, trainer.profiler)
            trainer.save_checkpoint(run_dir / CHECKPOINT_FILE, weights_only=False)
            clock.lap("checkpoints_s")
            if selector is not None and (not selector.curve or selector.curve[-1]["step"] != trainer.global_step):
                dice, se = _inner_dice(trainer, module, datamodule)
                selector.record(trainer.global_step, dice, module, se)
            trainer.validate(module, datamodule=datamodule, verbose=False)
            clock.lap("validation_s")
        last_cases = module.case_rows
        if selector is not None and selector.best_step not in (None, trainer.global_step):
            selector.restore(module)
            trainer.validate(module, datamodule=datamodule, verbose=False)
            clock.lap("validation_s")
            if main_process:
                export_weights(module, run_dir)  # replaces the last network's file that ExportWeights wrote
            clock.lap("checkpoints_s")
        cases = module.case_rows
        bins = module.bins
        result = {
            "format": "segadapt-metrics/1",
            "run": {**identity, "tuning": tuning, "seed": seed},
            "val": summarize(cases, bins),  # the raw prediction's; postprocessing.dice: with the chosen postprocessing
            "postprocessing": choose_postprocessing(module.component_counts),
            "val_last": summarize(last_cases, bins),
            "base_inner_dice": base_inner_dice,
            "selection": None if selector is None else {
                "inner_cases": datamodule.inner_case_ids,
                "curve": selector.curve,
                "selected_step": selector.best_step,
                "selected_dice": selector.best_score,
                "stopped_early": stopper is not None and stopper.wait_count >= stopper.patience,
                "below_base": (None not in (base_inner_dice, selector.best_score)
                               and selector.best_score < base_inner_dice),
            },
            "base_val": None if base_cases is None or tuning == "none" else summarize(base_cases, bins),
            "volume_bins_ml": list(bins),
            "size_unit": datamodule.size_unit,  # of volume_bins_ml and the cases' pred_ml / true_ml
            "volume_bins": bin_labels(bins, datamodule.size_unit),
            "cost": {"trainable_params": module.trainable_params, "threads": torch.get_num_threads(),
                     **(_stats(trainer) if tuning != "none" else {})},
            "global_step": trainer.global_step,
            "extended_from_steps": longer.extended_from,  # a resume with more steps: the max_steps it had
            "cases": cases,
            "last_cases": last_cases,
            "base_cases": None if tuning == "none" else base_cases,
        }
        clock.lap("results_s")
        result["timing"] = clock.as_dict()  # seconds of this session (a resumed run: of the resumed part)
        missing = [k for k in TRAIN_STATS_KEYS if tuning != "none" and k not in result["cost"]]
        if missing:  # no metrics.json with holes (a resume whose checkpoint lacks figures must not write one)
            raise RuntimeError(f"{run_dir}: training figures {missing} are missing; {METRICS_FILE} not written")
        if main_process:
            write_json(run_dir / METRICS_FILE, _finite(result))
        return result


def _inner_dice(trainer: pl.Trainer, module: SegAdaptModule, datamodule: SegDataModule) -> tuple[float, float]:
    """(mean Dice, its standard error) of the module's current network on the inner validation cases."""
    with datamodule.inner_validation():
        trainer.validate(module, datamodule=datamodule, verbose=False)
    summary = summarize(module.case_rows, module.bins)
    return summary["dice"], standard_error(summary["dice_sd"], summary["n_cases"])


def ensure_base(cfg: Mapping[str, Any]) -> Path:
    """The base checkpoint of ``cfg``; pretrains it on ``cfg.source`` first when missing and ``pretrain.auto``."""
    base = Path(cfg["base_checkpoint"])
    if base.is_file():
        return base.resolve()
    if not cfg["pretrain"]["auto"]:
        raise FileNotFoundError(f"base checkpoint not found: {base}; run scripts/pretrain.py or set pretrain.auto=true")
    pretrained = Path(cfg["pretrain"]["run_dir"]) / WEIGHTS_FILE
    if base.resolve() != pretrained.resolve():
        raise FileNotFoundError(f"base checkpoint not found: {base}; pretraining (pretrain.auto) would write "
                                f"{pretrained} instead, so it is not started")
    log.info("no base checkpoint at %s: pretraining on %s first", base, cfg["source"]["name"])
    pretrain(cfg)
    return base.resolve()


def _fit_args(cfg: Mapping[str, Any], kind: str, dataset: Path) -> dict[str, Any]:
    """:func:`fit_run` arguments of a ``train`` or ``pretrain`` job (`dataset`: its absolute dataset.json)."""
    if kind == "pretrain":
        source, settings = cfg["source"], cfg["pretrain"]
        in_channels = SegDataModule(str(dataset), preprocess=dict(source["preprocess"])).in_channels
        return {
            "run_dir": settings["run_dir"],
            "identity": {"experiment": "pretrain", "method": "scratch", "fold": settings["fold"], "dataset": source["name"]},
            "module_kwargs": module_args(cfg, source, in_channels, None, {"spec": "scratch", "lr": settings["lr"]}),
            "datamodule_kwargs": datamodule_args(cfg, source, dataset, settings["fold"]),
            "trainer_kwargs": trainer_args(cfg, max_steps=settings["max_steps"]),
            "seed": cfg["seed"],
        }
    data, adapter = cfg["data"], cfg["adapter"]
    base = None if tuning_name(adapter["spec"]) == "scratch" else Path(cfg["base_checkpoint"]).resolve()
    in_channels = SegDataModule(str(dataset), preprocess=dict(data["preprocess"])).in_channels
    return {
        "run_dir": cfg["run_dir"],
        "identity": {"experiment": cfg["experiment"], "method": adapter["name"], "fold": cfg["fold"], "dataset": data["name"]},
        "module_kwargs": module_args(cfg, data, in_channels, base, adapter),
        "datamodule_kwargs": datamodule_args(cfg, data, dataset, cfg["fold"]),
        "trainer_kwargs": trainer_args(cfg),
        "seed": cfg["seed"],
    }


def _existing_dataset(data: Mapping[str, Any]) -> Path:
    """Absolute path of ``data.dataset_json``, which must exist (a check writes no phantom)."""
    path = Path(data["dataset_json"])
    if not path.is_file():
        raise FileNotFoundError(f"dataset description not found: {path} (set data.dataset_json)")
    return path.resolve()


def check_request(cfg: Mapping[str, Any], kind: str = "train", sweep: Optional[bool] = None) -> Optional[str]:
    """Refuse a ``train`` / ``pretrain`` job before it writes anything (data, base, run folder): threads,
    an existing dataset.json, and the run folder (:func:`run_folder_action`: in use, finished run, resume).
    A resume compares the run's config.yaml with the request planned as train / pretrain plan it (its ``auto``
    values filled from the plan, :func:`~segadapt.plan.apply.apply_plan`), so `cfg` may hold ``auto``.
    Returns what the job does: :data:`SKIP`, or the checkpoint it resumes from (None: a fresh run).
    `sweep`: the job is part of a ``-m`` sweep (None: ask Hydra, :func:`in_sweep`)."""
    data = cfg["source"] if kind == "pretrain" else cfg["data"]
    threads = cfg["trainer"].get("threads")
    configure_threads(threads)
    dataset = Path(data["dataset_json"])
    if dataset.is_file():
        check_classes(cfg["model"]["kwargs"].get("out_channels", 1), load_dataset_json(dataset))
    ckpt_path = None if kind == "pretrain" else cfg["ckpt_path"]

    def record() -> dict[str, Any]:  # the config.yaml the job would write: planned, as train / pretrain plan it
        if not dataset.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: dataset description not found: {dataset}")
        pretraining = kind == "pretrain"
        planned = apply_plan(cfg, run_plan(cfg, pretraining, prepare=_existing_dataset), show=False,
                             pretraining=pretraining)
        args = _fit_args(planned, kind, dataset.resolve())
        return run_record(Path(args.pop("run_dir")).resolve(), threads=torch.get_num_threads(), **args)

    run_dir = cfg["pretrain"]["run_dir"] if kind == "pretrain" else cfg["run_dir"]
    sweep = in_sweep() if sweep is None else sweep
    return run_folder_action(run_dir, record, ckpt_path, bool(cfg.get("overwrite", False)), sweep)


def _kept_or_resumed(run_dir: str | os.PathLike, action: Optional[str], ckpt_path: Optional[str]) -> Optional[dict]:
    """For :data:`SKIP`, the finished run's metrics (one line says so); for a killed run resumed without
    ``ckpt_path`` one line saying so; None otherwise."""
    if action == SKIP:
        report_summary(f"skipped {run_dir}: a finished run with these settings ({METRICS_FILE}); overwrite=true "
                       "trains it again")
        return read_metrics(run_dir)
    if action is not None and ckpt_path is None:
        report_summary(f"resuming {run_dir} from its {CHECKPOINT_FILE}: it was stopped before it finished "
                       f"(no {METRICS_FILE})")
    return None


def pretrain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Full training of the network from random init on the source dataset (``cfg.source``), holding out
    fold ``pretrain.fold`` for validation; writes ``<pretrain.run_dir>/model.safetensors``, the base."""
    plan = run_plan(cfg, pretraining=True, prepare=prepare_dataset)
    cfg = apply_plan(cfg, plan, pretraining=True)
    action = check_request(cfg, "pretrain", sweep=False)  # a finished base is kept, never skipped unseen
    kept = _kept_or_resumed(cfg["pretrain"]["run_dir"], action, None)
    if kept is not None:
        return kept
    result = fit_run(**_fit_args(cfg, "pretrain", prepare_dataset(cfg["source"])), ckpt_path=action,
                     checkpoint_every=cfg["checkpoint_every"], overwrite=bool(cfg.get("overwrite", False)), plan=plan,
                     patience=_selection(cfg).get("patience"), fingerprint_cache=cfg["plan"]["cache_dir"])
    report_summary(f"pretrained base on {cfg['source']['name']}: source-fold Dice {result['val']['dice']:.3f} "
                    f"-> {Path(cfg['pretrain']['run_dir']) / WEIGHTS_FILE}")
    return result


def train(cfg: Mapping[str, Any], callbacks: Optional[list[pl.Callback]] = None,
          started: Optional[float] = None) -> dict[str, Any]:
    """One fold of one method from a resolved ``configs/train.yaml`` config (what ``scripts/train.py`` runs);
    `started`: the ``time.perf_counter()`` its setup counts from (default: now)."""
    started = time.perf_counter() if started is None else started
    plan = run_plan(cfg, pretraining=False, prepare=prepare_dataset)
    cfg = apply_plan(cfg, plan)
    action = check_request(cfg, "train")  # before the base is pretrained or the run folder touched
    kept = _kept_or_resumed(cfg["run_dir"], action, cfg["ckpt_path"])
    if kept is not None:
        return kept
    args = _fit_args(cfg, "train", prepare_dataset(cfg["data"]))
    if tuning_name(cfg["adapter"]["spec"]) != "scratch":
        ensure_base(cfg)
    result = fit_run(**args, ckpt_path=action, eval_base=cfg["eval_base"],
                     checkpoint_every=cfg["checkpoint_every"], callbacks=callbacks,
                     overwrite=bool(cfg.get("overwrite", False)), plan=plan,
                     patience=_selection(cfg).get("patience"), started=started,
                     fingerprint_cache=cfg["plan"]["cache_dir"])
    report_summary(format_result(result, cfg["run_dir"]))
    return result


def format_result(result: Mapping[str, Any], run_dir: str | os.PathLike) -> str:
    """The lines printed at the end of a run: Dice and HD95 of the tuned and the untuned network."""
    run = result["run"]
    val, base, cost = result["val"], result["base_val"], result["cost"]
    length = "px" if result.get("size_unit") == "px" else "mm"  # HD95 of images without a pixel spacing
    lines = [f"\n{run['experiment']} / {run['method']} / fold {run['fold']}: {int(val['n_cases'])} validation volumes"]
    for name, m in (("unadapted base", base), (run["method"], val)):
        if m is not None:
            missed = f" ({int(m['hd95_undefined'])} with an empty mask)" if m["hd95_undefined"] else ""
            lines.append(f"  {name:<15}: Dice {m['dice']:.3f} +- {m['dice_sd']:.3f}   HD95 {m['hd95']:.1f} {length}{missed}"
                         f"   volume r = {m['volume_corr']:.2f}")
    selection = result.get("selection")
    if selection is not None and selection["selected_step"] is not None:
        last = result["val_last"]
        base_inner = result.get("base_inner_dice")
        stop = ", stopped early" if selection["stopped_early"] else ""
        lines.append(f"  model selection: step {selection['selected_step']} of {result['global_step']}{stop}, "
                     f"inner-split Dice {selection['selected_dice']:.3f} ({len(selection['inner_cases'])} inner cases)"
                     + ("" if base_inner is None else f", unadapted base {base_inner:.3f}")
                     + f"; last step on the validation cases: Dice {last['dice']:.3f}")
        if selection["below_base"]:
            lines.append(f"  WARNING: the selected network's inner-split Dice {selection['selected_dice']:.3f} is "
                         f"below the unadapted base's {base_inner:.3f}: training did not help on this fold")
    if "train_time_s" in cost:
        threads = f"{cost['threads']} thread" + ("s" if cost["threads"] > 1 else "")
        lines.append(f"  trainable parameters {cost['trainable_params']:,}, training {cost['train_time_s']:.0f} s "
                     f"({cost['train_steps']} steps, {threads}), peak memory {cost['peak_mem_mb']:.0f} MB ({cost['memory']})")
    timing = result.get("timing")
    if timing:
        lines.append(f"  {format_timing(timing)}")
    lines.append(f"  run folder: {run_dir}")
    return "\n".join(lines)


def load_run(run_dir: str | os.PathLike, strict: bool = True) -> tuple[SegAdaptModule, dict[str, Any]]:
    """(tuned module in eval mode, run config) rebuilt from a finished run folder's files only (:func:`open_run`).

    The module is built from ``config.yaml`` (base checkpoint loaded, the adapter injected at its
    zero-update initialisation), then the run's ``adapter.safetensors`` or ``model.safetensors`` is
    loaded into it. ``PreprocessConfig.from_dict(config['datamodule']['preprocess'])`` is the
    preprocessing, ``module.predict_probabilities(image)`` the whole-volume prediction. `strict` goes to
    ``load_adapter`` (False: an adapter made on a base with the same modules but other weights loads with a warning).
    """
    run_dir = Path(run_dir)
    config = open_run(run_dir)
    module = SegAdaptModule(**config["module"])
    adapter_file, weights_file = run_dir / ADAPTER_FILE, run_dir / WEIGHTS_FILE
    if adapter_file.is_file():
        load_adapter(module.net, adapter_file, strict=strict)
    elif weights_file.is_file():
        load_pretrained(module.net, weights_file)
    elif module.tuning != "none":
        raise FileNotFoundError(f"run folder {run_dir} has neither {ADAPTER_FILE} nor {WEIGHTS_FILE} (unfinished run?)")
    return module.eval(), config


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``metrics.json`` of a finished run; FileNotFoundError (unfinished run) or ValueError naming the folder.

    :func:`fit_run` writes it last, after the selected network's weights: a folder without it holds the weights
    of some training step (the last one written before the run stopped), not the run's result."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"run folder {run_dir} is unfinished (no {METRICS_FILE}: its training was stopped "
                                "or is still running, so its weights are not the run's result); resume it "
                                "(ckpt_path=last) or train it again")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"run folder {run_dir}: {METRICS_FILE} is not readable JSON ({error})") from None
    if not isinstance(metrics, dict) or not str(metrics.get("format", "")).startswith("segadapt-metrics/"):
        raise ValueError(f"run folder {run_dir}: {METRICS_FILE} is not a segadapt metrics file (no 'format': "
                         "'segadapt-metrics/...')")
    return metrics


def open_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.yaml`` of a finished run folder (:func:`read_metrics` refuses an unfinished one).

    Every command that uses a run's weights (predict, export, bundle, diagnose, :func:`load_run`) opens the
    run with this, so none of them uses the weights of a run that did not finish."""
    config = read_run_config(run_dir)
    read_metrics(run_dir)
    return config
