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
:func:`plan_from_nnunet` turns the plans into segadapt's :class:`~segadapt.data.plan.Plan`, so the one
planning path sets the preprocessing the network was trained with. :func:`write_checkpoint` writes a
checkpoint nnU-Net's predictor loads (:func:`segadapt.export_nnunet.export_nnunet` writes a run as a
trained-model folder).

Axes: nnU-Net reads an image as SimpleITK does (array axes = the file's voxel axes reversed) and then
transposes by ``transpose_forward``; it never reorients. segadapt reorients every case to one axis code
string, chosen here as the one nnU-Net's network sees for the dataset's first case (its file axes
reversed, then transposed), so the network sees the axes it was trained on. Cases stored in another
orientation are reoriented to it (nnU-Net would feed them as stored).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet, ResidualUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from torch import nn

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
# nnU-Net's normalisation scheme -> segadapt's intensity mode ('zscore' / 'mri': see _intensity)
NORMALIZATION = {"CTNormalization": "ct_zscore", "ZScoreNormalization": "zscore", "RGBTo01Normalization": "rgb"}


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
    from segadapt.data.files import read_json_object

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
    from segadapt.data.files import atomic_path

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


# ---- preprocessing: nnU-Net plans -> segadapt Plan ------------------------------------------------------
def file_axcodes(path: str | os.PathLike) -> tuple[str, ...]:
    """Axis codes of an image file's voxel axes (nibabel's ``aff2axcodes``), read from its header only."""
    path = str(path)
    if path.lower().endswith((".nii", ".nii.gz")):
        affine = nib.load(path).affine
    else:
        import SimpleITK as sitk

        from segadapt.data.readers import sitk_affine

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        image = sitk.Image([1] * reader.GetDimension(), sitk.sitkUInt8)
        image.SetDirection(reader.GetDirection())
        image.SetSpacing(reader.GetSpacing())
        image.SetOrigin(reader.GetOrigin())
        affine = sitk_affine(image)
    return tuple(nib.aff2axcodes(affine))


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def network_orientation(axcodes: Sequence[str], transpose_forward: Sequence[int]) -> str:
    """Axis codes of the array nnU-Net's network sees for a file with voxel axes `axcodes`:
    SimpleITK's array reverses the voxel axes, then ``transpose_forward`` permutes them."""
    reversed_codes = list(axcodes)[::-1]
    return "".join(reversed_codes[int(t)] for t in transpose_forward)


def transpose_for(axcodes: Sequence[str], orientation: str) -> list[int]:
    """``transpose_forward`` that gives nnU-Net's network the axes of `orientation` for a file with voxel
    axes `axcodes` (axes matched by anatomy; a flipped axis stays flipped: nnU-Net does not flip)."""
    reversed_codes = list(axcodes)[::-1]
    order = []
    for code in orientation:
        match = [i for i, c in enumerate(reversed_codes) if c in (code, _OPPOSITE[code])]
        if len(match) != 1:
            raise ValueError(f"cannot map file axes {tuple(axcodes)} onto orientation {orientation!r}")
        order.append(match[0])
    return order


def _intensity(model: NnUNetModel) -> dict[str, Any]:
    """segadapt intensity fields for the configuration's ``normalization_schemes`` (one scheme for all channels):
    CTNormalization -> 'ct_zscore' with the plans' foreground statistics per channel; ZScoreNormalization ->
    'mri' (z-score over nonzero voxels) when ``use_mask_for_norm``, else 'zscore' over the whole volume;
    RGBTo01Normalization -> 'rgb'."""
    config, where = model.config, model.folder / PLANS_FILE
    schemes = list(config.get("normalization_schemes") or [])
    if len(schemes) != model.in_channels:
        raise ValueError(f"{where}: {len(schemes)} normalization_schemes for {model.in_channels} channel(s)")
    if len(set(schemes)) != 1 or schemes[0] not in NORMALIZATION:
        raise ValueError(f"{where}: normalization_schemes {schemes}: segadapt applies one of {sorted(NORMALIZATION)} "
                         "to every channel")
    intensity = NORMALIZATION[schemes[0]]
    masked = list(config.get("use_mask_for_norm") or [False] * len(schemes))
    if intensity == "zscore":
        return {"intensity": "mri"} if all(masked) else {"intensity": "zscore", "background_value": [None] * len(schemes)}
    if intensity == "ct_zscore":
        stats = model.plans.get("foreground_intensity_properties_per_channel") or {}
        try:
            per_channel = [stats[str(c)] for c in range(len(schemes))]
            return {"intensity": "ct_zscore",
                    "clip_range": [[float(s["percentile_00_5"]), float(s["percentile_99_5"])] for s in per_channel],
                    "norm_mean": [float(s["mean"]) for s in per_channel],
                    "norm_std": [float(s["std"]) for s in per_channel]}
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: CTNormalization needs foreground_intensity_properties_per_channel with "
                             f"mean, std, percentile_00_5, percentile_99_5 per channel ({e!r} missing)") from None
    return {"intensity": intensity}


def plan_from_nnunet(model: NnUNetModel, dataset_json: str | os.PathLike):
    """segadapt's :class:`~segadapt.data.plan.Plan` from an nnU-Net configuration: its spacing (always
    resampled to), patch size, batch size, normalisation and statistics, network stages, and the orientation
    nnU-Net's network sees for the first case of `dataset_json` (the data the run reads)."""
    from segadapt.data.dataset_json import load_dataset_json
    from segadapt.data.plan import Plan

    config = model.config
    arch = config["architecture"]["arch_kwargs"]
    description = load_dataset_json(dataset_json)
    first = description.cases[0].images[0]
    transpose = model.plans.get("transpose_forward", [0, 1, 2])
    orientation = network_orientation(file_axcodes(first), transpose)
    strides = [[int(s)] * 3 if isinstance(s, int) else [int(v) for v in s] for s in arch.get("strides", [])]
    kernels = [[int(k)] * 3 if isinstance(k, int) else [int(v) for v in k] for k in arch.get("kernel_sizes", [])]
    patch = [int(p) for p in config["patch_size"]]
    pools = [sum(1 for s in strides if s[axis] > 1) for axis in range(3)]
    features = arch.get("features_per_stage", [])
    features = [int(features)] * len(strides) if isinstance(features, int) else [int(f) for f in features]
    notes = [f"from nnU-Net plans {model.folder / PLANS_FILE}, configuration {model.configuration!r} "
             f"({config['architecture']['network_class_name'].rsplit('.', 1)[-1]}); orientation {orientation} = "
             f"the axes nnU-Net's network sees for {first.name} (transpose_forward {list(transpose)})"]
    return Plan(
        dataset=str(model.plans.get("dataset_name", model.folder.name)), n_cases=int(model.dataset.get("numTraining", 0)),
        modality={str(k): str(v) for k, v in model.dataset.get("channel_names", {}).items()}, spatial_dims=3,
        orientation=orientation,
        median_spacing=[float(s) for s in model.plans.get("original_median_spacing_after_transp", config["spacing"])],
        target_spacing=[float(s) for s in config["spacing"]], resample=True, anisotropic_axis=None,
        median_shape=[int(round(float(s))) for s in config.get("median_image_size_in_voxels", patch)],
        patch_size=patch, pools_per_axis=pools, strides=strides, kernel_sizes=kernels, filters=features,
        batch_size=int(config.get("batch_size", 2)), slice_size=patch[1:], slice_pools=0, slice_filters=[],
        slice_batch_size=int(config.get("batch_size", 2)),
        networks={"nnunet": {"out_channels": model.num_classes}}, notes=notes, **_intensity(model),
    )


# ---- segadapt Plan -> nnU-Net plans ---------------------------------------------------------------------
_SCHEMES = {"ct_zscore": "CTNormalization", "zscore": "ZScoreNormalization", "mri": "ZScoreNormalization",
            "rgb": "RGBTo01Normalization"}


def nnunet_plans(plan, dataset_json: str | os.PathLike, features: Sequence[int] | None = None,
                 configuration: str = "3d_fullres", n_conv_per_stage: int = 2) -> tuple[dict, dict]:
    """(plans.json, dataset.json) of an nnU-Net trained-model folder for a PlainConvUNet on segadapt's `plan`
    (its spacing, patch, batch, stages, normalisation and orientation): the inverse of :func:`plan_from_nnunet`,
    so a network segadapt trains on this plan is an nnU-Net network of these plans. `features` per stage
    default to the plan's filters. ``transpose_forward`` maps the file axes of the first case of
    `dataset_json` onto the plan's orientation.
    """
    from segadapt.data.dataset_json import load_dataset_json

    if plan.intensity not in _SCHEMES:
        raise ValueError(f"intensity {plan.intensity!r} has no nnU-Net normalisation scheme ({sorted(_SCHEMES)})")
    description = load_dataset_json(dataset_json)
    channels = description.channels
    transpose = transpose_for(file_axcodes(description.cases[0].images[0]), plan.orientation)
    features = [int(f) for f in (features or plan.filters)]
    stages = len(plan.strides)
    if len(features) != stages:
        raise ValueError(f"{len(features)} features for {stages} stages")
    stats = {}
    if plan.intensity == "ct_zscore":
        stats = {str(c): {"mean": plan.norm_mean[c], "std": plan.norm_std[c], "percentile_00_5": plan.clip_range[c][0],
                          "percentile_99_5": plan.clip_range[c][1]} for c in range(channels)}
    plans = {
        "dataset_name": description.name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(plan.median_spacing),
        "original_median_shape_after_transp": list(plan.median_shape),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose,
        "transpose_backward": [transpose.index(i) for i in range(len(transpose))],
        "configurations": {configuration: {
            "data_identifier": f"nnUNetPlans_{configuration}",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": int(plan.batch_size),
            "patch_size": list(plan.patch_size),
            "median_image_size_in_voxels": [float(s) for s in plan.median_shape],
            "spacing": list(plan.target_spacing),
            "normalization_schemes": [_SCHEMES[plan.intensity]] * channels,
            "use_mask_for_norm": [plan.intensity == "mri"] * channels,
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": stages, "features_per_stage": features, "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [list(k) for k in plan.kernel_sizes], "strides": [list(s) for s in plan.strides],
                    "n_conv_per_stage": [n_conv_per_stage] * stages,
                    "n_conv_per_stage_decoder": [n_conv_per_stage] * (stages - 1), "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
            "batch_dice": True,
        }},
        "experiment_planner_used": "segadapt",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": stats,
    }
    dataset = {"channel_names": {str(k): v for k, v in description.modality.items()},
               "labels": {name: int(value) for value, name in sorted(description.labels.items())},
               "numTraining": len(description.cases), "file_ending": description.file_ending or ".nii.gz",
               "name": description.name}
    return plans, dataset


def write_plans(out_dir: str | os.PathLike, plans: Mapping, dataset: Mapping) -> Path:
    """plans.json + dataset.json of a trained-model folder (no checkpoint yet: ``adapter=scratch`` trains one)."""
    from segadapt.data.files import write_json

    out_dir = Path(out_dir)
    write_json(out_dir / PLANS_FILE, dict(plans))
    write_json(out_dir / DATASET_FILE, dict(dataset))
    return out_dir


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m segadapt.models.nnunet DATASET_JSON OUT_DIR``: plans.json + dataset.json of a PlainConvUNet
    on the dataset's segadapt plan (a folder ``model=nnunet adapter=scratch`` pretrains); bad input exits 2."""
    import argparse

    from segadapt.data.plan import load_or_make_plan

    parser = argparse.ArgumentParser(prog="python -m segadapt.models.nnunet",
                                     description="nnU-Net plans for a PlainConvUNet on a dataset's segadapt plan")
    parser.add_argument("dataset_json")
    parser.add_argument("out_dir")
    parser.add_argument("--cache-dir", default="runs/plans", help="plan cache (default runs/plans)")
    parser.add_argument("--features", type=int, nargs="+", help="features per stage (default: the plan's)")
    parser.add_argument("--patch-size", type=int, nargs=3, help="patch size (default: the plan's)")
    parser.add_argument("--intensity", choices=sorted(_SCHEMES), help="normalisation (default: the plan's)")
    parser.add_argument("--batch-size", type=int, help="patches per step (default: the plan's)")
    args = parser.parse_args(argv)
    try:
        plan = load_or_make_plan(args.dataset_json, args.cache_dir)
        for name, value in (("patch_size", args.patch_size), ("intensity", args.intensity),
                            ("batch_size", args.batch_size)):
            if value is not None:
                setattr(plan, name, list(value) if isinstance(value, list) else value)
        plans, dataset = nnunet_plans(plan, args.dataset_json, args.features)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    out = write_plans(args.out_dir, plans, dataset)
    print(f"nnU-Net plans ({plan.dataset}, PlainConvUNet {plans['configurations']['3d_fullres']['architecture']['arch_kwargs']['features_per_stage']}) -> {out}")
    return out


if __name__ == "__main__":
    main()
