"""TLoRA: transformed low-rank adaptation with tensor rings (Tao et al., 2025).

M(W) = M(W0) T + D.

* T (n x n, n = Cin k^d) is a tensor-ring *matrix* over a factorisation n = I_1 ... I_m:
  T[(i_1..i_m), (j_1..j_m)] = Tr(G_1[:, i_1, j_1, :] ... G_m[:, i_m, j_m, :]), cores G_k of shape
  (R, I_k, I_k, R), R = ``ring_rank``. At init G_k[:, i, j, :] = delta_ij M_k with random orthogonal
  M_k whose product is I / R, so T = I (off-diagonal entries exactly 0, diagonal 1 up to rounding)
  while every ring entry gets a gradient.
* D (Cout x n) is a tensor ring of rank r = ``rank`` over the factorised output and input dims,
  scaled by s; its first core is zero, so D = 0 at init.

Trainable parameters: R^2 sum_k I_k^2 + r^2 (sum of D's mode sizes). A fan-in with a prime factor above
``tlora_max_factor`` is refused (T would hold R^2 p^2 parameters or more); Cout keeps such a prime
whole (D's cost is linear in the mode size).

M(W0) T is computed either by building T densely (TensorLy's ``tr_to_tensor``; cost ~ n^2 (R^2 + Cout))
or by contracting M(W0) with the cores one at a time (``tr_matrix_apply``, one GEMM per core; cost
~ Cout n R^3 sum I_k), whichever is cheaper for the layer; D is built as one GEMM of its two open
chains (output modes x input modes, ``tr_split_matrix``). ``regularization()`` is the identity regulariser ||T - I||_F^2, computed from
the cores without building T.
"""

from __future__ import annotations

import math

import tensorly as tl
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Adapter
from .registry import register_method


def factorize(n: int, max_factor: int) -> list[int]:
    """n as a product of factors <= max_factor where the primes allow (smallest factors merged first);
    a prime above max_factor stays whole."""
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    factors = sorted(primes) or [1]
    while len(factors) > 1 and factors[0] * factors[1] <= max_factor:
        factors = sorted(factors[2:] + [factors[0] * factors[1]])
    return factors


def tr_to_full(cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense tensor of a tensor ring with cores (R, I_k, R), via TensorLy."""
    if len(cores) == 1:  # tl.tr_to_tensor needs two cores or more
        return torch.einsum("aia->i", cores[0])
    with tl.backend_context("pytorch", local_threadsafe=True):
        return tl.tr_to_tensor(list(cores))


def tr_chain(cores: list[torch.Tensor]) -> torch.Tensor:
    """The open chain of tensor-ring cores (R_0, I_k, R_(k+1)) -> (R_0, I_1 ... I_m, R_m), one matmul per core."""
    chain = cores[0]
    for core in cores[1:]:
        a, p, b = chain.shape
        chain = (chain.reshape(a * p, b) @ core.reshape(b, -1)).reshape(a, -1, core.shape[-1])
    return chain


def tr_split_matrix(cores: list[torch.Tensor], split: int) -> torch.Tensor:
    """A tensor ring as the matrix (modes before ``split``) x (modes from ``split``): the two open chains
    L (a, P, b) and Q (b, N, a) give M[p, q] = sum_ab L[a, p, b] Q[b, q, a], one GEMM with inner size R^2.
    The same tensor as :func:`tr_to_full` (reshaped), without its (R, ..., R) intermediates at full size."""
    left, right = tr_chain(cores[:split]), tr_chain(cores[split:])
    a, p, b = left.shape
    return left.permute(1, 2, 0).reshape(p, b * a) @ right.permute(0, 2, 1).reshape(b * a, -1)


def tr_matrix_to_dense(cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense n x n matrix of a tensor-ring matrix with cores (R, I_k, I_k, R)."""
    sizes = [core.shape[1] for core in cores]
    full = tr_to_full([core.reshape(core.shape[0], -1, core.shape[-1]) for core in cores])
    full = full.reshape([s for size in sizes for s in (size, size)])
    m = len(sizes)
    n = full.numel() ** 0.5
    return full.permute(*range(0, 2 * m, 2), *range(1, 2 * m, 2)).reshape(int(round(n)), -1)


def tr_matrix_apply(matrix: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
    """``matrix @ T`` for a tensor-ring matrix T, contracting one core at a time (T never built).

    matrix: (rows, n), n = I_1 ... I_m. Core k's (ring index b, i_k) are contracted in one matrix
    product; between the products the intermediate z is laid out (i_(k+1) ... i_m, rows, a, j_1 ... j_k, c)
    (a: the ring index opened by the first core, c: the one to contract next), so that each core costs one
    transpose copy (moving i_(k+1) to the end) and one GEMM; the last core also closes the ring (c = a).
    Cost ~ 2 rows n (R^2 I_1 + R^3 (I_2 + ... + I_(m-1)) + R^2 I_m); memory ~ rows n R^2. Written by hand:
    TensorLy has no tensor-ring-matrix product, and einsum's pairwise contractions copy z twice per core.
    """
    rows, n = matrix.shape
    ring, size = cores[0].shape[0], cores[0].shape[1]
    if len(cores) == 1:
        return matrix @ torch.einsum("aija->ij", cores[0])
    # (rows, i_1, rest) -> (rest, rows, i_1) @ (i_1, a j_1 b)
    z = matrix.reshape(rows, size, -1).permute(2, 0, 1).reshape(-1, size)
    z = z @ cores[0].permute(1, 0, 2, 3).reshape(size, -1)
    remaining = n // size
    for index, core in enumerate(cores[1:], start=1):
        size = core.shape[1]
        remaining //= size
        # (i_k, remaining, rows a J, b) -> (remaining, rows a J, b, i_k)
        z = z.reshape(size, remaining, -1, ring).permute(1, 2, 3, 0)
        if index < len(cores) - 1:
            z = z.reshape(-1, ring * size) @ core.reshape(ring * size, size * ring)  # (remaining, rows a J, j_k c)
        else:  # remaining = 1: (rows, a, J, b, i_m) -> (rows J, b i_m a), contracted with core (b i_m a, j_m)
            z = z.reshape(rows, ring, -1, ring, size).permute(0, 2, 3, 4, 1).reshape(-1, ring * size * ring)
            z = z @ core.permute(0, 1, 3, 2).reshape(ring * size * ring, size)
    return z.reshape(rows, n)


def tr_matrix_apply_flops(rows: int, sizes: list[int], ring: int) -> float:
    """Forward FLOPs of :func:`tr_matrix_apply`."""
    n = math.prod(sizes)
    if len(sizes) == 1:
        return 2.0 * rows * n * n
    return 2.0 * rows * n * (ring**2 * (sizes[0] + sizes[-1]) + ring**3 * sum(sizes[1:-1]))


def tr_matrix_identity_distance(cores: list[torch.Tensor]) -> torch.Tensor:
    """||T - I||_F^2 = ||T||_F^2 - 2 Tr(T) + n, from the cores (float64, T never built)."""
    cores = [core.double() for core in cores]
    ring = cores[0].shape[0]
    trace_chain = torch.eye(ring, dtype=torch.float64, device=cores[0].device)
    frob_chain = torch.eye(ring * ring, dtype=torch.float64, device=cores[0].device)
    n = 1
    for core in cores:
        n *= core.shape[1]
        trace_chain = trace_chain @ torch.einsum("aiib->ab", core)
        frob_chain = frob_chain @ torch.einsum("aijb,cijd->acbd", core, core).reshape(ring * ring, -1)
    return torch.trace(frob_chain) - 2 * torch.trace(trace_chain) + n


@register_method("tlora")
class TLoRA(Adapter):
    """W = W0 T + D with a tensor-ring-matrix transform T (= I at init) and a tensor-ring residual D (= 0).

    Rank bounds: r <= max(Cout, Cin k^d), as for the LoRA forms (``Adapter.rank_bound``: D never needs a
    tensor-ring rank above max over cuts of min(prod of the modes before it, prod after it), which is
    smaller; ranks up to the larger side are accepted so that one rank serves a whole network);
    ``ring_rank`` <= Cin k^d.
    """

    def __init__(self, base, spec, config, rank):
        super().__init__(base, spec, config, rank)
        if config.ring_rank > spec.fan_in:
            raise ValueError(
                f"ring_rank {config.ring_rank} exceeds {spec.fan_in}, the fan-in Cin k^d of this {spec.kind} layer "
                f"(the transform T is {spec.fan_in} x {spec.fan_in})"
            )
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.in_factors = factorize(spec.fan_in, config.tlora_max_factor)
        if max(self.in_factors) > config.tlora_max_factor:
            # T's cores hold R^2 * sum I_k^2 parameters: a whole large prime factor can exceed the layer
            big = max(self.in_factors)
            raise ValueError(
                f"TLoRA cannot factorise the fan-in Cin*k^d = {spec.fan_in} of this {spec.kind} layer "
                f"({spec.cout} x {spec.fan_in} weights) into factors <= tlora_max_factor={config.tlora_max_factor}: "
                f"it has the prime factor {big}, which would give the transform "
                f"{config.ring_rank ** 2 * big ** 2:,}+ parameters; raise tlora_max_factor to {big} or pick another method"
            )
        self.out_factors = factorize(spec.cout, config.tlora_max_factor)
        self.ring_rank = config.ring_rank
        self.transform_cores = nn.ParameterList(
            nn.Parameter(core.to(**factory)) for core in identity_ring_cores(self.in_factors, self.ring_rank)
        )
        residual = []
        for position, size in enumerate(self.out_factors + self.in_factors):
            core = torch.zeros(rank, size, rank, **factory)
            if position > 0:  # core 0 (an output mode) stays zero, so D = 0 at init
                is_input_mode = position >= len(self.out_factors)
                core.normal_(0.0, (rank * (size if is_input_mode else 1)) ** -0.5)
            residual.append(nn.Parameter(core))
        self.residual_cores = nn.ParameterList(residual)
        self.register_buffer("_merge_w0", None, persistent=False)  # W0 while merged; moved by .to()

    def transform_matrix(self) -> torch.Tensor:
        """T as a dense (Cin k^d) x (Cin k^d) matrix."""
        return tr_matrix_to_dense(list(self.transform_cores))

    def residual_matrix(self) -> torch.Tensor:
        """s * D as a dense Cout x (Cin k^d) matrix."""
        return self.scaling * tr_split_matrix(list(self.residual_cores), len(self.out_factors))

    def _apply_transform(self, w0_matrix: torch.Tensor) -> torch.Tensor:
        n, ring = self.spec.fan_in, self.ring_rank
        dense_flops = 2.0 * n * n * (ring * ring + self.spec.cout)
        if dense_flops < tr_matrix_apply_flops(self.spec.cout, self.in_factors, ring):
            return w0_matrix @ self.transform_matrix()
        cores = list(self.transform_cores)
        if torch.is_grad_enabled() and cores[0].requires_grad:
            # the chain holds one intermediate of R^2 times the weight's size per core for the backward (more
            # than full fine-tuning's whole extra memory on a 3D UNet): recomputed in the backward instead,
            # one more forward of the chain (+~15% of its cost)
            return checkpoint(tr_matrix_apply, w0_matrix, cores, use_reentrant=False)
        return tr_matrix_apply(w0_matrix, cores)

    def adapted_weight(self, w0: torch.Tensor) -> torch.Tensor:
        w0_matrix = w0.reshape(self.spec.cout, self.spec.fan_in)
        return (self._apply_transform(w0_matrix) + self.residual_matrix()).view(self.spec.shape)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError("TLoRA's update depends on W0; use adapted_weight(w0)")

    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        self._merge_w0 = w0.clone()  # T^-1 is costly and can be ill-conditioned: keep W0 instead
        return self.adapted_weight(w0)

    def unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        if self._merge_w0 is None:
            raise RuntimeError("this TLoRA adapter was not merged in this session; cannot unmerge")
        w0, self._merge_w0 = self._merge_w0, None
        return w0

    def regularization(self) -> torch.Tensor:
        """Identity regulariser ||T - I||_F^2."""
        return tr_matrix_identity_distance(list(self.transform_cores))


def identity_ring_cores(sizes: list[int], ring: int) -> list[torch.Tensor]:
    """Cores (R, I, I, R) of a tensor-ring matrix equal to the identity: G_k[:, i, j, :] = delta_ij M_k,
    M_k = R^(-1/m) Q_k with random orthogonal Q_k for k < m and Q_m = (Q_1 ... Q_{m-1})^T, so that
    Tr(M_1 ... M_m) = Tr(I / R) = 1. Float64; cast once to the layer's dtype (so T = I to that dtype's rounding)."""
    m = len(sizes)
    scale = ring ** (-1.0 / m)
    mats, product = [], torch.eye(ring, dtype=torch.float64)
    for _ in range(m - 1):
        q = torch.linalg.qr(torch.randn(ring, ring, dtype=torch.float64)).Q
        mats.append(q)
        product = product @ q
    mats.append(product.t())
    return [
        scale * torch.einsum("ij,ab->aijb", torch.eye(size, dtype=torch.float64), mat)
        for size, mat in zip(sizes, mats)
    ]
