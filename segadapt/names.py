"""Default names of run folders, from the data: the OmegaConf resolver ``dataset_name`` of ``configs/``.

``configs/data/dataset_json.yaml`` names its data group ``${dataset_name:${.dataset_json}}``: the dataset.json's
``name`` made folder-safe (:func:`folder_safe`), else its folder's name. The run folders
(``runs/<experiment>/<model>/<method>/fold<k>``, ``runs/base/<source>_<model>``) and Hydra's sweep folders are
interpolated from it when the config is composed, before any job starts.

The resolver is registered when ``segadapt`` is imported (``segadapt/__init__.py``): every process that composes
or resolves these configs imports it first, a Slurm job of a ``-m`` sweep included (Hydra resolves the job's
output folder in the worker, which imports segadapt when it unpickles the sweep's callback).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

RESOLVER = "dataset_name"
FALLBACK = "dataset"


def folder_safe(text: str) -> str:
    """`text` as one folder name: every run of characters other than letters, digits, ``.``, ``_``, ``-``
    becomes ``_``; leading / trailing ``.``, ``_``, ``-`` go (no hidden folder, no ``..``); '' stays ''."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")


def dataset_name(dataset_json: str | os.PathLike) -> str:
    """The folder-safe ``name`` of a dataset.json; its folder's name when the file is absent or unreadable or
    names nothing usable (the file's own errors are reported where it is loaded); ``dataset`` as a last resort."""
    path = Path(dataset_json)
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    safe = folder_safe(name) if isinstance(name, str) else ""
    return safe or folder_safe(path.absolute().parent.name) or FALLBACK


def register_resolvers() -> None:
    """Register :func:`dataset_name` as the OmegaConf resolver ``dataset_name`` (once per process)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda path: dataset_name(str(path)))
