"""The two modules every method shares.

* :class:`Adapter` — one adapter on one base layer: its own parameters and its update rule, written
  once in weight space (``adapted_weight``) and, where the maths allows, once in activation space
  (``activation_delta``). Subclasses live one family per file (``lora.py``, ``cp.py``, ...).
* :class:`AdaptedLayer` — what replaces a targeted ``nn.Linear`` / ``nn.ConvNd`` in the model: the
  frozen base layer plus a ``ModuleDict`` of named adapters, one of them active.

Two computation orders exist for most methods (DESIGN.md, "Performance notes"):

* weight space: build W = f(W0) and run one base-sized conv. Its training cost over the frozen floor
  is one weight-gradient conv, i.e. about full fine-tuning.
* activation space: y = base(x) + g(x) with small extra convs. Its extra cost scales with the rank
  and the number of output positions, and narrow (r-channel) convs run far below peak speed.

``compute="auto"`` picks the cheaper order per layer and per input shape from the FLOP model in
:meth:`Adapter.uses_activation_space`.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
from torch import nn

from .config import AdapterConfig
from .layers import LayerSpec, forward_with_weight, output_positions, supports_activation_space

# Narrow convs (r output channels) and the 1x1 up-projections are memory-bound: measured on the
# 2-core CPU benchmark (scripts/benchmark_adapters.py) they run about this many times slower per
# FLOP than the wide base conv. Used only by the compute="auto" cost model.
NARROW_OP_PENALTY = 4.0


class Adapter(nn.Module):
    """Base class of every adapter method.

    Subclasses define their parameters in ``__init__`` (the update must be zero at init, so that
    the adapted layer computes exactly the base function) and implement :meth:`delta_weight`; they
    may override :meth:`adapted_weight` (non-additive methods), :meth:`activation_delta` (with
    ``activation_form = True``) and the FLOP estimates.

    Args:
        base: the frozen base layer (read for shapes and weights, never stored).
        spec: its :class:`LayerSpec`.
        config: the :class:`AdapterConfig`.
        rank: this layer's rank (``config.rank`` after ``rank_pattern``).
    """

    activation_form: ClassVar[bool] = False

    def __init__(self, base: nn.Module, spec: LayerSpec, config: AdapterConfig, rank: int) -> None:
        super().__init__()
        self.spec = spec
        self.rank = rank
        self.scaling = config.scaling(rank)
        self.compute = config.compute
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.has_activation_form = self.activation_form and supports_activation_space(base, spec)
        if config.dropout > 0 and not self.has_activation_form:
            raise ValueError(
                f"dropout={config.dropout} needs an activation-space form; {type(self).__name__} on a "
                f"{spec.kind} layer computes in weight space only (set dropout=0)"
            )

    # --- the update rule (canonical layout (Cout, Cin, *kernel)) ---------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The additive update dW (canonical layout), scaling included."""
        raise NotImplementedError

    def adapted_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """W = W0 + dW (canonical layout). Non-additive methods override this."""
        return w0 + self.delta_weight()

    def activation_delta(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """g(x) such that the adapted output is base(x) + g(x) (activation-space form)."""
        raise NotImplementedError

    def activation_output(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The adapted output computed in activation space; DoRA overrides it (rescales base(x))."""
        return base(x) + self.activation_delta(base, self.dropout(x))

    # --- merging ---------------------------------------------------------------------------------
    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """W to store in the base layer when merging (canonical layout, no autograd)."""
        return self.adapted_weight(w0)

    def unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_weight`: the base weight W0 back from a merged W."""
        return w - self.delta_weight()

    def regularization(self) -> Optional[torch.Tensor]:
        """An optional loss term (e.g. TLoRA's identity regulariser); ``None`` if the method has none."""
        return None

    # --- computation order -----------------------------------------------------------------------
    def build_flops(self) -> float:
        """FLOPs to build dW once (forward)."""
        return 2.0 * self.spec.cout * self.spec.fan_in * self.rank

    def activation_flops(self, base: nn.Module, x: torch.Tensor, n_out: int) -> float:
        """FLOPs of one :meth:`activation_delta` forward."""
        raise NotImplementedError

    def uses_activation_space(self, base: nn.Module, x: torch.Tensor) -> bool:
        """Pick the computation order for this call.

        Extra cost over the frozen base, forward + backward (backward ~ 2x forward):
        weight space = weight-gradient conv (2 * N_out * Cout * Cin*k^d) + 3 x building dW;
        activation space = 3 x the extra convs, times ``NARROW_OP_PENALTY``. Without autograd
        (inference) only the forward parts count.
        """
        if not self.has_activation_form or self.compute == "weight":
            return False
        if self.compute == "activation":
            return True
        n_out = output_positions(base, self.spec, x)
        training = torch.is_grad_enabled()
        passes = 3.0 if training else 1.0
        weight_cost = passes * self.build_flops()
        if training:
            weight_cost += 2.0 * n_out * self.spec.cout * self.spec.fan_in
        activation_cost = passes * NARROW_OP_PENALTY * self.activation_flops(base, x, n_out)
        return activation_cost < weight_cost

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if self.uses_activation_space(base, x):
            return self.activation_output(base, x)
        weight = self.spec.to_base(self.adapted_weight(self.spec.canonical(base.weight)))
        return forward_with_weight(base, self.spec, x, weight, output_size)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, compute={self.compute}"


def kaiming_uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) for a factor whose fan-in is given explicitly:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the LoRA / nn.Linear default)."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def init_down_factor_(tensor: torch.Tensor, fan_in: int, init: str, rank: int) -> torch.Tensor:
    """Initialise a non-zero ("down") factor: kaiming-uniform, or N(0, 1/r) for ``init="gaussian"``."""
    if init == "gaussian":
        with torch.no_grad():
            return tensor.normal_(0.0, 1.0 / rank)
    return kaiming_uniform_(tensor, fan_in)


class AdaptedLayer(nn.Module):
    """A frozen base layer with named adapters; the active one (if any, and unless merged) applies.

    Attributes:
        base_layer: the original ``nn.Linear`` / ``nn.ConvNd`` / ``nn.ConvTransposeNd``.
        adapters: ``ModuleDict`` name -> :class:`Adapter`.
        active_adapter: name of the adapter used in ``forward`` (``None``: base only).
        merged_adapter: name of the adapter folded into ``base_layer.weight`` (``None``: unmerged).
    """

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.spec = spec
        self.adapters = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.merged_adapter: Optional[str] = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapter
        if self.merged_adapter is not None or name is None or name not in self.adapters:
            return self.base_layer(x, *args, **kwargs)
        return self.adapters[name](self.base_layer, x, *args, **kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the base weight (in place)."""
        if self.merged_adapter is not None or self.active_adapter not in self.adapters:
            return
        weight = self.spec.canonical(self.base_layer.weight)
        weight.copy_(self.adapters[self.active_adapter].merged_weight(weight.clone()))
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight from a merged one (in place)."""
        if self.merged_adapter is None:
            return
        weight = self.spec.canonical(self.base_layer.weight)
        weight.copy_(self.adapters[self.merged_adapter].unmerged_weight(weight.clone()))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return f"active={self.active_adapter!r}, merged={self.merged_adapter!r}"
