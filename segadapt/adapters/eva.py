"""EVA (Explained Variance Adaptation) for conv layers: data-driven initialisation of the down factor.

With ``init="eva"`` the down factor A (r x Cin k^d) of ``lora`` / ``conv_lora`` / ``conv_dora`` starts as
the top-r right singular vectors of the layer's *unfolded input patches* on a few target batches
(rows of P: one receptive field per output position, in M(W)'s column order Cin x k_1 x ... x k_d),
i.e. the r directions of the input that carry the most energy; B stays zero, so the adapter is exactly
the base function at init. (The EVA paper's rank redistribution across layers is not done: every layer
keeps its configured rank.)

Injection leaves such adapters *pending*; :func:`eva_init` runs the model on the batches, collects
P^T P per layer (float64, Cin k^d squared) through forward hooks, and writes A. A pending adapter
refuses to train, so a forgotten :func:`eva_init` cannot silently fall back to a random init.
Transposed convs are handled alike: their "patches" are the inputs each output position sums over.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .base import canonical_svd
from .layers import _CONV_TRANSPOSE_FN as CONV_TRANSPOSE_FN
from .layers import LayerSpec


def patch_matrix(base: nn.Module, spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """P (positions x Cin k^d) with base(x) - b0 = P M(W0)^T: what each output position of ``base`` sees,
    in M(W)'s column order. Convs and transposed convs: the layer's own op (padding, stride, dilation,
    output padding) run with the identity kernel, whose output channel (i, k) is input channel i at kernel
    offset k; linear: the input rows."""
    if spec.kind == "linear":
        return x.reshape(-1, spec.cin)
    x = x if x.dim() == spec.ndim + 2 else x.unsqueeze(0)
    eye = torch.eye(spec.fan_in, dtype=x.dtype, device=x.device).view(spec.fan_in, spec.cin, *spec.kernel)
    if spec.kind == "conv":
        patches = base._conv_forward(x, eye, None)
    else:
        padding = base._output_padding(x, None, base.stride, base.padding, base.kernel_size, spec.ndim, base.dilation)
        patches = CONV_TRANSPOSE_FN[spec.ndim](x, spec.to_base(eye), None, base.stride, base.padding, padding, 1, base.dilation)
    return patches.flatten(2).transpose(1, 2).reshape(-1, spec.fan_in)


def eva_pending(model: nn.Module) -> list[str]:
    """Names of the adapted layers whose active adapter waits for :func:`eva_init`."""
    from .model import adapted_layers

    return [name for name, layer in adapted_layers(model)
            if layer.active_adapter in layer.adapters and layer.adapters[layer.active_adapter].eva_pending]


@torch.no_grad()
def eva_init(model: nn.Module, run: Callable[[], Any], name: Optional[str] = None) -> list[str]:
    """Initialise every pending EVA adapter (of adapter ``name``, default the active one) from the
    inputs its layer sees while ``run()`` runs the model on a few target batches; returns the layers done.

    Raises:
        RuntimeError: a pending layer saw no input during ``run()`` (it is not on the batches' path).
    """
    from .model import active_adapter, adapted_layers

    name = name or active_adapter(model)
    layers = {n: layer for n, layer in adapted_layers(model)
              if name in layer.adapters and layer.adapters[name].eva_pending}
    gram: dict[str, torch.Tensor] = {}

    def collect(layer_name):
        def hook(layer, args):
            layer_adapter = layer.adapters[name]
            patches = patch_matrix(layer.base_layer, layer_adapter.spec, args[0].detach()).double()
            gram[layer_name] = gram.get(layer_name, 0) + patches.t() @ patches

        return hook

    handles = [layer.register_forward_pre_hook(collect(n)) for n, layer in layers.items()]
    active = {n: layer.active_adapter for n, layer in layers.items()}
    try:
        for layer in layers.values():  # the base alone (= the adapted layer while B = 0) during the run
            layer.active_adapter = None
        run()
    finally:
        for handle in handles:
            handle.remove()
        for n, layer in layers.items():
            layer.active_adapter = active[n]
    missing = sorted(set(layers) - set(gram))
    if missing:
        raise RuntimeError(f"eva_init: layers {missing[:5]} saw no input while running the batches")
    for layer_name, layer in layers.items():
        layer.adapters[name].set_eva_down(gram[layer_name])
    return sorted(layers)


def eva_down(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` right singular vectors of P from G = P^T P (its eigenvectors), as rows, signs fixed
    as in :func:`canonical_svd`."""
    _, _, vh = canonical_svd(gram)  # G is symmetric PSD: its SVD is its eigendecomposition
    return vh[:rank]


