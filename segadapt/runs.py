"""The run-folder format: every file a run folder holds, its stored config, resume identity, checks and lock.

A run folder (``runs/<experiment>/<model>/<method>/fold<k>/`` from ``scripts/train.py``;
``runs/base/<source>_<model>/`` from ``scripts/pretrain.py``; ``trainer.default_root_dir`` from ``segadapt fit``,
:mod:`segadapt.training.lightning_cli`) holds::

    config.yaml           the planned run config (:class:`segadapt.training.config.RunConfig`; format 'segadapt-run/1'):
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
                          setup, training steps and validation of the session, and its total
    adapter.safetensors   the trained adapter (adapter methods), or
    model.safetensors     the trained network's state dict (full / decoder / scratch, and pretraining);
                          the selected network where model selection ran
    last.ckpt             resumable Lightning checkpoint (``ckpt_path=last``): tensors, numbers, strings and plain
                          containers only, read back with ``torch.load(weights_only=True)``; carries a digest of
                          the settings it was trained with (:class:`~segadapt.training.callbacks.RunSettings`)
    .lock                 locked (``fcntl.flock``) by the training writing the folder; holds its pid
    logs/metrics.csv      training curves (CSV; TensorBoard events beside it when installed)
    .hydra/               Hydra's own record of the run (when started through Hydra)

An **ensemble folder** (``segadapt auto``'s ``<model>/auto/fold<k>/`` when an ensemble of trials was chosen) holds
no config.yaml and no weights but ``ensemble.json`` (format 'segadapt-ensemble/1': ``members``, the member run
folders relative to it, each an ordinary run folder adapting the same base) and a ``metrics.json`` of the mean of
the members' probabilities; :func:`ensemble_members` reads it, ``segadapt predict --run`` expands it into its
members (:func:`expand_ensembles`), the commands that need one network refuse it naming the members.

:func:`segadapt.training.load.load_run` rebuilds the tuned network from ``config.yaml`` + base checkpoint + the
weights file; :func:`open_run` is how every command that uses a run's weights opens the folder.

Nothing is written before a run is known to be sound (:func:`check_run_folder`: a finished folder is kept unless
``overwrite``, a resume needs its checkpoint and the folder's own settings, but for a larger
``trainer.max_steps``, which trains on with the LR schedule rebuilt for the new total
(:class:`~segadapt.training.callbacks.LongerSchedule`)). From its first write to ``metrics.json`` a training
holds the folder's lock (:func:`run_folder_lock`): a second training into the folder is refused.
:func:`run_folder_action` decides what a ``train`` / ``pretrain`` request does with an existing folder: resume a
killed run (``last.ckpt``, no ``metrics.json``, no live lock, the same settings), skip a sweep's finished run
with the same settings, refuse the rest.

No Lightning and no network here: reading a run's files needs neither.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there
    fcntl = None

from segadapt.io import atomic_path, write_json

RUN_FORMAT = "segadapt-run/1"
METRICS_FORMAT = "segadapt-metrics/1"
ENSEMBLE_FORMAT = "segadapt-ensemble/1"
ENSEMBLE_FILE = "ensemble.json"  # an ensemble folder's member list (no config.yaml there)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "last.ckpt"  # the resumable Lightning checkpoint
FINGERPRINT_FILE = "fingerprint.json"
ADAPTER_FILE = "adapter.safetensors"
WEIGHTS_FILE = "model.safetensors"
LOG_FILE = "logs/metrics.csv"
LOCK_FILE = ".lock"  # held (fcntl.flock) by the training that writes the folder; holds its pid
SKIP = "skip"  # run_folder_action: a sweep's finished run with the requested settings is kept as it is
# The keys under which last.ckpt keeps the state of segadapt's callbacks (Lightning's state key: the class name):
# RunSettings (the digest of the settings) and LongerSchedule (the max_steps it was trained for).
SETTINGS_STATE = "RunSettings"
SCHEDULE_STATE = "LongerSchedule"

def finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value



def write_metrics(run_dir: Path, metrics: Mapping[str, Any]) -> Path:
    """Write a run's ``metrics.json`` (NaN / inf as null)."""
    return write_json(Path(run_dir) / METRICS_FILE, finite(dict(metrics)))


def write_yaml(path: Path, obj: Mapping[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        OmegaConf.save(OmegaConf.create(dict(obj)), tmp)
    return path


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.yaml`` of a run folder, checked for its format."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file() and (Path(run_dir) / ENSEMBLE_FILE).is_file():
        members = ensemble_members(run_dir)
        raise ValueError(f"{Path(run_dir)} is an ensemble of {len(members)} runs ({ENSEMBLE_FILE}), not one network: "
                         f"give one of its members ({', '.join(map(str, members))}); segadapt predict --run takes "
                         "the ensemble")
    if not path.is_file():
        raise FileNotFoundError(f"not a segadapt run folder (no {CONFIG_FILE}): {Path(run_dir)}")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise ValueError(f"{path} is not a segadapt run config (format {RUN_FORMAT!r} expected)")
    return config


def ensemble_members(run_dir: str | os.PathLike) -> list[Path]:
    """The member run folders of an ensemble folder (its ``ensemble.json``), each checked to be a run folder."""
    path = Path(run_dir) / ENSEMBLE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(record, dict) or record.get("format") != ENSEMBLE_FORMAT \
            or not isinstance(record.get("members"), list) or not record["members"]:
        raise ValueError(f"{path} is not a segadapt ensemble file (format {ENSEMBLE_FORMAT!r} with members)")
    members = [Path(run_dir) / str(m) for m in record["members"]]
    missing = [m for m in members if not (m / CONFIG_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: member {missing[0]} is not a run folder (no {CONFIG_FILE})")
    return members


def expand_ensembles(run_dirs: list[Path]) -> list[Path]:
    """`run_dirs` with each ensemble folder replaced by its members."""
    return [m for r in run_dirs for m in (ensemble_members(r) if (Path(r) / ENSEMBLE_FILE).is_file()
                                          and not (Path(r) / CONFIG_FILE).is_file() else [Path(r)])]


# Keys of config.yaml that do not change what a run computes: a resume may change them.
NON_IDENTITY_KEYS = frozenset({"run.run_dir", "datamodule.num_workers", "trainer.enable_progress_bar",
                               "trainer.enable_model_summary", "trainer.log_every_n_steps"})


def run_record(run_dir: Path, identity: Mapping[str, Any], tuning: str, module_kwargs: Mapping[str, Any],
               datamodule_kwargs: Mapping[str, Any], trainer_kwargs: Mapping[str, Any], seed: int,
               threads: int) -> dict[str, Any]:
    """The content of a run's ``config.yaml`` (as read back from YAML); `tuning`: the baseline or adapter method."""
    record = {
        "format": RUN_FORMAT,
        "run": {**identity, "tuning": tuning, "seed": seed, "threads": threads,
                "run_dir": str(run_dir)},
        "module": dict(module_kwargs),
        "datamodule": dict(datamodule_kwargs),
        "trainer": dict(trainer_kwargs),
    }
    return OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(OmegaConf.create(record))), resolve=True)


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return {k: v for key, value in tree.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def run_changes(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``'key: old -> new'`` for every setting that differs between two run configs (NON_IDENTITY_KEYS aside)."""
    old, now = leaves(stored), leaves(new)
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
    stored = callbacks.get(SETTINGS_STATE, {}).get("digest")
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
    if longer is not None and SCHEDULE_STATE not in callbacks:
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
    settings = {k: v for k, v in leaves(record).items() if k not in NON_IDENTITY_KEYS}
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
        raise unsafe_checkpoint(path, error) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} is not a readable checkpoint: {str(error).splitlines()[0] if str(error) else error!r}") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step", "loops"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict, global_step and loops)")
    return checkpoint


def unsafe_checkpoint(path: Path, error: pickle.UnpicklingError) -> ValueError:
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
                      ckpt_path: Optional[str] = None, overwrite: bool = False, sweep: bool = False,
                      check_lock: bool = True) -> Optional[str]:
    """What a ``train`` / ``pretrain`` request does with its run folder, refused (one line) as
    :func:`check_run_folder` refuses, or when another training holds the folder. Returns the checkpoint to
    resume from (None: a fresh run) or :data:`SKIP`.

    Without ``ckpt_path`` and ``overwrite``: a killed run (``config.yaml`` and ``last.ckpt``, no
    ``metrics.json``, no live lock) is resumed (``'last'``) when its settings equal the requested ones, and
    refused otherwise; in a sweep (`sweep`), a finished run with the requested settings is skipped, while a
    single run into a finished folder stays refused (``overwrite=true`` replaces it). `check_lock`: False on the
    DDP ranks but the first, which start while rank 0 holds the folder."""
    run_dir = Path(run_dir)
    if check_lock:
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
    if not isinstance(metrics, dict) or not str(metrics.get("format", "")).startswith(METRICS_FORMAT.split("/")[0] + "/"):
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

