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
the UNets) and the modules whose shapes follow the number of classes (:func:`head_modules`, re-created for a
target with another class count than the base). Each network's file defines its presets and heads in its
:class:`~segadapt.models.registry.ModelSpec`; this module holds the helpers they share and the lookups.
"""

from __future__ import annotations

from torch import nn

from segadapt.adapters.layers import SUPPORTED_LAYERS
from segadapt.models.registry import MODELS, ModelSpec, spec_of

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


def split_presets(model: nn.Module, parts: dict[str, list[str]], everything: str) -> dict[str, list[str]]:
    """Group the adaptable layers by the part (a list of root module names) that holds them; `everything`
    names the preset of all adaptable layers."""
    names = adaptable_modules(model)
    presets = {part: [n for n in names if _under(n, roots)] for part, roots in parts.items()}
    presets[everything] = names
    return presets


def encoder_presets(encoder: nn.Module, root: str) -> dict[str, list[str]]:
    """The Linear layers of a transformer `encoder` (module `root`): attention, qkv, mlp, all_linear."""
    linear = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    names = {
        "attention": [n for n in linear if "attn" in n.split(".")],
        "qkv": [n for n in linear if "attn" in n.split(".") and n.split(".")[-1] in QKV_NAMES],
        "mlp": [n for n in linear if "mlp" in n.split(".")],
        "all_linear": linear,
    }
    return {key: [f"{root}.{n}" for n in found] for key, found in names.items()}


def _spec(model: nn.Module, what: str) -> ModelSpec:
    spec = spec_of(model)
    if spec is None:
        known = ", ".join(dict.fromkeys(t.__name__ for s in MODELS.values() for t in s.network_types))
        raise TypeError(f"no {what} for {type(model).__name__}; they exist for {known} (for another model, pass "
                        "module-name patterns to AdapterConfig directly, or register a ModelSpec)")
    return spec


def target_presets(model: nn.Module) -> dict[str, list[str]]:
    """All presets of ``model``: preset name -> fully-qualified names of the layers to adapt."""
    return _spec(model, "adapter presets").presets(model)


def preset_targets(model: nn.Module, preset: str) -> list[str]:
    """Names of the layers of ``model`` that ``preset`` adapts; ``ValueError`` lists the valid presets."""
    presets = target_presets(model)
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {type(model).__name__}; valid presets: {', '.join(presets)}")
    if not presets[preset]:
        raise ValueError(f"preset {preset!r} selects no layer of this {type(model).__name__}")
    return presets[preset]


def head_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` whose tensors' shapes depend on the number of output classes."""
    spec = _spec(model, "head modules")
    if spec.heads is None:
        raise TypeError(f"no head modules known for {type(model).__name__}")
    return spec.heads(model)


def default_train_modules(model: nn.Module) -> list[str]:
    """Modules an adapter on ``model`` trains in full when its config names none (``train_modules`` absent):
    a ViTSegmenter's freshly built decoder and mask head, SAM's mask decoder (SAMed); nothing for the UNets
    (their pretrained decoder is adapted like the encoder) or a model without a spec."""
    spec = spec_of(model)
    return [] if spec is None else spec.train_modules(model)
