"""CP-LoRA: the update is a rank-r CP (CANDECOMP/PARAFAC) tensor in the conv weight's own shape.

dW[o, i, k_1, ..., k_d] = s * sum_r U_out[o, r] U_in[i, r] U_1[k_1, r] ... U_d[k_d, r]

Weight space builds dW with ``tensorly.cp_to_tensor``. Activation space uses that M(dW) is low rank,
M(dW) = s U_out (U_in kr U_1 kr ... kr U_d)^T (kr: Khatri-Rao product): the r-channel down conv carries
the CP kernel and runs fused with the frozen conv (``FrozenPlusLowRank``), then a 1x1 conv r -> Cout.
(The separable form -- 1x1, one depthwise 1D conv per axis, 1x1 -- has fewer FLOPs but measured
slower and heavier, DESIGN.md's performance notes.) On ``nn.Linear`` (d = 0) it is plain LoRA with
B = U_out, A = U_in^T.
"""

from __future__ import annotations

import math

import tensorly as tl
import torch
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

    Trainable parameters: r * (Cout + Cin + sum_j k_j). Rank bound: r <= Cout Cin prod(k) / max(Cout, Cin, k_j),
    the largest CP rank a tensor of the weight's shape can have (min(Cout, Cin) for linear).
    With ``init="gaussian"`` each of the d + 1 non-zero factors has standard deviation r^(-1/(d+1)), so
    that their Khatri-Rao product (M(dW)'s down factor) has entries of standard deviation 1/r.
    """

    @classmethod
    def rank_bound(cls, spec, config) -> int:
        return math.prod(spec.shape) // max(spec.shape)

    activation_form = True

    def __init__(self, base, spec, config, rank):
        super().__init__(base, spec, config, rank)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.cp_out = nn.Parameter(torch.zeros(spec.cout, rank, **factory))
        self.cp_in = nn.Parameter(torch.empty(spec.cin, rank, **factory))
        self.cp_spatial = nn.ParameterList(nn.Parameter(torch.empty(k, rank, **factory)) for k in spec.kernel)
        std = rank ** (-1.0 / (1 + spec.ndim))
        for factor in (self.cp_in, *self.cp_spatial):
            init_down_factor_(factor, factor.shape[0], config.init, rank, std=std)

    @property
    def factors(self) -> list[torch.Tensor]:
        """[U_out, U_in, U_1, ..., U_d] (unscaled)."""
        return [self.cp_out, self.cp_in, *self.cp_spatial]

    def delta_weight(self) -> torch.Tensor:
        return cp_delta(self.factors, self.scaling)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """up = s U_out (Cout x r); down = the Khatri-Rao product of U_in, U_1..U_d, transposed (r x Cin k^d)."""
        with tl.backend_context("pytorch", local_threadsafe=True):
            down = tl.tenalg.khatri_rao([self.cp_in, *self.cp_spatial]).t() if self.cp_spatial else self.cp_in.t()
        return self.scaling * self.cp_out, down
