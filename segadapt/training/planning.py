"""The plan decides: every ``auto`` value of a run config is taken from one dataset plan.

A run config (``configs/train.yaml``) may say ``auto`` for

* ``<data group>.preprocess.<field>``: the fields :meth:`Plan.preprocess_fields` decides (``intensity`` and
  its statistics, ``target_spacing``, ``orientation``, ``spatial_dims``, ``patch_size``, ``slice_size``);
* ``<data group>.batch_size``: the plan's batch (patches, or slices, per step) / ``samples_per_volume``;
* ``model.kwargs.<key>``: the keys :meth:`Plan.network_fields` gives for the model (DynUNet ``kernel_size``,
  ``strides``, ``upsample_kernel_size``, ``filters``; UNet ``channels``, ``strides``).

Any other value is the config's own and overrides the plan (``data.preprocess.patch_size=[32,48,32]``, no
``+`` needed). Which dataset is planned: the one the network is first trained on, so that a pretrained base
and every run adapting it see the same network and the same preprocessing (as nnU-Net transfers plans):

* pretraining: the source dataset (``cfg.source``);
* a run on segadapt's own pretrained base (``base_checkpoint`` in ``pretrain.run_dir``; also ``scratch``
  beside it, so that it trains the same network): the base's ``plan.json``, else the source's plan;
* a run on a base checkpoint of the user's: the run's own dataset (``cfg.data``);
* ``model=nnunet`` (pretraining included): the nnU-Net plans of ``model.kwargs.results``
  (:func:`segadapt.models.nnunet.plan_from_nnunet`: the spacing, normalisation, patch and network the
  nnU-Net network was trained with), its orientation read from the run's data.

The plan is printed, written as ``plan.json`` into the run folder, and its values are in ``config.yaml``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from segadapt.data import PreprocessConfig, load_dataset_json
from segadapt.data.config import MODE_FIELDS
from segadapt.data.plan import Plan, dataset_spatial_dims, format_plan, load_or_make_plan

from .datamodule import training_sampling

log = logging.getLogger(__name__)

AUTO = "auto"
PLAN_FILE = "plan.json"
rank_zero_print = rank_zero_only(print)


def _data_group_plan(data: Mapping[str, Any], dataset_json: Path, options: Mapping[str, Any]) -> Plan:
    preprocess = data.get("preprocess") or {}
    spatial_dims = preprocess.get("spatial_dims", 3)
    spatial_dims = dataset_spatial_dims(load_dataset_json(dataset_json)) if spatial_dims in (None, AUTO) \
        else int(spatial_dims)
    orientation = preprocess.get("orientation")
    return load_or_make_plan(
        dataset_json, options["cache_dir"],
        orientation="RAS"[:spatial_dims] if orientation in (None, AUTO) else orientation,
        spatial_dims=spatial_dims,
        memory_gb=float(options["memory_gb"]), base_filters=int(options["base_filters"]),
    )


def run_plan(cfg: Mapping[str, Any], pretraining: bool, prepare) -> Plan:
    """The plan that decides `cfg` (see the module docstring); `prepare(data_group) -> dataset.json path`."""
    options = cfg["plan"]
    if cfg["model"]["name"] == "nnunet":
        from segadapt.models.nnunet import plan_from_nnunet, read_results

        kwargs = cfg["model"]["kwargs"]
        model = read_results(kwargs["results"], kwargs.get("configuration", "3d_fullres"), kwargs.get("fold", 0))
        return plan_from_nnunet(model, prepare(cfg["source"] if pretraining else cfg["data"]))
    own_base = Path(cfg["base_checkpoint"]).resolve().parent == Path(cfg["pretrain"]["run_dir"]).resolve()
    if pretraining or own_base:
        stored = Path(cfg["pretrain"]["run_dir"]) / PLAN_FILE
        if not pretraining and stored.is_file():
            return Plan.from_json(stored)
        return _data_group_plan(cfg["source"], prepare(cfg["source"]), options)
    return _data_group_plan(cfg["data"], prepare(cfg["data"]), options)


# What the plan puts where a config file says `auto` (a value of the planned type, for the type check of
# overrides: segadapt.training.run.check_config_types); the preprocessing fields take their defaults' types.
_PLANNED_EXAMPLES = {"target_spacing": [1.0], "clip_range": [[0.0, 1.0]], "norm_mean": [0.0], "norm_std": [1.0],
                     "batch_size": 2, "out_channels": 1}


def planned_example(key: str) -> Any:
    """A value of the type the plan gives config key `key` (``data.preprocess.patch_size``: a list of ints), or None
    when any value may stand there (e.g. the nested lists of ``model.kwargs.strides``)."""
    name = key.rsplit(".", 1)[-1]
    if name in _PLANNED_EXAMPLES:
        return _PLANNED_EXAMPLES[name]
    defaults = PreprocessConfig()
    return getattr(defaults, name, None) if ".preprocess." in f".{key}" else None


def _fill(section: dict[str, Any], planned: Mapping[str, Any], where: str) -> list[str]:
    """Replace each ``auto`` value of `section` by the planned one; returns the names that were pinned."""
    pinned = []
    for key, value in section.items():
        if value == AUTO:
            if key not in planned:
                raise ValueError(f"{where}.{key}=auto, but the plan does not decide {key!r} "
                                 f"(it decides {sorted(planned)}); give a value")
            section[key] = copy.deepcopy(planned[key])
        elif key in planned and value != planned[key]:
            pinned.append(f"{where}.{key}={value} (plan: {planned[key]})")
    return pinned


def _mode_statistics(preprocess: dict[str, Any], plan: Plan) -> None:
    """The plan's statistics of its intensity mode (``clip_range``, ``norm_mean``, ``norm_std`` of 'ct_zscore',
    ``background_value`` of 'zscore', ``windows`` of 'ct') come with that mode: when the config's intensity is
    the plan's, each one the config leaves out is the plan's. (A generic config, ``configs/data/dataset_json.yaml``,
    names only ``intensity: auto``: without this its 'ct_zscore' had no statistics and its 'zscore' no background.)
    """
    if preprocess.get("intensity") == plan.intensity:
        planned = plan.preprocess_fields()
        for name in MODE_FIELDS.get(plan.intensity, ()):
            preprocess.setdefault(name, copy.deepcopy(planned[name]))


def apply_plan(cfg: Mapping[str, Any], plan: Plan, data_keys: tuple[str, ...] = ("data", "source"),
               show: bool = True) -> dict[str, Any]:
    """A copy of `cfg` with every ``auto`` value taken from `plan` (see the module docstring).

    Prints (`show`) the plan and the values the config pins against it.
    """
    cfg = copy.deepcopy(dict(cfg))
    pinned: list[str] = []
    model = cfg["model"]
    networks = plan.network_fields()
    pinned += _fill(model["kwargs"], networks.get(model["name"], {}), "model.kwargs")
    for key in data_keys:
        data = cfg[key]
        preprocess = data["preprocess"]
        if model["name"] == "nnunet":  # its plans decide every field the config leaves out (orientation too)
            for name in plan.preprocess_fields():
                preprocess.setdefault(name, AUTO)
        pinned += _fill(preprocess, plan.preprocess_fields(), f"{key}.preprocess")
        _mode_statistics(preprocess, plan)
        if data.get("batch_size") == AUTO:
            per_step = plan.slice_batch_size if training_sampling(model, preprocess) == "slice" else plan.batch_size
            data["batch_size"] = max(1, per_step // int(preprocess.get("samples_per_volume", 1)))
    if not show:
        return cfg
    _print_once(f"plan of {plan.dataset} ({plan.n_cases} cases):\n{format_plan(plan)}")
    if pinned:
        _print_once("set by the config instead of the plan:\n  " + "\n  ".join(pinned))
    return cfg


_printed: set[str] = set()  # what apply_plan printed in this process: the runs of a sweep share their plans


def _print_once(text: str) -> None:
    """Print `text` (on rank zero) unless this process printed it before."""
    if text not in _printed:
        _printed.add(text)
        rank_zero_print(text)
