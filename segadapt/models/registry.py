"""The model registry: one :class:`ModelSpec` per network, registered by the network's own file.

A spec holds everything the rest of segadapt needs to know about a network, so that no other module
branches on a model's name or class: the builder, how training samples volumes, the adapter presets, the
head modules, the model arguments a dataset plan fills, and how a MONAI bundle rebuilds the network.
Adding a model is one network file (it calls :func:`register`) and one ``configs/model/<name>.yaml``.

A model file outside segadapt registers a spec named after its module (``ModelSpec(name=__name__, ...)``);
``model.name`` in a config is then that module's (dotted) name, imported on first use, as Hydra imports a
``_target_`` (the module must be importable: on ``sys.path`` / ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

SEGADAPT_BUILDER = "segadapt.models.build_model"
"""A bundle ``network_def`` target that rebuilds the network with segadapt itself (no plain MONAI class)."""
SAMPLINGS = ("slice", "patch")


def no_modules(model: nn.Module) -> list[str]:
    return []


@dataclass(frozen=True)
class ModelSpec:
    """What segadapt knows about one network (see the module docstring).

    Attributes:
        name: the model's name (``model.name`` of a config, ``configs/model/<name>.yaml``).
        build: the builder; keyword arguments are ``model.kwargs`` (``in_channels`` set from the data).
        network_types: the classes ``build`` returns (presets and heads of a built network are found by class).
        sampling: how training draws samples from volumes: ``'slice'`` (a 2D network: 2D slices, predicted
            slice by slice) or ``'patch'`` (3D patches); 2D image datasets are always sampled in patches.
        presets: network -> {preset name: names of the layers an adapter wraps} (:mod:`segadapt.models.presets`).
        heads: network -> names of the modules whose shapes follow the class count; None: none known (a base
            with another class count is refused by the strict load).
        train_modules: network -> modules an adapter trains in full when its config names none.
        plan_fields: dataset plan (:class:`segadapt.plan.planner.Plan`) -> the model arguments it decides; None:
            the plan decides none.
        bundle_network: the MONAI bundle's ``network_def`` target: a plain MONAI network class, or
            :data:`SEGADAPT_BUILDER`; None: the network cannot be rebuilt from a bundle alone.
        bundle_kwargs: the builder's arguments (defaults filled in) -> the MONAI class's; None: the same.
        multi_view: the network takes slices with their views (``forward(slices, views)``) and predicts whole
            volumes itself (``predict_volume(volume, slice_batch_size)``, probabilities).
        own_checkpoint: the builder loads its own pretrained file (``checkpoint`` goes to it).
        input_files: model arguments -> {what: path} of the files the network is built from beside the base
            checkpoint (an nnU-Net folder's plans), which an export must not overwrite.
    """

    name: str
    build: Callable[..., nn.Module]
    network_types: tuple[type, ...]
    sampling: str
    presets: Callable[[nn.Module], dict[str, list[str]]]
    heads: Optional[Callable[[nn.Module], list[str]]] = None
    train_modules: Callable[[nn.Module], list[str]] = no_modules
    plan_fields: Optional[Callable[[Any], dict]] = None
    bundle_network: Optional[str] = SEGADAPT_BUILDER
    bundle_kwargs: Optional[Callable[[dict], dict]] = None
    multi_view: bool = False
    own_checkpoint: bool = False
    input_files: Callable[[Mapping[str, Any]], dict[str, Path]] = lambda kwargs: {}

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"model {self.name!r}: sampling must be one of {SAMPLINGS}, got {self.sampling!r}")


MODELS: dict[str, ModelSpec] = {}
"""Registered models, by name."""


def register(spec: ModelSpec) -> ModelSpec:
    """Add `spec` to :data:`MODELS`; another spec under a name already taken is refused."""
    known = MODELS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"model {spec.name!r} is already registered (builder {known.build!r})")
    MODELS[spec.name] = spec
    return spec


def model_spec(name: str) -> ModelSpec:
    """The spec of model `name`; a name not registered yet is imported as a module first (it registers itself).

    Raises:
        ValueError: no module of that name, or one that registers no model `name` (the message lists the models).
    """
    if name not in MODELS and all(part.isidentifier() for part in str(name).split(".")):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if not (name == error.name or name.startswith(f"{error.name}.")):
                raise  # the model's module exists but lacks one of its own imports
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)} (or a module that registers "
                         "a ModelSpec of its own name)")
    return MODELS[name]


def spec_of(model: nn.Module) -> Optional[ModelSpec]:
    """The spec whose ``network_types`` holds `model`'s class (an exact match first), or None."""
    specs = list(MODELS.values())
    exact = [s for s in specs if type(model) in s.network_types]
    return (exact or [s for s in specs if isinstance(model, s.network_types)] or [None])[0]
