"""init="pissa": the adapter starts on the principal part of W0, the base keeps the residual."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segadapt.adapters import AdapterConfig, inject, load_adapter, merge_and_unload, save_adapter

PISSA_METHODS = ["conv_lora", "lora_c", "cp_lora", "conv_dora", "dora_c", "cp_dora"]


def pissa_model(method: str, layer=None, rank: int = 2, alpha: float = 4.0):
    torch.manual_seed(0)
    base = nn.Sequential(layer or nn.Conv2d(6, 8, 3, padding=1))
    model = inject(copy.deepcopy(base), AdapterConfig(method=method, rank=rank, alpha=alpha, targets=["0"], init="pissa"))
    return base, model, model[0].adapters["default"]


@pytest.mark.parametrize("method", PISSA_METHODS)
def test_pissa_is_exact_at_init_and_merge_exact_after_training(method, tmp_path):
    base, model, adapter = pissa_model(method)
    x = torch.randn(2, 6, 7, 7)
    orders = ["weight", "activation"] if adapter.has_activation_form else ["weight"]
    with torch.no_grad():
        for compute in orders:
            adapter.compute = compute
            tolerance = 0.0 if compute == "weight" else 1e-6  # weight space: two identical products cancel
            assert (model(x) - base(x)).abs().max().item() <= tolerance, compute
    assert torch.equal(model[0].base_layer.weight, base[0].weight), "the frozen base is never edited"
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        trained = model(x)
        assert not torch.allclose(trained, base(x), atol=1e-4)
        path = save_adapter(model, tmp_path / "pissa.safetensors")
        fresh = load_adapter(copy.deepcopy(base), path)
        torch.testing.assert_close(fresh(x), trained, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merge_and_unload(model)(x), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,layer", [("lora", nn.Linear(10, 7)), ("conv_lora", nn.Conv2d(6, 8, 3)), ("lora_c", nn.Conv2d(6, 8, 3))])
def test_pissa_starts_on_the_top_singular_directions(method, layer):
    """s B A at init = U_r diag(sig_r) V_r^T of the matrix it multiplies into (numpy SVD)."""
    _, model, adapter = pissa_model(method, layer, rank=2, alpha=3.0)
    w0 = layer.weight.detach().double()
    k = 1 if method != "lora_c" else 3
    matrix = w0.reshape(w0.shape[0] * k, -1).numpy()
    u, sig, vt = np.linalg.svd(matrix, full_matrices=False)
    r = 2 * k
    expected = u[:, :r] @ np.diag(sig[:r]) @ vt[:r]
    start = (3.0 / 2) * (adapter.lora_B.detach().double() @ adapter.lora_A.detach().double())
    np.testing.assert_allclose(start.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_cp_pissa_starts_on_a_parafac_of_the_weight():
    """s [[U0]] is a rank-r CP approximation of W0: closer to W0 than zero, and its residual is what
    the frozen base keeps (W0 - s [[U0]] + s [[U]] = W0 at init)."""
    import tensorly as tl

    _, model, adapter = pissa_model("cp_lora", nn.Conv2d(6, 8, 3), rank=4, alpha=2.0)
    w0 = model[0].base_layer.weight.detach()
    with tl.backend_context("pytorch"):
        start = 0.5 * tl.cp_to_tensor((None, [f.detach() for f in adapter.factors]))
    residual = (w0 - start).norm() / w0.norm()
    assert residual < 0.95
    assert torch.equal(adapter.delta_weight(), torch.zeros_like(w0))


@pytest.mark.parametrize("method", ["salt", "tlora"])
def test_pissa_is_refused_where_it_is_not_defined(method):
    with pytest.raises(ValueError, match=r"module '0': init='pissa' is not defined for"):
        inject(nn.Sequential(nn.Linear(8, 8)), AdapterConfig(method=method, rank=2, targets=["0"], init="pissa"))


def test_pissa_rank_above_the_singular_values_is_refused():
    with pytest.raises(ValueError, match=r"module '0': init='pissa' needs rank <= 4"):
        inject(nn.Sequential(nn.Linear(8, 4)), AdapterConfig(method="lora", rank=6, targets=["0"], init="pissa"))


# ---- init="eva" -----------------------------------------------------------------------------------
def reference_patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input patches by torch's own unfolding (F.unfold for 2D, Tensor.unfold per axis for 3D)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, layer.in_features)
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    padded = F.pad(x, [p for p in reversed(layer.padding) for _ in (0, 1)])
    for axis, (k, s) in enumerate(zip(layer.kernel_size, layer.stride)):
        padded = padded.unfold(2 + axis, k, s)
    n, c, o1, o2, o3 = padded.shape[:5]
    return padded.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(n * o1 * o2 * o3, -1)


EVA_LAYERS = {
    "linear": (lambda: nn.Linear(10, 7), (3, 4, 10)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2), (2, 3, 9, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 5, 3, stride=2, padding=1), (1, 2, 6, 5, 6)),
}


@pytest.mark.parametrize("method", ["conv_lora", "conv_dora"])
@pytest.mark.parametrize("layer_name", sorted(EVA_LAYERS))
def test_eva_down_factor_spans_the_top_right_singular_vectors_of_the_input_patches(method, layer_name, tmp_path):
    from segadapt.adapters import eva_init, eva_pending

    factory, shape = EVA_LAYERS[layer_name]
    torch.manual_seed(0)
    base = nn.Sequential(factory())
    model = inject(copy.deepcopy(base), AdapterConfig(method=method, rank=2, targets=["0"], init="eva"))
    batches = [torch.randn(*shape) * torch.linspace(0.2, 3.0, shape[-1]) for _ in range(2)]  # anisotropic inputs
    assert eva_pending(model) == ["0"]
    with pytest.raises(RuntimeError, match="init='eva' adapter not initialised: call segadapt.adapters.eva_init"):
        model(batches[0])
    assert eva_init(model, lambda: [model(b) for b in batches]) == ["0"] and eva_pending(model) == []
    adapter = model[0].adapters["default"]
    lora = adapter.direction if method == "conv_dora" else adapter
    patches = torch.cat([reference_patches(base[0], b) for b in batches]).double().numpy()
    _, _, vt = np.linalg.svd(patches, full_matrices=False)
    a = lora.lora_A.detach().double().numpy()
    np.testing.assert_allclose(a @ a.T, np.eye(2), atol=1e-5)  # orthonormal rows
    np.testing.assert_allclose(a.T @ a, vt[:2].T @ vt[:2], atol=1e-4)  # the same subspace (sign-free)
    x = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # B = 0: exact at init
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(x)
        loaded = load_adapter(copy.deepcopy(base), save_adapter(model, tmp_path / "eva.safetensors"))
        assert eva_pending(loaded) == []
        torch.testing.assert_close(loaded(x), trained, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merge_and_unload(model)(x), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"), nn.Conv3d(2, 4, (3, 1, 3)),
                                   nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, output_padding=1), nn.Linear(6, 5)])
def test_patch_matrix_times_the_weight_is_the_layer_output(layer):
    """The definition of the patches EVA decomposes: base(x) - b0 = P M(W0)^T, transposed convs included."""
    from segadapt.adapters import spec_of
    from segadapt.adapters.eva import patch_matrix

    spec = spec_of(layer)
    x = torch.randn(2, spec.cin, 5, 4, 5)[(slice(None),) * 2 + (slice(None),) * spec.ndim + (0,) * (3 - spec.ndim)] if spec.kind != "linear" else torch.randn(3, 6)
    with torch.no_grad():
        y = layer(x) - layer.bias.view(-1, *(1,) * spec.ndim)
        m = spec.canonical(layer.weight).reshape(spec.cout, -1)
        expected = y.movedim(1, -1).reshape(-1, spec.cout)
        torch.testing.assert_close(patch_matrix(layer, spec, x) @ m.t(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,layer", [("cp_lora", nn.Conv2d(4, 4, 3)), ("salt", nn.Linear(6, 6)), ("lora_c", nn.Conv2d(4, 4, 3))])
def test_eva_is_refused_where_it_is_not_defined(method, layer):
    with pytest.raises(ValueError, match=r"module '0': init='eva' is not defined for"):
        inject(nn.Sequential(layer), AdapterConfig(method=method, rank=2, targets=["0"], init="eva"))
