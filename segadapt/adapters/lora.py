"""LoRA family: ``lora`` / ``conv_lora`` (one low-rank matrix update) and ``lora_c`` (LoRA-C).

The two conv forms are different maths, often conflated in public code:

* ``conv_lora`` (convLoRA, the LoCon / PEFT form): M(dW) = s * B A with A: r x (Cin k^d), i.e. a
  down conv Cin -> r with the base kernel/stride/padding/dilation followed by a 1x1 up conv r -> Cout.
  On ``nn.Linear`` it is plain LoRA, so ``lora`` and ``conv_lora`` name the same class.
* ``lora_c`` (LoRA-C, the loralib ``ConvLoRA`` form): dW = s * reshape(B A) with A: (r k) x (Cin k^(d-1))
  and B: (Cout k) x (r k), reshaped row-major to (Cout, Cin, k, ..., k); it has no activation form.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, init_down_factor_
from .registry import register_method


@register_method("lora", "conv_lora")
class LoRA(Adapter):
    """W = W0 + s * reshape(B A); A (r x Cin k^d) kaiming-uniform, B (Cout x r) zeros.

    Trainable parameters: r * (Cin k^d + Cout). Rank bound: r <= max(Cout, Cin k^d) (see ``Adapter.rank_bound``).
    Activation space: y = base(x) + up(down(x)), down = conv(A) with the base geometry, up = 1x1 conv(s B).
    """

    activation_form = True

    def __init__(self, base, spec, config, rank):
        super().__init__(base, spec, config, rank)
        self.lora_A = nn.Parameter(torch.empty(rank, spec.fan_in, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(spec.cout, rank, dtype=base.weight.dtype, device=base.weight.device))
        init_down_factor_(self.lora_A, spec.fan_in, config.init, rank)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scaling * self.lora_B, self.lora_A


@register_method("lora_c")
class LoRAC(Adapter):
    """LoRA-C: W = W0 + s * reshape(B A), A ((r k) x (Cin k^(d-1))) kaiming-uniform, B ((Cout k) x (r k)) zeros.

    k is the first kernel size (1 for linear). Trainable parameters: r k (Cin k^(d-1) + Cout k).
    Rank bound: r <= max(Cout k, Cin k^(d-1)), the larger side of the matrix B A (as for LoRA, see
    ``Adapter.rank_bound``). Weight space only.
    """

    @classmethod
    def rank_bound(cls, spec, config) -> int:
        k = spec.kernel[0] if spec.kernel else 1
        return max(spec.cout * k, spec.fan_in // k)

    def __init__(self, base, spec, config, rank):
        super().__init__(base, spec, config, rank)
        k = spec.kernel[0] if spec.kernel else 1
        a_cols = spec.fan_in // k
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank * k, a_cols, **factory))
        self.lora_B = nn.Parameter(torch.zeros(spec.cout * k, rank * k, **factory))
        init_down_factor_(self.lora_A, a_cols, config.init, rank)

    def delta_weight(self) -> torch.Tensor:
        return (self.scaling * self.lora_B @ self.lora_A).view(self.spec.shape)

    def build_flops(self) -> float:
        return 2.0 * self.lora_B.shape[0] * self.lora_B.shape[1] * self.lora_A.shape[1]
