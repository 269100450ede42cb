"""CP-LoRA: the update is a rank-r CP (CANDECOMP/PARAFAC) tensor in the conv weight's own shape.

dW[o, i, k_1, ..., k_d] = s * sum_r U_out[o, r] U_in[i, r] U_1[k_1, r] ... U_d[k_d, r]

Weight space builds dW with ``tensorly.cp_to_tensor``. Activation space runs the same tensor as a
separable conv: 1x1 conv Cin -> r (U_in), one depthwise 1D conv per spatial axis (U_j, with the base
stride / padding / dilation of that axis), 1x1 conv r -> Cout (s U_out). On ``nn.Linear`` (d = 0)
it is plain LoRA with B = U_out, A = U_in^T.
"""

from __future__ import annotations

import tensorly as tl
import torch
from torch import nn

from .base import Adapter, init_down_factor_
from .layers import conv_nd
from .registry import register_method


def cp_delta(factors: list[torch.Tensor], scaling: float) -> torch.Tensor:
    """s * [[U_out, U_in, U_1, ..., U_d]] as a dense tensor (Cout, Cin, k_1, ..., k_d), via TensorLy."""
    with tl.backend_context("pytorch", local_threadsafe=True):
        return tl.cp_to_tensor((None, [scaling * factors[0], *factors[1:]]))


@register_method("cp_lora")
class CPLoRA(Adapter):
    """dW = s * [[U_out, U_in, U_1..U_d]]; U_out (Cout x r) zeros, the others kaiming-uniform.

    Trainable parameters: r * (Cout + Cin + sum_j k_j).
    """

    activation_form = True

    def __init__(self, base, spec, config, rank):
        super().__init__(base, spec, config, rank)
        if spec.kind == "conv" and isinstance(base.padding, str):
            self.has_activation_form = False  # "same"/"valid" padding is not split per axis here
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.cp_out = nn.Parameter(torch.zeros(spec.cout, rank, **factory))
        self.cp_in = nn.Parameter(torch.empty(spec.cin, rank, **factory))
        self.cp_spatial = nn.ParameterList(nn.Parameter(torch.empty(k, rank, **factory)) for k in spec.kernel)
        for factor in (self.cp_in, *self.cp_spatial):
            init_down_factor_(factor, factor.shape[0], config.init, rank)

    @property
    def factors(self) -> list[torch.Tensor]:
        """[U_out, U_in, U_1, ..., U_d] (unscaled)."""
        return [self.cp_out, self.cp_in, *self.cp_spatial]

    def delta_weight(self) -> torch.Tensor:
        return cp_delta(self.factors, self.scaling)

    def build_flops(self) -> float:
        return 2.0 * self.spec.cout * self.spec.fan_in * self.rank

    def activation_delta(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        spec, rank = self.spec, self.rank
        up = self.scaling * self.cp_out
        if spec.kind == "linear":
            return nn.functional.linear(nn.functional.linear(x, self.cp_in.t()), up)
        ones = (1,) * spec.ndim
        h = conv_nd(spec, x, self.cp_in.t().reshape(rank, spec.cin, *ones))
        for axis, factor in enumerate(self.cp_spatial):
            shape = [1] * spec.ndim
            shape[axis] = factor.shape[0]
            per_axis = lambda values, default: tuple(v if a == axis else default for a, v in enumerate(values))
            h = conv_nd(
                spec,
                h,
                factor.t().reshape(rank, 1, *shape),
                stride=per_axis(base.stride, 1),
                padding=per_axis(base.padding, 0),
                dilation=per_axis(base.dilation, 1),
                groups=rank,
            )
        return conv_nd(spec, h, up.reshape(spec.cout, rank, *ones))

    def activation_flops(self, base, x, n_out):
        n_in = x.numel() // self.spec.cin
        return 2.0 * self.rank * (n_in * (self.spec.cin + sum(self.spec.kernel)) + n_out * self.spec.cout)
