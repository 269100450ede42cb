"""CP-LoRA: the update is a rank-r CP (CANDECOMP/PARAFAC) tensor in the conv weight's own shape.

dW[o, i, k_1, ..., k_d] = s * sum_r U_out[o, r] U_in[i, r] U_1[k_1, r] ... U_d[k_d, r]

Weight space builds dW with ``tensorly.cp_to_tensor``. Activation space uses that M(dW) is low rank,
M(dW) = s U_out (U_in kr U_1 kr ... kr U_d)^T (kr: Khatri-Rao product): the r-channel down conv carries
the CP kernel and runs fused with the frozen conv (``FrozenPlusLowRank``), then a 1x1 conv r -> Cout.
(The separable form -- 1x1, one depthwise 1D conv per axis, 1x1 -- has fewer FLOPs but measured
slower and heavier, docs/methods.md, "Computation orders".) On ``nn.Linear`` (d = 0) it is plain LoRA with
B = U_out, A = U_in^T.

``init="pissa"``, the CP analogue of PiSSA: the factors start as a rank-r PARAFAC of W0
(``tensorly.decomposition.parafac``, SVD-initialised ALS; U_out carries the weights and 1/s) and the
base keeps the residual, W = (W0 - s [[U0]]) + s [[U]]: the initial factors are (saved) buffers and
dW = s ([[U]] - [[U0]]), exactly zero at init; activation space then has rank 2r.
"""

from __future__ import annotations

import math

import tensorly as tl
import torch
from tensorly.decomposition import parafac
from torch import nn

from .base import Adapter, init_down_factor_
from .registry import register_method


def cp_delta(factors: list[torch.Tensor], scaling: float) -> torch.Tensor:
    """s * [[U_out, U_in, U_1, ..., U_d]] as a dense tensor (Cout, Cin, k_1, ..., k_d), via TensorLy."""
    with tl.backend_context("pytorch", local_threadsafe=True):
        return tl.cp_to_tensor((None, [scaling * factors[0], *factors[1:]]))


@register_method("cp_lora")
class CPLoRA(Adapter):
    """dW = s * [[U_out, U_in, U_1..U_d]]; U_out (Cout x r) zeros, the others kaiming-uniform.

    Trainable parameters: r * (Cout + Cin + sum_j k_j). Rank bound: r <= Cout Cin prod(k) / min(Cout, Cin, k_j).
    A tensor of the weight's shape has CP rank at most Cout Cin prod(k) / max(Cout, Cin, k_j); as with the LoRA
    forms (``Adapter.rank_bound``) ranks up to the larger bound are accepted, so that one rank serves a whole
    network whose narrowest layers (a 1-channel output: weight 1 x C x 1 x 1 x 1) hold less.
    With ``init="gaussian"`` each of the d + 1 non-zero factors has standard deviation r^(-1/(d+1)), so
    that their Khatri-Rao product (M(dW)'s down factor) has entries of standard deviation 1/r.
    """

    @classmethod
    def rank_bound(cls, spec, config) -> int:
        return math.prod(spec.shape) // min(spec.shape)

    activation_form = True
    supports_pissa = True
    supports_nested_ranks = True

    def __init__(self, base, spec, config, rank):
        super().__init__(base, spec, config, rank)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.cp_out = nn.Parameter(torch.zeros(spec.cout, rank, **factory))
        self.cp_in = nn.Parameter(torch.empty(spec.cin, rank, **factory))
        self.cp_spatial = nn.ParameterList(nn.Parameter(torch.empty(k, rank, **factory)) for k in spec.kernel)
        std = rank ** (-1.0 / (1 + spec.ndim))
        for factor in (self.cp_in, *self.cp_spatial):
            init_down_factor_(factor, factor.shape[0], config.init, rank, std=std)
        self.pissa = config.init == "pissa"
        if self.pissa:
            with tl.backend_context("pytorch", local_threadsafe=True):
                weights, found = parafac(spec.canonical(base.weight).detach().double(), rank, init="svd", random_state=0)
            found = [found[0] * weights / self.scaling, *found[1:]]
            with torch.no_grad():
                for index, (param, value) in enumerate(zip(self.factors, found)):
                    param.copy_(value)
                    self.register_buffer(f"initial_{index}", param.detach().clone())

    @property
    def initial(self) -> list[torch.Tensor] | None:
        """[U0_out, U0_in, U0_1, ..., U0_d] of the PiSSA init (``None`` otherwise)."""
        return [getattr(self, f"initial_{i}") for i in range(2 + self.spec.ndim)] if self.pissa else None

    @property
    def factors(self) -> list[torch.Tensor]:
        """[U_out, U_in, U_1, ..., U_d] (unscaled)."""
        return [self.cp_out, self.cp_in, *self.cp_spatial]

    def delta_weight(self) -> torch.Tensor:
        if self.initial is None:
            b, s = self.used_rank()
            return cp_delta([f[:, :b] for f in self.factors], s)
        return cp_delta(self.factors, self.scaling) - cp_delta(self.initial, self.scaling)

    def adapted_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """W0 + s U_out (U_in kr U_1 kr ... kr U_d)^T in one addmm (the CP tensor's matrix view), except with
        PiSSA (two CP tensors that cancel exactly at init) and under autocast: W0 + dW."""
        weight = None if self.initial is not None else self.plus_low_rank(w0, *self.low_rank_factors())
        return w0 + self.delta_weight() if weight is None else weight

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """up = s U_out (Cout x r); down = the Khatri-Rao product of U_in, U_1..U_d, transposed (r x Cin k^d)
        (with PiSSA init: up = s [U_out, -U0_out], down = [KR(U); KR(U0)])."""
        if self.initial is None:
            b, s = self.used_rank()
            return s * self.cp_out[:, :b], khatri_rao_t([f[:, :b] for f in self.factors[1:]])
        up, down = self.scaling * self.cp_out, khatri_rao_t(self.factors[1:])
        initial = self.initial
        return torch.cat([up, -self.scaling * initial[0]], 1), torch.cat([down, khatri_rao_t(initial[1:])])

    def branch_rank(self) -> int:
        return self.rank if self.initial is None else 2 * self.rank

    def truncate_(self, rank: int) -> None:
        """Keep the first ``rank`` rank-one terms; s = alpha / rank."""
        if self.pissa:
            raise ValueError("a PiSSA-initialised adapter cannot be truncated (its residual is the top-r part)")
        trainable = self.cp_out.requires_grad
        keep = lambda f: nn.Parameter(f.detach()[:, :rank].clone(), requires_grad=trainable)  # noqa: E731
        self.cp_out, self.cp_in = keep(self.cp_out), keep(self.cp_in)
        self.cp_spatial = nn.ParameterList(keep(f) for f in self.cp_spatial)
        self.rank, self.scaling = rank, self.config.scaling(rank)


def khatri_rao_t(factors: list[torch.Tensor]) -> torch.Tensor:
    """(U_in kr U_1 kr ... kr U_d)^T, r x Cin k^d."""
    if len(factors) == 1:
        return factors[0].t()
    with tl.backend_context("pytorch", local_threadsafe=True):
        return tl.tenalg.khatri_rao(list(factors)).t()
