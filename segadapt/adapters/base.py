"""The two modules every method shares.

* :class:`Adapter` — one adapter on one base layer: its own parameters and its update rule, written
  in weight space (``delta_weight`` / ``adapted_weight``) and, where M(dW) is low rank, as factors
  (``low_rank_factors``) for activation space. Subclasses live one family per file (``lora.py``,
  ``cp.py``, ...).
* :class:`AdaptedLayer` — what replaces a targeted ``nn.Linear`` / ``nn.ConvNd`` in the model: the
  frozen base layer plus a ``ModuleDict`` of named adapters, one of them active.

Two computation orders exist for most methods (docs/methods.md, "Computation orders"):

* weight space: build W = f(W0) and run one base-sized conv. Its training cost over the frozen floor
  is one weight-gradient conv, i.e. about full fine-tuning.
* activation space: y = base(x) + up(down(x)) with the k-channel down conv fused into the frozen
  conv (:class:`~segadapt.adapters.layers.FrozenPlusLowRank`). Its extra cost scales with k and the
  number of output positions; the 1x1 up-projection is memory-bound.

``compute="auto"`` picks the faster order per layer and per input shape by timing both once
(``calibration.py``); with ``SEGADAPT_AUTO_COMPUTE=cost_model`` (and where timing is impossible) from the
FLOP model in :meth:`Adapter.uses_activation_space` on CPU, and weight space on GPUs (see there).
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
from torch import nn

from . import calibration
from .config import AdapterConfig
from .layers import (
    LayerSpec,
    forward_with_weight,
    frozen_output,
    frozen_plus_low_rank,
    low_rank_forward,
    output_positions,
    supports_activation_space,
)

# The 1x1 up-projection (k -> Cout channels) and its gradients are memory-bound: per FLOP they run
# about this many times slower than the wide base conv (calibrated with scripts/benchmark_adapters.py
# on the 2-core CPU). Used only by the compute="auto" cost model (SEGADAPT_AUTO_COMPUTE=cost_model).
NARROW_OP_PENALTY = 4.0


class Adapter(nn.Module):
    """Base class of every adapter method.

    Subclasses define their parameters in ``__init__`` (the update must be zero at init, so that
    the adapted layer computes exactly the base function) and implement :meth:`low_rank_factors`
    (with ``activation_form = True``) or :meth:`delta_weight`; non-additive methods override
    :meth:`adapted_weight` and the merge inverse.

    Args:
        base: the frozen base layer (read for shapes and weights, never stored).
        spec: its :class:`LayerSpec`.
        config: the :class:`AdapterConfig`.
        rank: this layer's rank (``config.rank`` after ``rank_pattern``).
    """

    activation_form: ClassVar[bool] = False
    supports_pissa: ClassVar[bool] = False  # init="pissa" defined (lora.py, cp.py)
    supports_eva: ClassVar[bool] = False  # init="eva" defined (lora.py's LoRA, conv_dora; eva.py)
    supports_nested_ranks: ClassVar[bool] = False  # truncate_ and rank sampling defined (lora.py, cp.py)

    def __init__(self, base: nn.Module, spec: LayerSpec, config: AdapterConfig, rank: int) -> None:
        super().__init__()
        bound = self.rank_bound(spec, config)
        if rank > bound:  # checked before any subclass allocates its factors
            raise ValueError(
                f"rank {rank} exceeds {bound}, the most a {type(self).__name__} update of this {spec.kind} layer "
                f"(weight {'x'.join(map(str, spec.shape))}) can hold"
            )
        if config.init == "eva" and not self.supports_eva:
            raise ValueError(f"init='eva' is not defined for {type(self).__name__}; it applies to lora, conv_lora and conv_dora")
        if config.init == "pissa" and not self.supports_pissa:
            raise ValueError(f"init='pissa' is not defined for {type(self).__name__}; it applies to lora, conv_lora, lora_c, cp_lora and their DoRA forms")
        if config.nested_ranks and not self.supports_nested_ranks:
            raise ValueError(f"nested_ranks is not defined for {type(self).__name__}; it applies to lora, conv_lora, lora_c, cp_lora and their DoRA forms")
        self.config = config
        self.spec = spec
        self.rank = rank
        self.sampled_rank: Optional[int] = None  # nested ranks: the b of the current training forward
        self.scaling = config.scaling(rank)
        self.compute = config.compute
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.has_activation_form = self.activation_form and supports_activation_space(base, spec)
        if config.dropout > 0 and not self.has_activation_form:
            raise ValueError(
                f"dropout={config.dropout} needs an activation-space form; {type(self).__name__} on a "
                f"{spec.kind} layer computes in weight space only (set dropout=0)"
            )

    @classmethod
    def rank_bound(cls, spec: LayerSpec, config: AdapterConfig) -> int:
        """The largest rank this method accepts on a layer (each method states its bound in its docstring).

        Here (the LoRA forms) max(Cout, Cin k^d): M(dW) = B A has rank <= min(Cout, Cin k^d) anyway, and
        beyond the larger size both factors are redundant, so such a rank is refused as a mistake; ranks
        between the two sizes are accepted, so that one rank can serve a whole network whose narrowest
        layers (e.g. a 1-channel output) have fewer channels."""
        return max(spec.cout, spec.fan_in)

    @classmethod
    def rank_cap(cls, spec: LayerSpec, config: AdapterConfig) -> int:
        """The largest rank this method builds on a layer under `config`: what ``cap_rank`` caps at. Here
        :meth:`rank_bound`; the families whose init needs fewer (PiSSA's principal directions, EVA's input
        directions) say so in their own."""
        return cls.rank_bound(spec, config)

    def used_rank(self) -> tuple[int, float]:
        """(b, s_b): the components in use and their scaling -- all r and s, except in a training
        forward with ``nested_ranks`` (b sampled in :meth:`forward`, s_b = alpha / b)."""
        if self.training and self.config.nested_ranks and self.sampled_rank is not None:
            return self.sampled_rank, self.config.scaling(self.sampled_rank)
        return self.rank, self.scaling

    def sample_rank(self) -> None:
        """Draw b ~ U{1..r} for this forward (nested ranks, training only)."""
        self.sampled_rank = int(torch.randint(1, self.rank + 1, ())) if self.training and self.config.nested_ranks else None

    def truncate_(self, rank: int) -> None:
        """Keep the first ``rank`` components (nested ranks); methods with ``supports_nested_ranks`` define it."""
        raise ValueError(f"{type(self).__name__} has no nested ranks to truncate")

    @property
    def eva_pending(self) -> bool:
        """True while an ``init="eva"`` adapter waits for :func:`~segadapt.adapters.eva.eva_init`."""
        return False

    def base_changed(self, base: nn.Module) -> None:
        """Recompute whatever the adapter derives from the base weight (SALT's SVD). Called after a
        ``load_state_dict`` that reaches the adapted layer; call it after editing ``base.weight`` in place."""

    @property
    def dropout_active(self) -> bool:
        """True in training mode with a dropout probability > 0."""
        return self.training and isinstance(self.dropout, nn.Dropout) and self.dropout.p > 0

    # --- the update rule (canonical layout (Cout, Cin, *kernel)) ---------------------------------
    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with M(dW) = up @ down, scaling included; up: Cout x k, down: k x Cin*prod(kernel).
        Methods with ``activation_form = True`` implement it."""
        raise NotImplementedError

    def branch_rank(self) -> int:
        """k, the inner size of :meth:`low_rank_factors`."""
        return self.rank

    def delta_weight(self) -> torch.Tensor:
        """The additive update dW (canonical layout), scaling included."""
        up, down = self.low_rank_factors()
        return (up @ down).view(self.spec.shape)

    def adapted_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """W = W0 + dW (canonical layout). Non-additive methods override this."""
        return w0 + self.delta_weight()

    def plus_low_rank(self, w0: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: float = 1.0) -> Optional[torch.Tensor]:
        """W = W0 + alpha up @ down as one ``addmm`` on the matrix view (rows = up's rows), no dW tensor
        (canonical layout). ``None`` under autocast, where addmm would round W0 to the autocast dtype first:
        the caller then takes W0 + dW."""
        if torch.is_autocast_enabled(w0.device.type):
            return None
        return torch.addmm(w0.reshape(up.shape[0], -1), up, down, alpha=alpha).view(w0.shape)

    def branch_output(self, base: nn.Module, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """conv(x, W0) + up(down(x)) without the bias. With dropout active, the branch sees dropout(x)
        and the frozen layer x, so the two cannot share one conv."""
        if self.dropout_active:
            return frozen_output(base, self.spec, x) + low_rank_forward(base, self.spec, self.dropout(x), down, up)
        return frozen_plus_low_rank(base, self.spec, x, down, up)

    def activation_output(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The adapted output computed in activation space: base(x) + up(down(x))."""
        up, down = self.low_rank_factors()
        return with_bias(base, self.branch_output(base, x, up, down))

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
        return 2.0 * self.spec.cout * self.spec.fan_in * self.branch_rank()

    def uses_activation_space(self, base: nn.Module, x: torch.Tensor) -> bool:
        """Pick the computation order for this call. ``compute="auto"``: measured once per layer and input
        shape (``calibration.py``), or with ``SEGADAPT_AUTO_COMPUTE=cost_model`` from a FLOP model of the extra cost over the
        frozen layer (training counts forward + both backward products; inference the forward only):

        * weight space: the weight-gradient conv (2 N_out Cout Cin k^d) + building dW;
        * activation space (:class:`FrozenPlusLowRank`): k extra channels in the fused conv and its
          two backward products (2 N_out k Cin k^d each), plus the 1x1 up-projection and its two
          gradients, which are memory-bound and weighted by ``NARROW_OP_PENALTY``.

        On accelerators (any non-CPU input) auto means weight space: a GPU does ~100x more FLOPs per byte
        than this CPU, so the memory-bound narrow ops cost far more than the CPU calibration says. On an
        H200 (bf16, 96^3 UNet) weight space was faster for every method, by 1.1-1.7x over the FLOP model's mix.

        Weight space always (even with ``compute="activation"``) where the base weight requires grad:
        the activation form treats W0 as frozen and returns no gradient for it; and for an unbatched
        conv input (Cin, *S), which the fused op does not take.

        Activation space always in training with dropout (whatever the device, cost or compute mode):
        the branch then runs as plain ops on dropout(x) beside the frozen layer (``branch_output``),
        which also gives W0 its gradient; weight space could not apply the dropout.
        """
        if self.has_activation_form and self.dropout_active:
            return True
        if not self.has_activation_form or self.compute == "weight":
            return False
        if base.weight.requires_grad:  # FrozenPlusLowRank returns no gradient for W0
            return False
        if self.spec.kind != "linear" and x.dim() == self.spec.ndim + 1:  # unbatched (Cin, *S) input
            return False
        if self.compute == "activation":
            return True
        if calibration.mode() == "measure" and calibration.can_measure(x):
            return calibration.measured_choice(self, base, x)
        if x.device.type != "cpu":
            return False
        spec, k = self.spec, self.branch_rank()
        n_out = output_positions(base, spec, x)
        passes = 3.0 if torch.is_grad_enabled() else 1.0
        weight_cost = passes * self.build_flops()
        if passes > 1:
            weight_cost += 2.0 * n_out * spec.cout * spec.fan_in
        activation_cost = passes * 2.0 * n_out * k * (spec.fan_in + NARROW_OP_PENALTY * spec.cout)
        return activation_cost < weight_cost

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if self.training and self.config.init == "eva" and self.eva_pending:
            raise RuntimeError("init='eva' adapter not initialised: call segadapt.adapters.eva_init(model, run) on a few "
                               "target batches before training")
        self.sample_rank()
        return self.run_order(base, x, self.uses_activation_space(base, x), output_size)

    def run_order(self, base: nn.Module, x: torch.Tensor, activation: bool, output_size=None) -> torch.Tensor:
        """The adapted output in the given computation order (activation or weight space)."""
        if activation:
            return self.activation_output(base, x)
        weight = self.spec.to_base(self.adapted_weight(self.spec.canonical(base.weight)))
        return forward_with_weight(base, self.spec, x, weight, output_size)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, compute={self.compute}"


def with_bias(base: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """y + b0, b0 broadcast over the output channels."""
    if base.bias is None:
        return y
    shape = (-1,) if y.dim() < 2 or isinstance(base, nn.Linear) else (-1,) + (1,) * (y.dim() - 2)
    return y + base.bias.to(y.dtype).view(shape)


def kaiming_uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) for a factor whose fan-in is given explicitly:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the LoRA / nn.Linear default)."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def init_down_factor_(tensor: torch.Tensor, fan_in: int, init: str, rank: int, std: Optional[float] = None) -> torch.Tensor:
    """Initialise a non-zero ("down") factor: kaiming-uniform, or ``init="gaussian"``: normal with
    standard deviation ``std`` (default 1/r, PEFT's gaussian LoRA init)."""
    if init == "gaussian":
        with torch.no_grad():
            return tensor.normal_(0.0, 1.0 / rank if std is None else std)
    return kaiming_uniform_(tensor, fan_in)


def canonical_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 with a deterministic sign: the largest-magnitude entry of each left
    singular vector is positive. Returns U (m x q), sig (q), Vh (q x n) in the input's dtype."""
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1.0
    u, vh = u * signs, vh * signs[:, None]
    return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def principal_factors(matrix: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (B0, A0) with s B0 A0 = U_r diag(sig_r) V_r^T, the top-r part of ``matrix``:
    B0 = U_r sqrt(sig_r / s), A0 = sqrt(sig_r / s) V_r^T (SVD with :func:`canonical_svd`'s signs)."""
    if rank > min(matrix.shape):
        raise ValueError(f"init='pissa' needs rank <= {min(matrix.shape)}, the singular values of the {matrix.shape[0]} x {matrix.shape[1]} weight matrix; got {rank}")
    u, sig, vh = canonical_svd(matrix)
    root = (sig[:rank] / scaling).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


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
        # a loaded base weight may be another base's: adapters that derive state from it recompute it
        self.register_load_state_dict_post_hook(self._after_load)

    def _after_load(self, module: nn.Module, incompatible_keys) -> None:
        if self.merged_adapter is None:  # a merged weight is not W0; what was derived from W0 stays
            for adapter in self.adapters.values():
                adapter.base_changed(self.base_layer)

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
