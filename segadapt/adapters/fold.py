"""Adapter folding: a network computing as if one of its adapters were merged, its base weights restored after.

The fold ensembles of :mod:`segadapt.inference` hold K adapters on one base and run each in turn folded into the
weights (:func:`folded`), so each member runs at the plain network's speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .model import active_adapter, adapted_layers, set_active_adapter
from .trained import use_trained_copies


@contextmanager
def folded(net: nn.Module, name: str) -> Iterator[nn.Module]:
    """`net` computing as if adapter `name` were merged: each adapted layer's base weight is swapped for
    W = f(W0) (the adapter's weight-space formula) and W0 is put back afterwards, untouched.

    A temporary, out-of-place merge: built once per volume instead of once per forward call (unmerged
    adapters rebuild W in every slice batch), so each member runs at the plain network's speed; unlike
    ``merge``/``unmerge`` it restores W0 bit for bit. Extra memory while active: one adapter's folded weights.
    """
    layers = [layer for _, layer in adapted_layers(net) if name in layer.adapters]
    if not layers:
        raise ValueError(f"no adapter named {name!r} to fold")
    originals = [layer.base_layer.weight for layer in layers]
    active = active_adapter(net)
    try:
        set_active_adapter(net, None)
        use_trained_copies(net, name)  # modules the adapter trains in full run its copies
        with torch.no_grad():
            for layer in layers:
                weight = layer.adapters[name].adapted_weight(layer.spec.canonical(layer.base_layer.weight))
                layer.base_layer.weight = nn.Parameter(layer.spec.to_base(weight).contiguous(), requires_grad=False)
        yield net
    finally:
        for layer, weight in zip(layers, originals):
            layer.base_layer.weight = weight
        set_active_adapter(net, active)
