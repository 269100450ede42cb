"""A ``model=nnunet`` run written back as an nnU-Net v2 trained-model folder (``segadapt export --nnunet``).

The folder holds the base folder's ``plans.json`` and ``dataset.json`` and ``fold_<k>/checkpoint_final.pth``
with the run's network, every adapter merged (:mod:`segadapt.models.nnunet` reads and writes the files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segadapt.adapters import merge_and_unload
from segadapt.data.config import canonical
from segadapt.io import write_json
from segadapt.export.common import check_targets
from segadapt.models.nnunet import (DATASET_FILE, NNUNET_CHECKPOINT_FILE, PLANS_FILE, build_network, read_results,
                                    write_checkpoint)
from segadapt.plan.nnunet import plan_from_nnunet
from segadapt.training.load import load_run


def _same_json(path: Path, value: Any) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(value))
    except (OSError, ValueError):
        return False


def nnunet_targets(config: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """The files :func:`export_nnunet` of a run with this config would write in `out_dir`: the fold's checkpoint,
    and plans.json / dataset.json unless they are already the base folder's (several folds go into one folder).

    Raises:
        ValueError: the run's model is not ``nnunet``.
    """
    module_args = config["module"]
    if module_args["model"] != "nnunet":
        raise ValueError(f"model {module_args['model']!r}; only model=nnunet runs export to nnU-Net's format")
    kwargs, out_dir = module_args.get("model_kwargs") or {}, Path(out_dir)
    results = Path(kwargs.get("results") or ".")
    shared = [out_dir / name for name in (PLANS_FILE, DATASET_FILE)
              if not (results / name).is_file() or not _same_json(out_dir / name, json.loads((results / name).read_bytes()))]
    return [*shared, out_dir / f"fold_{int(kwargs.get('fold', 0))}" / NNUNET_CHECKPOINT_FILE]


def export_nnunet(run_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the merged network of an ``model=nnunet`` run as an nnU-Net trained-model folder.

    ``out_dir`` gets the base folder's ``plans.json`` and ``dataset.json`` and
    ``fold_<k>/checkpoint_final.pth`` (:func:`write_checkpoint`) holding the run's network with every adapter
    merged (nnU-Net's own key names; it loads into a fresh network of the plans with plain
    ``load_state_dict``). ``nnUNetv2_predict -d ... ``/``nnUNetPredictor.initialize_from_trained_model_folder``
    read it as any trained-model folder.

    Raises:
        ValueError: the run's model is not ``nnunet``, or the run pinned preprocessing against the plans
            (the folder would describe another preprocessing than the network was tuned with).
            Also: `out_dir` holds a checkpoint for this fold and not `overwrite`.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    module, config = load_run(run_dir)
    module_args = config["module"]
    if module_args["model"] != "nnunet":
        raise ValueError(f"{run_dir}: model {module_args['model']!r}; only model=nnunet runs export to nnU-Net's format")
    kwargs = module_args["model_kwargs"]
    base = read_results(kwargs["results"], kwargs.get("configuration", "3d_fullres"), kwargs.get("fold", 0))
    planned = plan_from_nnunet(base, config["datamodule"]["dataset_json"]).preprocess_fields()
    used = config["datamodule"]["preprocess"]
    differs = [f"{k}={used.get(k)} (plans: {v})" for k, v in planned.items()
               if k not in ("slice_size",) and canonical(used.get(k), 6) != canonical(v, 6)]
    if differs:
        raise ValueError(f"{run_dir}: the run's preprocessing differs from {base.folder / PLANS_FILE}: "
                         f"{'; '.join(differs)}; nnU-Net would feed the network other inputs")
    target = out_dir / f"fold_{base.fold}" / NNUNET_CHECKPOINT_FILE
    if target.exists() and not overwrite:
        raise ValueError(f"{target} exists; remove it (or overwrite=True) to replace it")
    check_targets(run_dir, config, nnunet_targets(config, out_dir), force=overwrite)  # never the base's own files
    network = merge_and_unload(module.net)
    fresh = build_network(base.config["architecture"], base.in_channels, base.num_classes)
    fresh.load_state_dict(network.state_dict())  # strict: nnU-Net's keys exactly
    for name, value in ((PLANS_FILE, base.plans), (DATASET_FILE, base.dataset)):
        if not _same_json(out_dir / name, value):  # the folder of another fold keeps its files untouched
            write_json(out_dir / name, value)
    write_checkpoint(target, fresh.state_dict(), base.plans, base.dataset, base.configuration, base.fold,
                     epoch=int(config.get("trainer", {}).get("max_steps", 0) or 0))
    return out_dir


