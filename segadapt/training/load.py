"""A run's tuned network, rebuilt from its run folder's files: the one place a run's network is built."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from segadapt.adapters import load_adapter
from segadapt.models import load_pretrained
from segadapt.runs import ADAPTER_FILE, CONFIG_FILE, WEIGHTS_FILE, open_run

from .module import SegAdaptModule


def load_run(run_dir: str | os.PathLike, strict: bool = True) -> tuple[SegAdaptModule, dict[str, Any]]:
    """(tuned module in eval mode, run config) rebuilt from a finished run folder's files only
    (:func:`segadapt.runs.open_run`).

    The module is built from ``config.yaml`` (base checkpoint loaded, the adapter injected at its
    zero-update initialisation), then the run's ``adapter.safetensors`` or ``model.safetensors`` is
    loaded into it; `strict` goes to ``load_adapter`` (False: an adapter made on a base with the same modules
    but other weights loads with a warning). ``PreprocessConfig.from_dict(config['datamodule']['preprocess'])``
    is the preprocessing, ``module.predict_probabilities(image)`` the whole-volume prediction.
    """
    run_dir = Path(run_dir)
    config = open_run(run_dir)
    try:
        module = SegAdaptModule(**config["module"])
    except (KeyError, TypeError) as error:  # a config.yaml edited by hand, or of another version
        raise ValueError(f"{run_dir / CONFIG_FILE} does not describe a run's network: {type(error).__name__}: "
                         f"{error}") from None
    adapter_file, weights_file = run_dir / ADAPTER_FILE, run_dir / WEIGHTS_FILE
    if adapter_file.is_file():
        load_adapter(module.net, adapter_file, strict=strict)
    elif weights_file.is_file():
        load_pretrained(module.net, weights_file)
    elif module.tuning != "none":
        raise FileNotFoundError(f"run folder {run_dir} has neither {ADAPTER_FILE} nor {WEIGHTS_FILE} (unfinished run?)")
    return module.eval(), config
