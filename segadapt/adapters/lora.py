"""LoRA family: ``lora`` / ``conv_lora`` (one low-rank matrix update) and ``lora_c`` (LoRA-C).

The two conv forms are different maths, often conflated in public code:

* ``conv_lora`` (convLoRA, the LoCon / PEFT form): M(dW) = s * B A with A: r x (Cin k^d), i.e. a
  down conv Cin -> r with the base kernel/stride/padding/dilation followed by a 1x1 up conv r -> Cout.
  On ``nn.Linear`` it is plain LoRA, so ``lora`` and ``conv_lora`` name the same class.
* ``lora_c`` (LoRA-C, the loralib ``ConvLoRA`` form): dW = s * reshape(B A) with A: (r k) x (Cin k^(d-1))
  and B: (Cout k) x (r k), reshaped row-major to (Cout, Cin, k, ..., k); it has no activation form.

``init="pissa"`` (both): B and A start as the top singular directions of the matrix they multiply into
(M(W0) for LoRA, W0 viewed as (Cout k) x (Cin k^(d-1)) for LoRA-C), B0 = U sqrt(sig / s),
A0 = sqrt(sig / s) V^T, and the base keeps the residual: W = (W0 - s B0 A0) + s B A. The frozen base
weight itself is never edited: B0 and A0 are kept as (saved) buffers and the update is
dW = s (B A - B0 A0), exactly zero at init; in activation space it is rank 2r ([B, -B0] [A; A0]).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, init_down_factor_, principal_factors
from .eva import eva_down
from .registry import register_method


@register_method("lora", "conv_lora")
class LoRA(Adapter):
    """W = W0 + s * reshape(B A); A (r x Cin k^d) kaiming-uniform, B (Cout x r) zeros.

    Trainable parameters: r * (Cin k^d + Cout). Rank bound: r <= max(Cout, Cin k^d) (see ``Adapter.rank_bound``).
    Activation space: y = base(x) + up(down(x)), down = conv(A) with the base geometry, up = 1x1 conv(s B).
    """

    activation_form = True
    supports_pissa = True
    supports_eva = True
    supports_nested_ranks = True

    @classmethod
    def rank_cap(cls, spec, config) -> int:
        """PiSSA: min(Cout, Cin k^d), the singular values of M(W0); EVA: Cin k^d, the input directions."""
        bound = cls.rank_bound(spec, config)
        return {"pissa": min(bound, spec.max_rank), "eva": min(bound, spec.fan_in)}.get(config.init, bound)

    def __init__(self, base, spec, config, rank):
        super().__init__(base, spec, config, rank)
        self.lora_A = nn.Parameter(torch.empty(rank, spec.fan_in, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(spec.cout, rank, dtype=base.weight.dtype, device=base.weight.device))
        init_down_factor_(self.lora_A, spec.fan_in, config.init, rank)
        start_on_principal_directions(self, spec.canonical(base.weight).reshape(spec.cout, spec.fan_in), config.init)
        if config.init == "eva":
            # 1 until eva_init has run; a float buffer, so that it is saved, loaded and checked like any tensor
            self.register_buffer("eva_flag", torch.ones((), dtype=base.weight.dtype, device=base.weight.device))
            self._eva_done = False

    @property
    def eva_pending(self) -> bool:
        if getattr(self, "eva_flag", None) is None or self._eva_done:
            return False
        self._eva_done = not bool(self.eva_flag)  # one host sync until it is 0
        return not self._eva_done

    @torch.no_grad()
    def set_eva_down(self, gram: torch.Tensor) -> None:
        """A <- top-r right singular vectors of the patch matrix P, from G = P^T P (``eva.py``)."""
        self.lora_A.copy_(eva_down(gram, self.rank))
        self.eva_flag.zero_()

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.initial_A is None:
            b, s = self.used_rank()
            return s * self.lora_B[:, :b], self.lora_A[:b]
        return self.scaling * torch.cat([self.lora_B, -self.initial_B], 1), torch.cat([self.lora_A, self.initial_A])

    def delta_weight(self) -> torch.Tensor:
        return lora_product(self).view(self.spec.shape)

    def adapted_weight(self, w0: torch.Tensor) -> torch.Tensor:
        weight = None
        if self.initial_A is None:  # (PiSSA: W0 + s (B A - B0 A0), two products that cancel exactly at init)
            b, s = self.used_rank()
            weight = self.plus_low_rank(w0, self.lora_B[:, :b], self.lora_A[:b], s)
        return w0 + self.delta_weight() if weight is None else weight

    def branch_rank(self) -> int:
        return self.rank if self.initial_A is None else 2 * self.rank

    def truncate_(self, rank: int) -> None:
        truncate_lora_(self, rank, rank)


@register_method("lora_c")
class LoRAC(Adapter):
    """LoRA-C: W = W0 + s * reshape(B A), A ((r k) x (Cin k^(d-1))) kaiming-uniform, B ((Cout k) x (r k)) zeros.

    k is the first kernel size (1 for linear). Trainable parameters: r k (Cin k^(d-1) + Cout k).
    Rank bound: r <= max(Cout k, Cin k^(d-1)), the larger side of the matrix B A (as for LoRA, see
    ``Adapter.rank_bound``). Weight space only.
    """

    supports_pissa = True
    supports_nested_ranks = True

    @classmethod
    def rank_bound(cls, spec, config) -> int:
        k = spec.kernel[0] if spec.kernel else 1
        return max(spec.cout * k, spec.fan_in // k)

    @classmethod
    def rank_cap(cls, spec, config) -> int:
        """PiSSA: r k <= min(Cout k, Cin k^(d-1)), the singular values of the matrix B A starts on."""
        k = spec.kernel[0] if spec.kernel else 1
        bound = cls.rank_bound(spec, config)
        return min(bound, min(spec.cout * k, spec.fan_in // k) // k) if config.init == "pissa" else bound

    def __init__(self, base, spec, config, rank):
        super().__init__(base, spec, config, rank)
        k = spec.kernel[0] if spec.kernel else 1
        a_cols = spec.fan_in // k
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank * k, a_cols, **factory))
        self.lora_B = nn.Parameter(torch.zeros(spec.cout * k, rank * k, **factory))
        init_down_factor_(self.lora_A, a_cols, config.init, rank)
        start_on_principal_directions(self, spec.canonical(base.weight).reshape(spec.cout * k, a_cols), config.init)

    def delta_weight(self) -> torch.Tensor:
        if self.initial_A is None:  # component j of the rank is the block of k inner columns j k .. j k + k - 1
            b, s = self.used_rank()
            inner = b * self.lora_A.shape[0] // self.rank
            return (s * self.lora_B[:, :inner] @ self.lora_A[:inner]).view(self.spec.shape)
        return lora_product(self).view(self.spec.shape)

    def adapted_weight(self, w0: torch.Tensor) -> torch.Tensor:
        weight = None
        if self.initial_A is None:
            b, s = self.used_rank()
            inner = b * self.lora_A.shape[0] // self.rank
            weight = self.plus_low_rank(w0, self.lora_B[:, :inner], self.lora_A[:inner], s)
        return w0 + self.delta_weight() if weight is None else weight

    def truncate_(self, rank: int) -> None:
        truncate_lora_(self, rank, rank * self.lora_A.shape[0] // self.rank)

    def build_flops(self) -> float:
        return 2.0 * self.lora_B.shape[0] * self.lora_B.shape[1] * self.lora_A.shape[1]


def start_on_principal_directions(adapter: Adapter, matrix: torch.Tensor, init: str) -> None:
    """``init="pissa"``: lora_B, lora_A <- (B0, A0) of :func:`principal_factors` for ``matrix``, kept as
    buffers ``initial_B`` / ``initial_A`` (saved with the adapter, so that loading needs no SVD to agree);
    otherwise both buffers are ``None``."""
    if init != "pissa":
        adapter.register_buffer("initial_A", None)
        adapter.register_buffer("initial_B", None)
        return
    b0, a0 = principal_factors(matrix.detach(), adapter.lora_A.shape[0], adapter.scaling)
    with torch.no_grad():
        adapter.lora_A.copy_(a0)
        adapter.lora_B.copy_(b0)
    adapter.register_buffer("initial_A", a0.clone())
    adapter.register_buffer("initial_B", b0.clone())


def lora_product(adapter: Adapter) -> torch.Tensor:
    """s (B A - B0 A0) (s_b B A over the b components in use without PiSSA); with PiSSA the two
    products run the same kernel on equal inputs at init, so the update is exactly zero there."""
    if adapter.initial_A is None:
        b, s = adapter.used_rank()
        return s * (adapter.lora_B[:, :b] @ adapter.lora_A[:b])
    return adapter.scaling * (adapter.lora_B @ adapter.lora_A - adapter.initial_B @ adapter.initial_A)


def truncate_lora_(adapter: Adapter, rank: int, inner: int) -> None:
    """Keep the first ``inner`` rows of A and columns of B: a rank-``rank`` adapter, s = alpha / rank."""
    if adapter.initial_A is not None:
        raise ValueError("a PiSSA-initialised adapter cannot be truncated (its residual is the top-r part)")
    trainable = adapter.lora_A.requires_grad
    adapter.lora_A = nn.Parameter(adapter.lora_A.detach()[:inner].clone(), requires_grad=trainable)
    adapter.lora_B = nn.Parameter(adapter.lora_B.detach()[:, :inner].clone(), requires_grad=trainable)
    adapter.rank, adapter.scaling = rank, adapter.config.scaling(rank)
