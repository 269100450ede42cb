"""The plan decides: every ``auto`` value of a run config is taken from one dataset plan.

A run config (``configs/train.yaml``) may say ``auto`` for

* ``<data group>.preprocess.<field>``: the fields :meth:`Plan.preprocess_fields` decides (``intensity`` and
  its statistics, ``target_spacing``, ``orientation``, ``spatial_dims``, ``patch_size``, ``slice_size``);
* ``<data group>.batch_size``: the plan's batch (patches, or slices, per step) / ``samples_per_volume``;
* ``<data group>.preprocess.samples_per_volume``: the samples that tile a volume (at least 1; a patch
  as large as the volume: 1), at most the plan's batch;
* ``model.kwargs.<key>``: the keys :meth:`Plan.network_fields` gives for the model (DynUNet ``kernel_size``,
  ``strides``, ``upsample_kernel_size``, ``filters``; UNet ``channels``, ``strides``);
* ``model=auto`` (the model group of ``data=dataset_json``: ``model.planned``, named ``dynunet``, the network it
  chooses, so that its run folders are): the base's own architecture, read from the base file's metadata
  (``model``: name and arguments) when ``base_checkpoint`` is such a file; else the plan's DynUNet (3D, or 2D on a 2D dataset), sized by the compute budget (:mod:`segadapt.plan.budget`:
  on a CPU trainer the planned network is measured once and shrunk to ``plan.step_s`` seconds per step);
* ``trainer.max_steps``, ``pretrain.max_steps``, ``optim.warmup_steps``, ``selection.every_n_steps``,
  ``selection.patience``: the schedule of :mod:`segadapt.plan.schedule` (the job's own: a pretraining gets
  the source's).

Any other value is the config's own and overrides the plan (``data.preprocess.patch_size=[32,48,32]``, no
``+`` needed). Which dataset is planned: the one the network is first trained on, so that a pretrained base
and every run adapting it see the same network and the same preprocessing (as nnU-Net transfers plans):

* pretraining: the source dataset (``cfg.source``);
* a run on segadapt's own pretrained base (``base_checkpoint`` in ``pretrain.run_dir``; also ``scratch``
  beside it, so that it trains the same network): the base's ``plan.json``, else the source's plan;
* a run on a base file that has segadapt's ``plan.json`` beside it (a base folder or a run folder of segadapt's
  given as ``base_checkpoint=<file>``, wherever it lies): that ``plan.json``, as for the own base (no source
  check: the base's plan names its dataset);
* a run on a base checkpoint of the user's: the run's own dataset (``cfg.data``);
* ``model=nnunet`` (pretraining included): the nnU-Net plans of ``model.kwargs.results``
  (:func:`segadapt.plan.nnunet.plan_from_nnunet`: the spacing, normalisation, patch and network the
  nnU-Net network was trained with), its orientation read from the run's data.

The plan is printed, written as ``plan.json`` into the run folder, and its values are in ``config.yaml``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from segadapt.data.config import MODE_FIELDS, training_sampling
from segadapt.data.dataset_json import dataset_spatial_dims, load_dataset_json

from .budget import TIMED_STEPS, cached_step_time, fit_step_budget, measure_step
from .fingerprint import fingerprint_folder
from .planner import Plan, format_plan, load_or_make_plan
from .schedule import PASSES, StepSchedule, coverage, fold_training_cases, planned_steps

log = logging.getLogger(__name__)

AUTO = "auto"
PLAN_FILE = "plan.json"
rank_zero_print = rank_zero_only(print)


def _data_group_plan(cfg: Mapping[str, Any], data: Mapping[str, Any], dataset_json: Path,
                     pretraining: bool) -> Plan:
    options, preprocess = cfg["plan"], data.get("preprocess") or {}
    spatial_dims = preprocess.get("spatial_dims", 3)
    spatial_dims = dataset_spatial_dims(load_dataset_json(dataset_json)) if spatial_dims in (None, AUTO) \
        else int(spatial_dims)
    orientation = preprocess.get("orientation")
    orientation = "RAS"[:spatial_dims] if orientation in (None, AUTO) else orientation
    plan = load_or_make_plan(dataset_json, options["cache_dir"], orientation=orientation, spatial_dims=spatial_dims,
                             memory_gb=float(options["memory_gb"]), base_filters=int(options["base_filters"]))
    model = planned_model(cfg, pretraining)
    if not _budget_applies(cfg, model):
        return plan
    folder = fingerprint_folder(dataset_json, options["cache_dir"], orientation, spatial_dims)
    return step_budget_plan(plan, model, cfg, folder)


def _budget_applies(cfg: Mapping[str, Any], model: Mapping[str, Any]) -> bool:
    """The CPU step budget sizes the planned DynUNet on a CPU trainer. (Whatever the config pins: the plan of a
    base, which the runs adapting it reuse, must not depend on whether it was made from a raw or a planned config.)"""
    return (model["name"] == "dynunet" and cfg["trainer"].get("accelerator", "cpu") == "cpu"
            and cfg["plan"].get("step_s") is not None)


def step_budget_plan(plan: Plan, model: Mapping[str, Any], cfg: Mapping[str, Any], folder: Path) -> Plan:
    """`plan` shrunk to ``plan.step_s`` (:func:`~segadapt.plan.budget.fit_step_budget`). The planned network's
    step time is ``plan.measured_step_s`` when given (tests), else measured once and cached in `folder`."""
    network = {**{k: v for k, v in model["kwargs"].items() if k not in plan.network_fields()["dynunet"]},
               **plan.network_fields()["dynunet"]}
    for key in ("in_channels", "spatial_dims"):  # given by the plan at the measurement
        network.pop(key, None)
    threads = int(cfg["trainer"].get("threads") or 1)
    measured = cfg["plan"].get("measured_step_s")
    if measured is None:
        key = {"network": network, "in_channels": len(plan.modality), "patch": plan.patch_size,
               "batch": plan.batch_size, "threads": threads, "method": f"fastest of {TIMED_STEPS} at batch 2"}
        measured = cached_step_time(folder, key, lambda: _measure(network, len(plan.modality), plan, threads))
    shrunk, _ = fit_step_budget(plan, float(cfg["plan"]["step_s"]), float(measured))
    return shrunk


def _measure(network: Mapping[str, Any], in_channels: int, plan: Plan, threads: int) -> float:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_step(network, in_channels, plan.patch_size, plan.batch_size)
    finally:
        torch.set_num_threads(before)


def planned_model(cfg: Mapping[str, Any], pretraining: bool = False) -> dict[str, Any]:
    """The run's model group: ``cfg.model`` unless the plan chooses it (``model=auto``, ``model.planned``; see
    the module docstring)."""
    model = copy.deepcopy(dict(cfg["model"]))
    if not model.get("planned"):
        return model
    base = Path(cfg["base_checkpoint"])
    stored = None if pretraining or not base.is_file() else base_architecture(base)
    if stored is not None:
        if stored["name"] != model["name"]:
            raise ValueError(f"model=auto: the base {base} holds a {stored['name']} network; choose its model "
                             f"group: model={stored['name']}")
        kept = {k: v for k, v in stored["kwargs"].items() if k not in ("in_channels", "out_channels")}
        model["kwargs"] = {**model["kwargs"], **kept}
    return model


def base_architecture(path: Path) -> dict[str, Any] | None:
    """``{"name", "kwargs"}`` of the network in a segadapt weights file (its metadata ``model``), else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            text = (handle.metadata() or {}).get("model")
    except Exception:  # not a safetensors file (an nnU-Net checkpoint, a .pt): no recorded architecture
        return None
    return json.loads(text) if text else None


def run_plan(cfg: Mapping[str, Any], pretraining: bool, prepare) -> Plan:
    """The plan that decides `cfg` (see the module docstring); `prepare(data_group) -> dataset.json path`."""
    if cfg["model"]["name"] == "nnunet":
        from segadapt.models.nnunet import read_results
        from segadapt.plan.nnunet import plan_from_nnunet

        kwargs = cfg["model"]["kwargs"]
        model = read_results(kwargs["results"], kwargs.get("configuration", "3d_fullres"), kwargs.get("fold", 0))
        return plan_from_nnunet(model, prepare(cfg["source"] if pretraining else cfg["data"]))
    if pretraining:
        return _data_group_plan(cfg, cfg["source"], prepare(cfg["source"]), pretraining)
    base = Path(cfg["base_checkpoint"] or "").resolve()
    own_base = base.parent == Path(cfg["pretrain"]["run_dir"]).resolve()
    stored = base.parent / PLAN_FILE  # segadapt's base (or run) given as a file has it beside it too
    if not (own_base or (base.is_file() and stored.is_file())):
        return _data_group_plan(cfg, cfg["data"], prepare(cfg["data"]), pretraining)  # a base of the user's
    prepare(cfg["data"])  # the run's own cases decide its schedule (segadapt.plan.schedule)
    if not stored.is_file():  # the own base, not pretrained yet: the source's plan, as its pretraining will make
        return _data_group_plan(cfg, cfg["source"], prepare(cfg["source"]), pretraining)
    plan = Plan.from_json(stored)
    return _base_plan_of_source(plan, stored, cfg["source"]) if own_base else plan


def _base_plan_of_source(plan: Plan, stored: Path, source: Mapping[str, Any]) -> Plan:
    """`plan`, the stored plan of segadapt's own base; ValueError when the source dataset is another one than the
    base was pretrained on (two datasets of one name share ``runs/base/<source.name>_<model>``)."""
    path = Path(source["dataset_json"])
    if path.is_file():
        description = load_dataset_json(path)
        if (description.name, len(description.cases)) != (plan.dataset, plan.n_cases):
            raise ValueError(f"the base in {stored.parent} was pretrained on {plan.dataset!r} ({plan.n_cases} cases), "
                             f"not on source.dataset_json {path} ({description.name!r}, {len(description.cases)} "
                             "cases): give the source another source.name (or base_checkpoint)")
    return plan


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
               show: bool = True, pretraining: bool = False) -> dict[str, Any]:
    """A copy of `cfg` with every ``auto`` value taken from `plan` (see the module docstring); `pretraining`:
    the schedule keys are the pretraining job's.

    Prints (`show`) the plan, the schedule and the values the config pins against it.
    """
    cfg = copy.deepcopy(dict(cfg))
    pinned: list[str] = []
    chosen_by_plan = bool(cfg["model"].get("planned"))
    model = cfg["model"] = planned_model(cfg, pretraining)
    if chosen_by_plan and plan.spatial_dims == 2:
        model["kwargs"]["spatial_dims"] = 2
    networks = plan.network_fields()
    pinned += _fill(model["kwargs"], networks.get(model["name"], {}), "model.kwargs")
    for key in data_keys:
        data = cfg[key]
        preprocess = data["preprocess"]
        if model["name"] == "nnunet":  # its plans decide every field the config leaves out (orientation too)
            for name in plan.preprocess_fields():
                preprocess.setdefault(name, AUTO)
        tile = preprocess.get("samples_per_volume") == AUTO  # decided below, from the filled sample size
        pinned += _fill(preprocess, {**plan.preprocess_fields(), **({"samples_per_volume": AUTO} if tile else {})},
                        f"{key}.preprocess")
        _mode_statistics(preprocess, plan)
        slices = training_sampling(model, preprocess) == "slice"
        per_step = plan.slice_batch_size if slices else plan.batch_size
        if tile:  # as many as tile a volume, at most a step's
            sample = preprocess["slice_size"] if slices else preprocess["patch_size"]
            preprocess["samples_per_volume"] = min(per_step, round(coverage(plan.median_shape, sample)))
        if data.get("batch_size") == AUTO:
            data["batch_size"] = max(1, per_step // int(preprocess.get("samples_per_volume", 1)))
    scheduled = _apply_schedule(cfg, plan, pretraining)
    if not show:
        return cfg
    _print_once(f"plan of {plan.dataset} ({plan.n_cases} cases):\n{format_plan(plan)}")
    if chosen_by_plan:
        _print_once(f"model=auto: {model['name']} {model['kwargs']}")
    if scheduled:
        _print_once("schedule (segadapt.plan.schedule):\n  " + "\n  ".join(scheduled))
    if pinned:
        _print_once("set by the config instead of the plan:\n  " + "\n  ".join(pinned))
    return cfg


# The keys the schedule of the running job decides: filled where a config says `auto`, and listed in
# ``plan.scheduled`` so that a pretraining started from a planned run config (ensure_base) re-plans them.
JOB_KEYS = (("optim", "warmup_steps"), ("selection", "every_n_steps"), ("selection", "patience"))


def _apply_schedule(cfg: dict[str, Any], plan: Plan, pretraining: bool) -> list[str]:
    """Fill ``trainer.max_steps`` / ``pretrain.max_steps`` and the job's :data:`JOB_KEYS` (module docstring);
    returns one line per job saying how its steps came about."""
    lines = []
    for job, key, section in (("train", "data", cfg["trainer"]), ("pretrain", "source", cfg["pretrain"])):
        if section.get("max_steps") == AUTO:
            steps = _job_steps(cfg, cfg[key], plan, pretraining=job == "pretrain")
            if steps is not None:  # None: its dataset is not there yet (a pretraining before the target's phantom)
                section["max_steps"], line = steps
                lines.append(f"{job}.max_steps={section['max_steps']}: {line}")
    steps = cfg["pretrain" if pretraining else "trainer"]["max_steps"]
    if steps == AUTO:
        return lines
    planned = StepSchedule.of(int(steps))
    scheduled = list(cfg["plan"].get("scheduled") or [])
    for group, name in JOB_KEYS:
        where = f"{group}.{name}"
        if cfg[group].get(name) == AUTO or where in scheduled:
            cfg[group][name] = getattr(planned, name)
            scheduled = sorted({*scheduled, where})
    if scheduled:
        cfg["plan"]["scheduled"] = scheduled
        lines.append(f"{'pretrain' if pretraining else 'train'} job of {steps} steps: " +
                     ", ".join(f"{w}={getattr(planned, w.split('.')[1])}" for w in scheduled))
    return lines


def _job_steps(cfg: Mapping[str, Any], data: Mapping[str, Any], plan: Plan, pretraining: bool):
    """(planned max_steps, how) of a job on data group `data`, or None when its dataset.json is not there."""
    path = Path(data["dataset_json"])
    if not path.is_file():
        return None
    inner = float((cfg.get("selection") or {}).get("inner_fraction") or 0.0)
    fold = int(cfg["pretrain"]["fold"] if pretraining else cfg["fold"])
    cases = fold_training_cases(path, int(data["n_folds"]), int(data.get("split_seed", 0)), fold, inner,
                                data.get("max_train_cases"), data.get("splits_path"))
    n_train = cases.trained
    preprocess = data["preprocess"]
    slices = training_sampling(cfg["model"], preprocess) == "slice"
    sample = preprocess["slice_size"] if slices else preprocess["patch_size"]
    per_volume = coverage(plan.median_shape, sample)
    per_step = int(data["batch_size"]) * int(preprocess.get("samples_per_volume", 1))
    steps = planned_steps(n_train, per_volume, per_step, pretraining)
    return steps, (f"ceil({PASSES} passes x {cases.describe()} x {per_volume:.3g} "
                   f"{'slices' if slices else 'patches'} per volume (median shape {plan.median_shape}) / {per_step} per step), at least "
                   f"{'MIN_PRETRAIN_STEPS' if pretraining else 'MIN_STEPS'}")


_printed: set[str] = set()  # what apply_plan printed in this process: the runs of a sweep share their plans


def _print_once(text: str) -> None:
    """Print `text` (on rank zero) unless this process printed it before."""
    if text not in _printed:
        _printed.add(text)
        rank_zero_print(text)
