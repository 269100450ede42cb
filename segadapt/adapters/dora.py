"""DoRA variants: magnitude and direction of a LoRA-form update (``dora_c``, ``conv_dora``, ``cp_dora``).

W = m * V / ||V||_c,   V = W0 + dW (dW from the wrapped LoRA form),

with ||.||_c the norm per output channel over all other dims, treated as a constant in backward
(the DoRA paper's memory saving, as PEFT does), and m (Cout) initialised to ||W0||_c so that W = W0
at init. Trainable parameters: those of the LoRA form + Cout.

Activation space (where the LoRA form has one): y = (m / ||V||_c) * (base(x) - b0 + g(x)) + b0, where
g is the LoRA form's activation-space update; the frozen conv runs once (PEFT runs it twice).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from torch import nn

from .base import Adapter, with_bias
from .cp import CPLoRA
from .lora import LoRA, LoRAC
from .registry import register_method


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_c: L2 norm of each output channel over all other dims (canonical layout) -> (Cout,)."""
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)


class DoRA(Adapter):
    """Magnitude m (Cout) times the normalised direction W0 + dW of ``direction_cls``."""

    direction_cls: ClassVar[type[Adapter]]  # subclasses set activation_form = direction_cls.activation_form
    supports_pissa = True  # every direction form has it: V starts at W0 all the same
    supports_nested_ranks = True

    @classmethod
    def rank_bound(cls, spec, config) -> int:
        """That of the LoRA form."""
        return cls.direction_cls.rank_bound(spec, config)

    @classmethod
    def rank_cap(cls, spec, config) -> int:
        """That of the LoRA form."""
        return cls.direction_cls.rank_cap(spec, config)

    def __init__(self, base, spec, config, rank):
        super().__init__(base, spec, config, rank)  # checks dropout under this class's name
        # the direction's own dropout would go unused: DoRA applies self.dropout in branch_output
        self.direction = self.direction_cls(base, spec, replace(config, dropout=0.0), rank)
        self.magnitude = nn.Parameter(channel_norm(spec.canonical(base.weight).detach()).clone())
        # ||W0 + dW||_c at merge time, for unmerge; a buffer so that .to() moves and casts it
        self.register_buffer("_merge_norm", None, persistent=False)

    def _scale(self, direction: torch.Tensor) -> torch.Tensor:
        """m / ||V||_c with the norm detached (computed outside autograd), shaped (Cout, 1, ..., 1) for the weight."""
        norm = channel_norm(direction.detach())
        return (self.magnitude / norm).view(-1, *(1,) * (direction.dim() - 1))

    def adapted_weight(self, w0: torch.Tensor) -> torch.Tensor:
        direction = self.direction.adapted_weight(w0)  # W0 + dW
        return self._scale(direction) * direction

    def activation_output(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        up, down = self.direction.low_rank_factors()
        with torch.no_grad():
            norm = channel_norm(self.spec.canonical(base.weight) + (up @ down).view(self.spec.shape))
        scale = (self.magnitude / norm).view(self.spec.channel_view())
        y = self.branch_output(base, x, up, down)
        return with_bias(base, scale.to(y.dtype) * y)

    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        direction = w0 + self.direction.delta_weight()
        self._merge_norm = channel_norm(direction)
        return self._scale(direction) * direction

    def unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        if self._merge_norm is None:
            raise RuntimeError("this DoRA adapter was not merged in this session; cannot unmerge")
        scale = (self.magnitude / self._merge_norm).view(-1, *(1,) * (w.dim() - 1))
        self._merge_norm = None
        return w / scale - self.direction.delta_weight()

    @property
    def eva_pending(self) -> bool:
        return self.direction.eva_pending

    def set_eva_down(self, gram: torch.Tensor) -> None:
        self.direction.set_eva_down(gram)

    def sample_rank(self) -> None:
        super().sample_rank()
        self.direction.sampled_rank = self.sampled_rank

    def truncate_(self, rank: int) -> None:
        self.direction.truncate_(rank)
        self.rank = rank

    def branch_rank(self) -> int:
        return self.direction.branch_rank()

    def build_flops(self) -> float:
        return self.direction.build_flops()


@register_method("dora_c")
class DoRAC(DoRA):
    """DoRA-C: DoRA on the LoRA-C update (weight space only)."""

    direction_cls = LoRAC
    activation_form = False


@register_method("conv_dora")
class ConvDoRA(DoRA):
    """convDoRA: DoRA on the convLoRA update (plain DoRA on nn.Linear)."""

    direction_cls = LoRA
    activation_form = True
    supports_eva = True


@register_method("cp_dora")
class CPDoRA(DoRA):
    """CP-DoRA: DoRA on the CP-LoRA update."""

    direction_cls = CPLoRA
    activation_form = True
