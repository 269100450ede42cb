"""nnU-Net v2 trained-model folders: build their network, take their preprocessing, write one back.

A trained-model folder (``nnUNet_results/<Dataset>/<Trainer>__<Plans>__<configuration>/``) holds::

    plans.json                    nnU-Net v2 plans: configurations[<cfg>]["architecture"] (network class,
                                  arch_kwargs, _kw_requires_import), spacing, patch_size, batch_size,
                                  normalization_schemes, transpose_forward, foreground intensity statistics
    dataset.json                  channel_names, labels (name -> int), file_ending, numTraining
    fold_<k>/checkpoint_final.pth torch.save'd dict: network_weights (the state dict), optimizer_state,
                                  grad_scaler_state, logging, _best_ema, current_epoch, init_args (plans,
                                  configuration, fold, dataset_json, device), trainer_name,
                                  inference_allowed_mirroring_axes

The network is built with ``dynamic-network-architectures`` (nnU-Net's own network package) exactly as
nnU-Net's ``get_network_from_plans`` does; the checkpoint is read with ``torch.load(weights_only=True)``
(numpy scalars in its ``logging`` allowlisted, see :data:`segadapt.models.pretrained.NUMPY_SCALAR_GLOBALS`).
:func:`write_checkpoint` writes a checkpoint nnU-Net's predictor loads
(:func:`segadapt.export.nnunet.export_nnunet` writes a run as a trained-model folder). The plans <-> segadapt
Plan conversion (preprocessing, axes) is :mod:`segadapt.plan.nnunet`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet, ResidualUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from torch import nn

from segadapt.io import atomic_path, read_json_object
from segadapt.models.presets import split_presets
from segadapt.models.registry import ModelSpec, register

PLANS_FILE = "plans.json"
DATASET_FILE = "dataset.json"
NNUNET_CHECKPOINT_FILE = "checkpoint_final.pth"
DEFAULT_TRAINER = "nnUNetTrainer"


def _names(*classes: type) -> dict[str, type]:
    """{dotted name -> class}: the full module path (``torch.nn.modules.conv.Conv3d``), and for torch.nn
    classes the short form (``torch.nn.Conv3d``), the two ways nnU-Net's plans name a class."""
    names = {f"{c.__module__}.{c.__qualname__}": c for c in classes}
    names.update({f"torch.nn.{c.__name__}": c for c in classes if c.__module__.startswith("torch.nn.")})
    return names


# The only classes a plans file may name. nnU-Net imports any dotted name (pydoc.locate), which runs code
# (``torch.nn.modules.module.torch.hub.load``); here a name is looked up in these tables, never imported.
NETWORK_CLASSES = _names(PlainConvUNet, ResidualEncoderUNet, ResidualUNet)  # dynamic-network-architectures 0.4.2
OP_CLASSES = _names(
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.GroupNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.ReLU6,
    nn.Hardswish, BasicBlockD, BottleneckD)
# arch_kwargs that repeat modules (a count, or one count per stage): bounded before anything is built
COUNT_KEYS = ("n_stages", "n_conv_per_stage", "n_conv_per_stage_decoder", "n_blocks_per_stage")
MAX_COUNT = 64
# Largest network a plans file may describe, in parameters (2**30: 4 GiB of float32 weights; nnU-Net's
# ResEnc-L has about 1e8), counted from the kwargs before any weight is allocated.
MAX_PARAMETERS = 2**30


@dataclass(frozen=True)
class NnUNetModel:
    """One configuration and fold of an nnU-Net trained-model folder (see the module docstring)."""

    folder: Path
    plans: dict
    dataset: dict
    configuration: str
    fold: int

    @property
    def config(self) -> dict:
        """``plans['configurations'][configuration]`` with its ``inherits_from`` parents merged in (as nnU-Net)."""
        configurations = self.plans["configurations"]
        chain, name = [], self.configuration
        while name is not None:
            if not isinstance(name, str) or name not in configurations or name in (c for c, _ in chain):
                raise ValueError(f"{self.folder / PLANS_FILE}: configuration {name!r} not found (has "
                                 f"{sorted(configurations)})")
            if not isinstance(configurations[name], Mapping):
                raise ValueError(f"{self.folder / PLANS_FILE}: configuration {name!r} is not an object")
            chain.append((name, configurations[name]))
            name = configurations[name].get("inherits_from")
        merged: dict = {}
        for _, entry in reversed(chain):
            merged.update(copy.deepcopy(entry))
        return merged

    @property
    def checkpoint(self) -> Path:
        return self.folder / f"fold_{self.fold}" / NNUNET_CHECKPOINT_FILE

    @property
    def in_channels(self) -> int:
        return len(self.dataset.get("channel_names", self.dataset.get("modality", {})))

    @property
    def num_classes(self) -> int:
        """Segmentation heads: one per label (background included), as nnU-Net's LabelManager without regions."""
        return len(self.dataset["labels"])


def read_results(folder: str | os.PathLike | None, configuration: str = "3d_fullres", fold: int = 0) -> NnUNetModel:
    """Read and check an nnU-Net trained-model folder (plans.json, dataset.json; the checkpoint is read later).

    Raises:
        FileNotFoundError: a file is missing. ValueError: an unknown configuration, a 2D or cascade
        configuration, region labels, or an architecture entry :func:`check_architecture` refuses (a class
        name not allow-listed, kwargs that do not build or describe a network beyond :data:`MAX_PARAMETERS`).
    """
    if folder is None:
        raise ValueError("model=nnunet needs model.kwargs.results=DIR, an nnU-Net trained-model folder "
                         "(plans.json, dataset.json, fold_<k>/checkpoint_final.pth)")
    folder = Path(folder).expanduser().absolute()
    plans = read_json_object(folder / PLANS_FILE, "nnU-Net plans")
    dataset = read_json_object(folder / DATASET_FILE, "nnU-Net dataset.json")
    if not isinstance(plans.get("configurations"), Mapping):
        raise ValueError(f"{folder / PLANS_FILE}: no 'configurations' (not nnU-Net v2 plans)")
    model = NnUNetModel(folder, plans, dataset, str(configuration), int(fold))
    config = model.config
    if config.get("previous_stage"):
        raise ValueError(f"{folder / PLANS_FILE}: configuration {configuration!r} is a cascade stage (needs the "
                         f"predictions of {config['previous_stage']!r}); adapt '3d_fullres' or '3d_lowres'")
    patch = config.get("patch_size")
    if not isinstance(patch, list) or len(patch) != 3 or not all(type(p) is int and p > 0 for p in patch):
        raise ValueError(f"{folder / PLANS_FILE}: configuration {configuration!r} has patch size "
                         f"{config.get('patch_size')}; only 3D configurations (three positive integers) are supported")
    architecture = config.get("architecture") or {}
    if not isinstance(architecture, Mapping) or "network_class_name" not in architecture or "arch_kwargs" not in architecture:
        raise ValueError(f"{folder / PLANS_FILE}: configuration {configuration!r} has no architecture entry "
                         "(network_class_name + arch_kwargs; plans of nnU-Net >= 2.4 are needed)")
    labels = dataset.get("labels")
    if not isinstance(labels, Mapping) or any(not isinstance(v, int) for v in labels.values()):
        raise ValueError(f"{folder / DATASET_FILE}: labels {labels} are not name -> int (nnU-Net region "
                         "training is not supported)")
    if not isinstance(dataset.get("channel_names", dataset.get("modality")), Mapping):
        raise ValueError(f"{folder / DATASET_FILE}: no channel_names (index -> name)")
    check_architecture(architecture, model.in_channels, model.num_classes, architecture_key(model),
                       patch_size=patch)
    return model


def architecture_key(model: NnUNetModel) -> str:
    """The plans file and key of `model`'s architecture entry, for error messages."""
    return f"{model.folder / PLANS_FILE}: configurations.{model.configuration}.architecture"


def locate(name: Any, allowed: Mapping[str, type] = OP_CLASSES, where: str = "plans") -> type:
    """The class a plans file names (``torch.nn.modules.conv.Conv3d``), looked up in `allowed`
    (:data:`OP_CLASSES` or :data:`NETWORK_CLASSES`); `where` names the file and key in the error."""
    if isinstance(name, str) and name in allowed:
        return allowed[name]
    short = sorted({c.__name__ for c in allowed.values()})
    raise ValueError(f"{where}: {str(name)[:200]!r} is not one of the classes a plans file may name "
                     f"({', '.join(short)}); no other name is imported")


def check_architecture(architecture: Any, in_channels: int, num_classes: int, where: str = "architecture",
                       deep_supervision: bool = True, patch_size: Optional[Sequence[int]] = None) -> tuple[type, dict]:
    """(network class, arch_kwargs with the ``_kw_requires_import`` names resolved) of a plans architecture
    entry, refused in one line naming `where` (file and key) when a name is not allow-listed
    (:func:`locate`), a count is beyond :data:`MAX_COUNT`, the kwargs do not build (or, given `patch_size`,
    do not run on a patch), or the network would hold more than :data:`MAX_PARAMETERS` parameters. The
    network is built and run on torch's meta device: shapes, no storage.
    """
    if not isinstance(architecture, Mapping) or not isinstance(architecture.get("arch_kwargs"), Mapping):
        raise ValueError(f"{where}: needs network_class_name and arch_kwargs (an object)")
    network_class = locate(architecture.get("network_class_name"), NETWORK_CLASSES, f"{where}.network_class_name")
    kwargs = copy.deepcopy(dict(architecture["arch_kwargs"]))
    imports = architecture.get("_kw_requires_import", ())
    if not isinstance(imports, (list, tuple)) or not all(isinstance(k, str) for k in imports):
        raise ValueError(f"{where}._kw_requires_import: {str(imports)[:200]} is not a list of arch_kwargs keys")
    for key in imports:
        if kwargs.get(key) is not None:
            kwargs[key] = locate(kwargs[key], OP_CLASSES, f"{where}.arch_kwargs.{key}")
    for key in COUNT_KEYS:
        counts = kwargs.get(key, 1)
        counts = counts if isinstance(counts, (list, tuple)) else [counts]
        if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_COUNT for n in counts):
            raise ValueError(f"{where}.arch_kwargs.{key}: {str(kwargs[key])[:200]} (each an integer 0..{MAX_COUNT})")
    try:
        with torch.device("meta"):
            shapes = network_class(input_channels=in_channels, num_classes=num_classes,
                                   deep_supervision=deep_supervision, **kwargs)
    except Exception as error:  # the network package's own checks: asserts, TypeErrors on wrong kwargs
        detail = " ".join(f"{type(error).__name__}: {error}".split())
        raise ValueError(f"{where}.arch_kwargs do not build a {network_class.__name__}: {detail[:300]}") from None
    count = sum(p.numel() for p in shapes.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"{where}.arch_kwargs describe a {network_class.__name__} of {count:,} parameters "
                         f"({count * 4 / 2**30:.0f} GiB in float32; features_per_stage "
                         f"{str(kwargs.get('features_per_stage'))[:100]}), above the limit of {MAX_PARAMETERS:,}")
    if patch_size is not None:
        try:
            shapes(torch.empty(1, in_channels, *patch_size, device="meta"))
        except Exception as error:
            detail = " ".join(f"{type(error).__name__}: {error}".split())
            raise ValueError(f"{where}.arch_kwargs do not run on the patch size {list(patch_size)}: "
                             f"{detail[:300]}") from None
    return network_class, kwargs


def build_network(architecture: Mapping[str, Any], in_channels: int, num_classes: int,
                  deep_supervision: bool = True, where: str = "architecture") -> nn.Module:
    """nnU-Net's ``get_network_from_plans``: ``network_class_name(input_channels, num_classes=...,
    **arch_kwargs)`` with the ``_kw_requires_import`` entries resolved (allow-listed classes only, see
    :func:`check_architecture`), initialised by the class's own ``initialize`` (He init), as nnU-Net does
    for a fresh network.

    dynamic-network-architectures registers each conv twice (``conv`` and ``all_modules.0``, the one its
    forward runs); ``named_modules`` lists it as ``conv``, and ``inject`` replaces it in both slots. The state
    dict keeps both names (nnU-Net's keys).
    """
    network_class, kwargs = check_architecture(architecture, in_channels, num_classes, where, deep_supervision)
    network = network_class(input_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision,
                            **kwargs)
    if hasattr(network, "initialize"):
        network.apply(network.initialize)
    network.register_forward_hook(_eval_output)
    return network


def _eval_output(module: nn.Module, args: tuple, output: Any) -> Any:
    """Deep supervision in training only: the full-resolution output alone in eval mode (as MONAI's DynUNet)."""
    if not module.training and isinstance(output, (list, tuple)):
        return output[0]
    return output


def build_nnunet(results: Optional[str] = None, configuration: str = "3d_fullres", fold: int = 0, in_channels: Optional[int] = None,
                 out_channels: Optional[int] = None, deep_supervision: bool = True) -> nn.Module:
    """The network of an nnU-Net trained-model folder (random init; the run loads the fold's checkpoint).

    In training it returns nnU-Net's deep-supervision outputs (a list, full resolution first); in eval
    mode the full-resolution logits ``(B, num_classes, *spatial)``.

    Raises:
        ValueError: `in_channels` / `out_channels` disagree with the folder's dataset.json.
    """
    model = read_results(results, configuration, fold)
    for name, given, planned in (("in_channels", in_channels, model.in_channels),
                                 ("out_channels", out_channels, model.num_classes)):
        if given is not None and int(given) != planned:
            raise ValueError(f"{model.folder}: the network has {name}={planned} (dataset.json channel_names / "
                             f"labels), the run gives {given}")
    return build_network(model.config["architecture"], model.in_channels, model.num_classes, deep_supervision,
                         architecture_key(model))


# ---- checkpoints ------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict:
    """An nnU-Net checkpoint as a dict, read with ``weights_only=True`` (numpy scalars allowlisted)."""
    from segadapt.models.pretrained import torch_load_weights

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"nnU-Net checkpoint not found: {path}")
    checkpoint = torch_load_weights(path)  # UnsafeCheckpointError, or ValueError for a truncated file
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), Mapping):
        raise ValueError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


def write_checkpoint(path: str | os.PathLike, state: Mapping[str, torch.Tensor], plans: Mapping, dataset: Mapping,
                     configuration: str, fold: int, trainer_name: str = DEFAULT_TRAINER,
                     mirroring_axes: Optional[Sequence[int]] = (0, 1, 2), epoch: int = 0) -> Path:
    """Write ``state`` as nnU-Net's ``checkpoint_final.pth`` (the keys ``nnUNetTrainer.save_checkpoint``
    writes; no optimiser, grad-scaler or logging state: the file predicts, it does not resume nnU-Net training)."""
    checkpoint = {
        "network_weights": {k: v.detach().cpu().contiguous() for k, v in state.items()},
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": int(epoch),
        "init_args": {"plans": dict(plans), "configuration": configuration, "fold": int(fold),
                      "dataset_json": dict(dataset), "device": torch.device("cpu")},
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": None if mirroring_axes is None else tuple(int(a) for a in mirroring_axes),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return path


def nnunet_presets(model: nn.Module) -> dict[str, list[str]]:
    """``encoder`` (``encoder.stages``), ``bottleneck`` (the last encoder stage), ``decoder`` (transposed convs,
    decoder stages, segmentation layers), ``all_conv`` (every conv, ConvTranspose included)."""
    # the decoder holds the encoder too (``decoder.encoder``); named_modules lists it under ``encoder`` only
    last = len(model.encoder.stages) - 1
    parts = {"encoder": [f"encoder.stages.{i}" for i in range(last)], "bottleneck": [f"encoder.stages.{last}"],
             "decoder": ["decoder"]}
    return split_presets(model, parts, "all_conv")


def nnunet_input_files(kwargs: Mapping[str, Any]) -> dict[str, Path]:
    """The trained-model folder's plans, dataset.json and fold checkpoint (none without ``results``)."""
    if not kwargs.get("results"):
        return {}
    results = Path(kwargs["results"])
    return {"the run's nnU-Net plans": results / PLANS_FILE, "the run's nnU-Net dataset.json": results / DATASET_FILE,
            "the run's nnU-Net base checkpoint": results / f"fold_{kwargs.get('fold', 0)}" / NNUNET_CHECKPOINT_FILE}


# no heads (a base with another class count is refused), no bundle (the network needs its plans folder: --nnunet)
SPEC = register(ModelSpec(
    name="nnunet", build=build_nnunet, network_types=tuple(NETWORK_CLASSES.values()), sampling="patch",
    presets=nnunet_presets, bundle_network=None, input_files=nnunet_input_files,
))
