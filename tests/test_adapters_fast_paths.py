"""The fast contraction orders of the adapters against their definitions, on random float64 tensors.

TLoRA's M(W0) T (one GEMM per ring core) and D (one GEMM of two open chains) are compared with the
tensor rings written entry by entry from their definitions (loops over the indices, no segadapt code),
for one to four cores, values and gradients.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from segadapt.adapters import AdapterConfig, inject
from segadapt.adapters.tlora import tr_matrix_apply, tr_split_matrix


def ring_matrix_by_entries(cores: list[torch.Tensor]) -> torch.Tensor:
    """T[(i_1..i_m), (j_1..j_m)] = Tr(G_1[:, i_1, j_1, :] ... G_m[:, i_m, j_m, :]), i_1 slowest."""
    sizes = [core.shape[1] for core in cores]
    n = math.prod(sizes)
    rows = []
    for i in itertools.product(*map(range, sizes)):
        row = []
        for j in itertools.product(*map(range, sizes)):
            chain = cores[0][:, i[0], j[0], :]
            for core, ik, jk in zip(cores[1:], i[1:], j[1:]):
                chain = chain @ core[:, ik, jk, :]
            row.append(torch.trace(chain))
        rows.append(torch.stack(row))
    return torch.stack(rows).reshape(n, n)


def ring_tensor_by_entries(cores: list[torch.Tensor]) -> torch.Tensor:
    """X[i_1, ..., i_m] = Tr(G_1[:, i_1, :] ... G_m[:, i_m, :]) flattened, i_1 slowest."""
    values = []
    for i in itertools.product(*(range(core.shape[1]) for core in cores)):
        chain = cores[0][:, i[0], :]
        for core, ik in zip(cores[1:], i[1:]):
            chain = chain @ core[:, ik, :]
        values.append(torch.trace(chain))
    return torch.stack(values)


@pytest.mark.parametrize("sizes", [[5], [2, 3], [2, 3, 2], [2, 2, 3, 2]])
def test_tr_matrix_apply_equals_the_ring_matrix_by_entries(sizes):
    torch.manual_seed(len(sizes))
    ring = 3
    cores = [torch.randn(ring, s, s, ring, dtype=torch.float64, requires_grad=True) for s in sizes]
    n = math.prod(sizes)
    matrix = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(4, n, dtype=torch.float64)
    fast = tr_matrix_apply(matrix, cores)
    reference = matrix @ ring_matrix_by_entries(cores)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    inputs = [matrix, *cores]
    grads_fast = torch.autograd.grad((fast * probe).sum(), inputs)
    grads_reference = torch.autograd.grad((reference * probe).sum(), inputs)
    for got, want in zip(grads_fast, grads_reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sizes, split", [([3, 2], 1), ([2, 3, 2, 2], 2), ([2, 2, 3], 1), ([3, 2, 2], 2)])
def test_tr_split_matrix_equals_the_ring_by_entries(sizes, split):
    torch.manual_seed(split)
    ring = 3
    cores = [torch.randn(ring, s, ring, dtype=torch.float64, requires_grad=True) for s in sizes]
    fast = tr_split_matrix(cores, split)
    reference = ring_tensor_by_entries(cores).reshape(math.prod(sizes[:split]), -1)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(reference)
    for got, want in zip(torch.autograd.grad((fast * probe).sum(), cores), torch.autograd.grad((reference * probe).sum(), cores)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_tlora_layer_with_a_four_core_transform_takes_the_chained_path_and_matches_the_definition():
    """A conv whose fan-in factorises into 4 cores (Cin k^d = 8 * 9 = 72 with max factor 3): the layer's
    weight is M(W0) T + s D with T and D from their entries (the dense T would cost more, so the chain runs)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 6, 3, padding=1).double()
    model = inject(nn.Sequential(layer), AdapterConfig(method="tlora", rank=2, ring_rank=2, targets=["0"], tlora_max_factor=3))
    adapter = model[0].adapters["default"]
    assert len(adapter.in_factors) >= 3
    with torch.no_grad():
        for core in [*adapter.transform_cores, *adapter.residual_cores]:
            core.add_(0.3 * torch.randn_like(core))
    w0 = model[0].base_layer.weight.detach()
    transform = ring_matrix_by_entries([c.detach() for c in adapter.transform_cores])
    residual = ring_tensor_by_entries([c.detach() for c in adapter.residual_cores]).reshape(6, 72)
    expected = (w0.reshape(6, 72) @ transform + adapter.scaling * residual).reshape(w0.shape)
    torch.testing.assert_close(adapter.adapted_weight(w0).detach(), expected, rtol=1e-10, atol=1e-10)
