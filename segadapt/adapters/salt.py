"""SALT: Singular-value Adaptation with Low-rank Transformation.

M(W0) = U diag(sig) V^T (thin SVD, q = min(Cout, Cin k^d) singular values). The top r singular
values get a trainable scale and shift, sig_i -> a_i sig_i + b_i (a = 1, b = 0 at init; with
``salt_relu`` clamped at zero); the other q - r singular directions get
diag(sig_rest) + X Y with X ((q-r) x r_lora) zeros and Y (r_lora x (q-r)) kaiming-uniform. So

    W = W0 + U_top diag(sig'_top - sig_top) V_top^T + s U_rest X Y V_rest^T,

an update of rank <= r + r_lora that is exactly zero at init, with s = alpha / r_lora (1 when alpha is
None; alpha / sqrt(r_lora) with rslora). Trainable parameters: 2r + 2(q-r) r_lora. Rank bound: r <= q.

Deviation from the public SALT code: ``salt_relu`` clamps only the r transformed top singular values,
whereas that code applies relu entrywise to the whole q x q Sigma' (including diag(sig_rest) + X Y);
clamping it all would lose the low-rank form of the update above (and with it activation space).
Also unlike that code, U, sig and V are registered buffers (moved by ``.to()``; not saved, since they
are recomputed from W0 with a deterministic sign convention, at injection and whenever a
``load_state_dict`` reaches the adapted layer, see :meth:`SALT.base_changed`), and conv layers keep their
padding, stride and dilation.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, canonical_svd, init_down_factor_
from .registry import register_method


@register_method("salt")
class SALT(Adapter):
    """Scale/shift of the top-r singular values plus a rank-``lora_rank`` update of the rest.

    ``lora_rank`` is clamped to q - r (the number of remaining singular directions).
    """

    activation_form = True

    @classmethod
    def rank_bound(cls, spec, config) -> int:
        """q = min(Cout, Cin k^d), the number of singular values."""
        return spec.max_rank

    def __init__(self, base, spec, config, rank):
        super().__init__(base, spec, config, rank)  # refuses rank > q, the number of singular values
        q = spec.max_rank
        self.lora_rank = min(config.lora_rank, q - rank)
        self.scaling = config.scaling(max(self.lora_rank, 1))  # s on X Y, the LoRA part
        self.relu = config.salt_relu
        u, s, vh = self._decompose(base)
        self.register_buffer("U", u, persistent=False)
        self.register_buffer("S", s, persistent=False)
        self.register_buffer("Vh", vh, persistent=False)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.salt_scale = nn.Parameter(torch.ones(rank, **factory))
        self.salt_shift = nn.Parameter(torch.zeros(rank, **factory))
        self.salt_X = nn.Parameter(torch.zeros(q - rank, self.lora_rank, **factory))
        self.salt_Y = nn.Parameter(torch.empty(self.lora_rank, q - rank, **factory))
        init_down_factor_(self.salt_Y, max(q - rank, 1), config.init, max(self.lora_rank, 1))

    def _decompose(self, base: nn.Module):
        return canonical_svd(self.spec.canonical(base.weight).reshape(self.spec.cout, self.spec.fan_in))

    @torch.no_grad()
    def base_changed(self, base: nn.Module) -> None:
        """U, sig, V^T recomputed from the (newly loaded) base weight, on the buffers' device and dtype."""
        for buffer, value in zip((self.U, self.S, self.Vh), self._decompose(base)):
            buffer.copy_(value)

    def branch_rank(self) -> int:
        return self.rank + self.lora_rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}, lora_rank={self.lora_rank}, scaling={self.scaling:g} (on X Y), compute={self.compute}"

    def adapted_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """W0 + left @ right in one addmm (W0 + dW under autocast)."""
        weight = self.plus_low_rank(w0, *self.low_rank_factors())
        return w0 + self.delta_weight() if weight is None else weight

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) with M(dW) = left @ right; left: Cout x (r + r_lora), right: (r + r_lora) x Cin k^d."""
        r = self.rank
        top = self.S[:r]
        new_top = self.salt_scale * top + self.salt_shift
        if self.relu:  # the top r values only (the SALT code clamps all of Sigma', see the module doc)
            new_top = torch.relu(new_top)
        left = torch.cat([self.U[:, :r] * (new_top - top), self.scaling * (self.U[:, r:] @ self.salt_X)], dim=1)
        right = torch.cat([self.Vh[:r], self.salt_Y @ self.Vh[r:]], dim=0)
        return left, right

    def build_flops(self) -> float:
        q, r, k = self.spec.max_rank, self.rank, self.branch_rank()
        return 2.0 * self.spec.cout * self.spec.fan_in * k + 2.0 * (q - r) * self.lora_rank * (self.spec.cout + self.spec.fan_in)
