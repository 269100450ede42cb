"""Adapter target presets: which layers of a model to adapt, by fully-qualified module name.

A preset is a list of names of *adaptable* layers -- the layer types ``segadapt.adapters`` supports
(``nn.Linear``, ``nn.ConvNd``, ``nn.ConvTransposeNd``) with ``groups == 1`` -- ready for
``AdapterConfig(targets=...)`` (a full name is a suffix of itself; no preset name here is also the suffix
of another module's name). Compute presets on the plain model, before ``inject``.

=====================  =====================================================================
model                  presets
=====================  =====================================================================
MONAI ``UNet``         ``encoder`` (down path), ``bottleneck`` (lowest level), ``decoder`` (up path
                       and output), ``all_conv``
MONAI ``DynUNet``      same; encoder = ``input_block`` + ``downsamples``, decoder = ``upsamples`` +
                       ``output_block`` + deep-supervision heads
``MultiViewUNet``      the UNet presets, over the shared UNet or all three per-view UNets (the
                       learned-fusion conv is in none: train it directly if wanted)
``ViTSegmenter``       ``attention`` (every Linear in an ``attn`` block), ``qkv`` (the query/key/value
                       projections only), ``mlp``, ``all_linear`` (every Linear of the encoder),
                       ``decoder`` (decoder convs and mask head), ``all``
``SAMSegmenter``       ``attention``, ``qkv``, ``mlp``, ``all_linear`` over the image encoder (as for the ViT),
                       ``mask_decoder`` (its Linear / ConvTranspose layers), ``all``
nnU-Net networks       ``encoder`` (``encoder.stages``), ``bottleneck`` (the last encoder stage),
(dynamic-network-      ``decoder`` (transposed convs, decoder stages, segmentation layers),
architectures)         ``all_conv`` (every conv, ConvTranspose included)
=====================  =====================================================================

Beside the presets, each model family names the modules an adapter trains in full unless its config says
otherwise (:func:`default_train_modules`: a ViTSegmenter's decoder and mask head, SAM's mask decoder, none for
the UNets) and
the modules whose shapes follow the number of classes (:func:`head_modules`, re-created for a target with
another class count than the base).
"""

from __future__ import annotations

from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from monai.networks.layers import SkipConnection
from monai.networks.nets import DynUNet, UNet
from torch import nn

from segadapt.adapters.layers import SUPPORTED_LAYERS
from segadapt.models.multiview_unet import VIEWS, MultiViewUNet
from segadapt.models.sam import HEAD_MODULES, SAMSegmenter
from segadapt.models.vit_seg import ViTSegmenter

QKV_NAMES = {"qkv", "q", "k", "v", "q_proj", "k_proj", "v_proj"}


def adaptable_modules(model: nn.Module) -> list[str]:
    """Names of the layers adapters can wrap (see module docstring), in module order."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, SUPPORTED_LAYERS) and getattr(module, "groups", 1) == 1
    ]


def _under(name: str, roots: list[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _split(model: nn.Module, parts: dict[str, list[str]], everything: str) -> dict[str, list[str]]:
    """Group the adaptable layers by the part (a list of root module names) that holds them."""
    names = adaptable_modules(model)
    presets = {part: [n for n in names if _under(n, roots)] for part, roots in parts.items()}
    presets[everything] = names
    return presets


def _monai_unet_parts(unet: UNet) -> dict[str, list[str]]:
    # MONAI's UNet nests each level as Sequential(down, SkipConnection(next level), up);
    # the innermost submodule is the bottom (bottleneck) block.
    encoder, decoder = [], []
    path, block = "model", unet.model
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        encoder.append(f"{path}.0")
        decoder.append(f"{path}.2")
        path, block = f"{path}.1.submodule", block[1].submodule
    return {"encoder": encoder, "bottleneck": [path], "decoder": decoder}


def _unet_presets(unet: nn.Module) -> dict[str, list[str]]:
    if isinstance(unet, DynUNet):
        parts = {
            "encoder": ["input_block", "downsamples"],
            "bottleneck": ["bottleneck"],
            "decoder": ["upsamples", "output_block", "deep_supervision_heads"],
        }
    else:
        parts = _monai_unet_parts(unet)
    return _split(unet, parts, "all_conv")


def _encoder_presets(encoder: nn.Module, root: str) -> dict[str, list[str]]:
    linear = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    names = {
        "attention": [n for n in linear if "attn" in n.split(".")],
        "qkv": [n for n in linear if "attn" in n.split(".") and n.split(".")[-1] in QKV_NAMES],
        "mlp": [n for n in linear if "mlp" in n.split(".")],
        "all_linear": linear,
    }
    return {key: [f"{root}.{n}" for n in found] for key, found in names.items()}


def _vit_presets(model: ViTSegmenter) -> dict[str, list[str]]:
    presets = _encoder_presets(model.encoder, "encoder")
    presets.update(_split(model, {"decoder": ["decoder", "mask_head"]}, "all"))
    return presets


def _sam_presets(model: SAMSegmenter) -> dict[str, list[str]]:
    presets = _encoder_presets(model.image_encoder, "image_encoder")
    presets.update(_split(model, {"mask_decoder": ["mask_decoder"]}, "all"))
    return presets


# ---- nnU-Net networks (dynamic-network-architectures) ----------------------------------------------------
def _nnunet_presets(model: AbstractDynamicNetworkArchitectures) -> dict[str, list[str]]:
    # the decoder holds the encoder too (``decoder.encoder``); named_modules lists it under ``encoder`` only
    last = len(model.encoder.stages) - 1
    parts = {"encoder": [f"encoder.stages.{i}" for i in range(last)], "bottleneck": [f"encoder.stages.{last}"],
             "decoder": ["decoder"]}
    return _split(model, parts, "all_conv")


def target_presets(model: nn.Module) -> dict[str, list[str]]:
    """All presets of ``model``: preset name -> fully-qualified names of the layers to adapt."""
    if isinstance(model, MultiViewUNet):
        roots = ["unet"] if model.shared_weights else [f"unets.{view}" for view in VIEWS]
        presets: dict[str, list[str]] = {}
        for root in roots:
            for key, names in _unet_presets(model.get_submodule(root)).items():
                presets.setdefault(key, []).extend(f"{root}.{n}" for n in names)
        return presets
    if isinstance(model, (UNet, DynUNet)):
        return _unet_presets(model)
    if isinstance(model, ViTSegmenter):
        return _vit_presets(model)
    if isinstance(model, SAMSegmenter):
        return _sam_presets(model)
    if isinstance(model, AbstractDynamicNetworkArchitectures) and hasattr(model, "decoder"):
        return _nnunet_presets(model)
    raise TypeError(
        f"no adapter presets for {type(model).__name__}; presets exist for MultiViewUNet, MONAI UNet, "
        "DynUNet, ViTSegmenter, SAMSegmenter and nnU-Net's networks (for another model, pass module-name patterns "
        "to AdapterConfig directly)"
    )


def preset_targets(model: nn.Module, preset: str) -> list[str]:
    """Names of the layers of ``model`` that ``preset`` adapts; ``ValueError`` lists the valid presets."""
    presets = target_presets(model)
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {type(model).__name__}; valid presets: {', '.join(presets)}")
    if not presets[preset]:
        raise ValueError(f"preset {preset!r} selects no layer of this {type(model).__name__}")
    return presets[preset]


def _unet_heads(unet: nn.Module) -> list[str]:
    if isinstance(unet, DynUNet):
        return ["output_block", "deep_supervision_heads"]
    return _monai_unet_parts(unet)["decoder"][:1]  # the outermost up block ends in out_channels


def head_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` whose tensors' shapes depend on the number of output classes."""
    if isinstance(model, MultiViewUNet):
        roots = ["unet"] if model.shared_weights else [f"unets.{view}" for view in VIEWS]
        heads = [f"{root}.{h}" for root in roots for h in _unet_heads(model.get_submodule(root))]
        return heads + (["fusion"] if model.fusion_mode == "learned" else [])
    if isinstance(model, (UNet, DynUNet)):
        return _unet_heads(model)
    if isinstance(model, ViTSegmenter):
        return ["mask_head"]
    if isinstance(model, SAMSegmenter):
        return list(HEAD_MODULES)
    raise TypeError(f"no head modules known for {type(model).__name__}")


def default_train_modules(model: nn.Module) -> list[str]:
    """Modules an adapter on ``model`` trains in full when its config names none (``train_modules`` absent):
    a ViTSegmenter's freshly built decoder and mask head, SAM's mask decoder (SAMed); nothing for the UNets (their pretrained decoder
    is adapted like the encoder)."""
    if isinstance(model, ViTSegmenter):
        return ["decoder", "mask_head"]
    if isinstance(model, SAMSegmenter):
        return ["mask_decoder"]
    return []
