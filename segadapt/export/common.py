"""What every export of a run folder shares (:mod:`segadapt.export.merged`, :mod:`~segadapt.export.bundle`,
:mod:`~segadapt.export.nnunet`): the run's network with its adapter loaded (:func:`load_run_for_export`), and the
refusal to write over the run's own files or the files it reads (:func:`check_targets`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from segadapt.models import model_spec
from segadapt.runs import ADAPTER_FILE, CONFIG_FILE, WEIGHTS_FILE, open_run
from segadapt.training.load import load_run

# ---- what an export may write over --------------------------------------------------------------
RUN_LOG_FOLDERS = ("logs", ".hydra")  # sub-folders of a run folder that are the run's own files


def run_files(run_dir: str | os.PathLike, config: Mapping[str, Any]) -> dict[Path, str]:
    """{file: what it is} of the files an export must never write over: the run's own (every file of the
    run folder: config.yaml, the weights, plan.json, fingerprint.json, ...) and the files the run reads
    (its base checkpoint, dataset.json, splits; an nnU-Net base folder's plans, dataset.json and checkpoint)."""
    run_dir = Path(run_dir)
    files = {path: "a file of the run folder" for folder in (run_dir, *(run_dir / f for f in RUN_LOG_FOLDERS))
             if folder.is_dir() for path in folder.iterdir() if path.is_file()}
    module, data = config.get("module") or {}, config.get("datamodule") or {}
    kwargs = module.get("model_kwargs") or {}
    read = {"the run's base checkpoint": module.get("base_checkpoint"),
            "the run's dataset.json": data.get("dataset_json"),
            "the run's splits file": data.get("splits_path")}
    if module.get("model"):
        read.update(model_spec(module["model"]).input_files(kwargs))
    files.update({Path(path): what for what, path in read.items() if path})
    return files


def _same_file(a: Path, b: Path) -> bool:
    """`a` and `b` are one file: the same path once resolved, or the same inode (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_targets(run_dir: str | os.PathLike, config: Mapping[str, Any], targets: Sequence[str | os.PathLike],
                  force: bool = False) -> None:
    """Refuse, before any work, to write a file of `targets` that is one of the run's files or inputs
    (:func:`run_files`; `force` or not), or that exists (unless `force`).

    Raises:
        ValueError: one line naming the file.
    """
    protected = run_files(run_dir, config)
    for target in map(Path, targets):
        found = next(((path, what) for path, what in protected.items() if _same_file(target, path)), None)
        if found is not None:
            raise ValueError(f"{target} is {found[1]} ({found[0]}); an export never writes over it, --force or not")
        if target.exists() and not force:
            raise ValueError(f"{target} exists; give --force to overwrite it")


def read_export_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's config, a ``config.yaml`` that is not YAML or has no ``module.model`` a ValueError
    naming it (instead of a parser traceback)."""
    config_path = Path(run_dir) / CONFIG_FILE
    try:
        config = open_run(run_dir)
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise ValueError(f"{config_path} is not readable YAML: {' '.join(str(error).split())}") from None
    if not isinstance(config.get("module"), dict) or "model" not in config["module"]:
        raise ValueError(f"{config_path} has no module.model (the network's name)")
    return config


def load_run_for_export(run_dir: str | os.PathLike, strict: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """(network with the run's adapter loaded, run config) of a run folder, every failure a ValueError or
    FileNotFoundError naming the file.

    :func:`segadapt.training.load.load_run`'s network (`strict`: see there), with a ``config.yaml`` that is not
    YAML or lacks a key reported as such instead of a parser traceback.
    """
    read_export_config(run_dir)
    if not any((Path(run_dir) / name).is_file() for name in (ADAPTER_FILE, WEIGHTS_FILE)):
        raise FileNotFoundError(f"run folder {run_dir} has neither {ADAPTER_FILE} nor {WEIGHTS_FILE}: nothing to export")
    module, config = load_run(run_dir, strict=strict)
    return module.net, config
