"""Every method against an independent reference written from its formula in docs/methods.md.

The references below read only the adapters' parameters (by name) and rebuild W with einsum, an
explicit float64 SVD and explicit tensor-ring chains -- no segadapt function -- then run the plain
torch conv; the adapted layer must give the same output in every computation order it has, with
random non-zero factors, on Linear, a strided and dilated Conv2d and Conv3d, and a ConvTranspose3d.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segadapt.adapters import METHODS, AdapterConfig, inject

RANK, LORA_RANK, RING, ALPHA = 3, 2, 2, 5.0

LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (2, 3, 12)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 11, 9)),
    "conv3d": (lambda: nn.Conv3d(3, 5, 3, stride=(2, 1, 2), padding=(2, 1, 2), dilation=(2, 1, 2)), (1, 3, 9, 6, 8)),
    "convT3d": (lambda: nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1), (1, 4, 3, 4, 3)),
}


def canonical(layer: nn.Module) -> torch.Tensor:
    """(Cout, Cin, *k), float64."""
    w = layer.weight.detach().double()
    return w.transpose(0, 1) if isinstance(layer, nn.ConvTranspose3d) else w


def lora_update(p: dict, shape) -> torch.Tensor:
    """s B A reshaped to (Cout, Cin, *k)."""
    return (ALPHA / RANK) * torch.einsum("or,ri->oi", p["lora_B"], p["lora_A"]).reshape(shape)


def lora_c_update(p: dict, shape) -> torch.Tensor:
    """loralib's ConvLoRA: (lora_B @ lora_A).view(weight.shape) * scaling, B (Cout k, r k), A (r k, Cin k^(d-1))."""
    return (ALPHA / RANK) * torch.einsum("pq,qc->pc", p["lora_B"], p["lora_A"]).reshape(shape)


def cp_update(p: dict, shape) -> torch.Tensor:
    """s sum_r U_out[o,r] U_in[i,r] prod_j U_j[k_j,r]."""
    spatial = [p[f"cp_spatial.{j}"] for j in range(len(shape) - 2)]
    letters = "xyz"[: len(spatial)]
    spec = ",".join(["or", "ir"] + [f"{c}r" for c in letters]) + "->oi" + letters
    return (ALPHA / RANK) * torch.einsum(spec, p["cp_out"], p["cp_in"], *spatial)


def dora(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m V / ||V||_c, V = W0 + dW, the norm over every dim but the first."""
    v = w0 + delta
    norm = v.pow(2).sum(dim=tuple(range(1, v.dim()))).sqrt()
    return magnitude.view(-1, *(1,) * (v.dim() - 1)) * v / norm.view(-1, *(1,) * (v.dim() - 1))


def salt_weight(w0: torch.Tensor, p: dict, relu: bool = True) -> torch.Tensor:
    """U diag(sig') V^T, sign fixed as documented (largest |entry| of each left vector positive):
    sig'_top = relu(a sig_top + b); the rest diag(sig_rest) + s X Y with s = alpha / r_lora."""
    matrix = w0.reshape(w0.shape[0], -1).numpy()
    u, sig, vt = np.linalg.svd(matrix, full_matrices=False)
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    u, vt = u * signs, vt * signs[:, None]
    r = RANK
    top = p["salt_scale"].numpy() * sig[:r] + p["salt_shift"].numpy()
    if relu:
        top = np.maximum(top, 0.0)
    rest = np.diag(sig[r:]) + (ALPHA / p["salt_X"].shape[1]) * p["salt_X"].numpy() @ p["salt_Y"].numpy()
    w = u[:, :r] @ np.diag(top) @ vt[:r] + u[:, r:] @ rest @ vt[r:]
    return torch.from_numpy(w).reshape(w0.shape)


def ring_chain(cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense tensor of a tensor ring with cores (R, n_k, R): Tr(G_1[:, i_1, :] ... G_m[:, i_m, :]),
    indices row-major (i_1 slowest)."""
    chain = cores[0]
    for core in cores[1:]:
        chain = torch.einsum("aNb,bnc->aNnc", chain, core).reshape(chain.shape[0], -1, core.shape[-1])
    return torch.einsum("aNa->N", chain)


def ring_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense T[(i_1..i_m), (j_1..j_m)] = Tr(prod_k G_k[:, i_k, j_k, :]), cores (R, I, I, R)."""
    chain = cores[0]
    for core in cores[1:]:
        a, rows, cols, _ = chain.shape
        chain = torch.einsum("aIJb,bijc->aIiJjc", chain, core).reshape(a, rows * core.shape[1], cols * core.shape[2], core.shape[-1])
    return torch.einsum("aIJa->IJ", chain)


def tlora_weight(w0: torch.Tensor, p: dict, n_transform: int, n_residual: int) -> torch.Tensor:
    """M(W0) T + s D."""
    transform = ring_matrix([p[f"transform_cores.{k}"] for k in range(n_transform)])
    residual = ring_chain([p[f"residual_cores.{k}"] for k in range(n_residual)])
    matrix = w0.reshape(w0.shape[0], -1)
    return (matrix @ transform + (ALPHA / RANK) * residual.reshape(matrix.shape)).reshape(w0.shape)


def reference_weight(method: str, w0: torch.Tensor, p: dict, adapter: nn.Module) -> torch.Tensor:
    shape = w0.shape
    if method in ("lora", "conv_lora"):
        return w0 + lora_update(p, shape)
    if method == "lora_c":
        return w0 + lora_c_update(p, shape)
    if method == "cp_lora":
        return w0 + cp_update(p, shape)
    if method in ("conv_dora", "dora_c", "cp_dora"):
        inner = {k.removeprefix("direction."): v for k, v in p.items() if k.startswith("direction.")}
        delta = {"conv_dora": lora_update, "dora_c": lora_c_update, "cp_dora": cp_update}[method](inner, shape)
        return dora(w0, delta, p["magnitude"])
    if method == "salt":
        return salt_weight(w0, p)
    if method == "tlora":
        return tlora_weight(w0, p, len(adapter.transform_cores), len(adapter.residual_cores))
    raise AssertionError(method)


def reference_output(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x, bias = x.double(), layer.bias.detach().double()
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.ConvTranspose3d):
        return F.conv_transpose3d(x, weight.transpose(0, 1), bias, layer.stride, layer.padding, layer.output_padding, 1, layer.dilation)
    conv = {4: F.conv2d, 5: F.conv3d}[weight.dim()]
    return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation)


def randomised(method: str, layer_name: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = LAYERS[layer_name]
    model = nn.Sequential(factory())
    base = copy.deepcopy(model[0])
    config = AdapterConfig(method=method, rank=RANK, alpha=ALPHA, lora_rank=LORA_RANK, ring_rank=RING, targets=["0"])
    inject(model, config)
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if name == "salt_scale":  # one top value stays positive but shrinks, one goes negative
                param.copy_(torch.tensor([0.5, -1.0, 1.3])[: param.numel()])
            elif name.endswith("magnitude"):
                param.mul_(1 + 0.3 * torch.rand_like(param))
            else:
                param.add_(0.3 * torch.randn_like(param))
    return base, model, adapter, torch.randn(*shape)


CASES = [(m, layer) for m in sorted(METHODS) for layer in LAYERS if not (m == "lora" and layer != "linear")]


@pytest.mark.parametrize("method,layer", CASES)
def test_output_equals_the_formula_in_every_computation_order(method, layer):
    base, model, adapter, x = randomised(method, layer)
    params = {name: p.detach().double() for name, p in adapter.named_parameters()}
    weight = reference_weight(method, canonical(base), params, adapter)
    expected = reference_output(base, weight, x).float()
    orders = ["weight", "activation"] if adapter.has_activation_form else ["weight"]
    for compute in orders:
        adapter.compute = compute
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{compute}: {m}")


def test_lora_c_equals_loralib_conv_lora_on_conv2d():
    loralib = pytest.importorskip("loralib")
    torch.manual_seed(0)
    reference = loralib.Conv2d(4, 6, 3, r=RANK, lora_alpha=ALPHA, stride=2, padding=1)
    with torch.no_grad():
        reference.lora_A.normal_()
        reference.lora_B.normal_()
    model = inject(nn.Sequential(copy.deepcopy(reference.conv)), AdapterConfig(method="lora_c", rank=RANK, alpha=ALPHA, targets=["0"]))
    adapter = model[0].adapters["default"]
    assert adapter.lora_A.shape == reference.lora_A.shape and adapter.lora_B.shape == reference.lora_B.shape
    with torch.no_grad():
        adapter.lora_A.copy_(reference.lora_A)
        adapter.lora_B.copy_(reference.lora_B)
    x = torch.randn(2, 4, 9, 8)
    reference.train()  # loralib merges in eval mode; train mode computes the unmerged form
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_parameter_counts_from_the_formulas():
    """Counts written out by hand from the table in docs/methods.md for Conv2d(6, 12, 3) (fan-in 54), rank 3."""
    counts = {
        "conv_lora": 3 * (54 + 12),
        "lora_c": 3 * 3 * (6 * 3 + 12 * 3),
        "cp_lora": 3 * (12 + 6 + 3 + 3),
        "conv_dora": 3 * (54 + 12) + 12,
        "dora_c": 3 * 3 * (6 * 3 + 12 * 3) + 12,
        "cp_dora": 3 * (12 + 6 + 3 + 3) + 12,
        # q = min(12, 54) = 12: 2r + 2 (q - r) r_lora with r_lora = 2
        "salt": 2 * 3 + 2 * (12 - 3) * 2,
        # fan-in 54 = 6 x 9 (factors <= 16), Cout 12 = 12: T cores R^2 (36 + 81), D cores r^2 (12 + 6 + 9)
        "tlora": 2**2 * (36 + 81) + 3**2 * (12 + 6 + 9),
    }
    for method, expected in counts.items():
        model = inject(nn.Sequential(nn.Conv2d(6, 12, 3)), AdapterConfig(method=method, rank=3, lora_rank=2, ring_rank=2, targets=["0"]))
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected, method
    model = inject(nn.Sequential(nn.Linear(20, 8)), AdapterConfig(method="salt", rank=6, lora_rank=4, targets=["0"]))
    # q = 8, q - r = 2 < lora_rank: r_lora is clamped to 2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 6 + 2 * 2 * 2
