"""Parameter-efficient adapters for segmentation networks.

Methods (``METHODS``): ``lora``, ``lora_c``, ``conv_lora``, ``dora_c``, ``conv_dora``, ``cp_lora``,
``cp_dora``, ``salt``, ``tlora`` -- one family per file (``lora.py``, ``dora.py``, ``cp.py``,
``salt.py``, ``tlora.py``), each an :class:`Adapter` subclass registered with ``@register_method``.

Quick start::

    from segadapt.adapters import AdapterConfig, inject, merge_and_unload, save_adapter, load_adapter, summary
    inject(model, AdapterConfig(method="cp_lora", rank=8, targets=r".*conv"))
    print(summary(model))                       # trainable parameters per layer
    ...train (only adapter parameters require grad)...
    save_adapter(model, "fold0.safetensors")    # a few hundred KB
    load_adapter(fresh_base, "fold0.safetensors")
    plain = merge_and_unload(model)             # base module types only, zero overhead
"""

from . import cp, dora, lora, salt, tlora  # noqa: F401  (each file registers its methods)
from .base import Adapter, AdaptedLayer
from .config import AdapterConfig
from .eva import eva_init, eva_pending
from .io import base_fingerprint, load_adapter, read_adapter_metadata, save_adapter
from .layers import LayerSpec, spec_of
from .model import (
    capped_ranks,
    active_adapter,
    adapted_layers,
    adapter_names,
    inject,
    merge,
    merge_and_unload,
    norm_layers,
    regularization_loss,
    remove_adapter,
    set_active_adapter,
    summary,
    summary_rows,
    truncate,
    unmerge,
)
from .registry import METHODS, get_method, register_method

__all__ = [
    "capped_ranks",
    "METHODS",
    "Adapter",
    "AdaptedLayer",
    "AdapterConfig",
    "LayerSpec",
    "active_adapter",
    "adapted_layers",
    "adapter_names",
    "eva_init",
    "eva_pending",
    "base_fingerprint",
    "get_method",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "norm_layers",
    "read_adapter_metadata",
    "register_method",
    "regularization_loss",
    "remove_adapter",
    "save_adapter",
    "set_active_adapter",
    "spec_of",
    "summary",
    "summary_rows",
    "truncate",
    "unmerge",
]
