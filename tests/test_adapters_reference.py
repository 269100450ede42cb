"""Outputs against reference implementations: HF PEFT (LoRA / DoRA), TensorLy (CP), dense formulas."""

from __future__ import annotations

import copy

import pytest
import tensorly as tl
import torch
from torch import nn

from segadapt.adapters import AdapterConfig, inject, merge_and_unload
from segadapt.adapters.tlora import tr_matrix_apply, tr_matrix_identity_distance, tr_matrix_to_dense

peft = pytest.importorskip("peft")

REFERENCE_LAYERS = {
    "linear": (lambda: nn.Linear(32, 24), (3, 7, 32)),
    "conv2d": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 11, 9)),
    "conv3d": (lambda: nn.Conv3d(4, 8, 3, padding=1), (1, 4, 6, 7, 5)),
}
PEFT_CASES = [("lora", "linear"), ("conv_lora", "conv2d"), ("conv_lora", "conv3d"), ("conv_dora", "conv2d"), ("conv_dora", "conv3d"), ("conv_dora", "linear")]


def peft_and_ours(method: str, layer: str, rank: int = 4, alpha: float = 8.0):
    torch.manual_seed(0)
    factory, shape = REFERENCE_LAYERS[layer]
    base = nn.Sequential(factory())
    ours = inject(copy.deepcopy(base), AdapterConfig(method=method, rank=rank, alpha=alpha, targets=["0"], compute="activation"))
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], use_dora=method == "conv_dora", lora_dropout=0.0),
    )
    adapter = ours[0].adapters["default"]
    lora = adapter.direction if method == "conv_dora" else adapter
    with torch.no_grad():  # random, non-zero adapter weights, copied into PEFT
        lora.lora_A.normal_(0, 0.3)
        lora.lora_B.normal_(0, 0.3)
        ref_layer = reference.base_model.model[0]
        ref_layer.lora_A["default"].weight.copy_(lora.lora_A.view_as(ref_layer.lora_A["default"].weight))
        ref_layer.lora_B["default"].weight.copy_(lora.lora_B.view_as(ref_layer.lora_B["default"].weight))
        if method == "conv_dora":
            adapter.magnitude.mul_(1 + 0.2 * torch.rand_like(adapter.magnitude))
            magnitude = ref_layer.lora_magnitude_vector["default"].weight
            magnitude.copy_(adapter.magnitude.view_as(magnitude))
    return ours, reference, torch.randn(*shape)


@pytest.mark.parametrize("method,layer", PEFT_CASES)
@pytest.mark.parametrize("compute", ["activation", "weight"])
def test_matches_peft_outputs_gradients_and_merged_weights(method, layer, compute):
    ours, reference, x = peft_and_ours(method, layer)
    ours[0].adapters["default"].compute = compute
    y_ours, y_ref = ours(x), reference(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    # gradients w.r.t. the input and every adapter parameter agree too (DoRA: with the norm detached,
    # as PEFT does)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(x1).pow(2).sum().backward()
    reference(x2).pow(2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    adapter, ref_layer = ours[0].adapters["default"], reference.base_model.model[0]
    lora = adapter.direction if method == "conv_dora" else adapter
    pairs = [(lora.lora_A, ref_layer.lora_A["default"].weight), (lora.lora_B, ref_layer.lora_B["default"].weight)]
    if method == "conv_dora":
        pairs.append((adapter.magnitude, ref_layer.lora_magnitude_vector["default"].weight))
    for param, ref_param in pairs:
        torch.testing.assert_close(param.grad.view_as(ref_param.grad), ref_param.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        merged_ours = merge_and_unload(ours)[0].weight
        merged_ref = reference.merge_and_unload()[0].weight
    torch.testing.assert_close(merged_ours, merged_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 6), (8, 6, 3), (8, 6, 3, 3, 3), (5, 4, 3, 1)])
def test_cp_update_equals_tensorly_and_the_cp_formula(shape):
    torch.manual_seed(1)
    kernel = shape[2:]
    layer = nn.Linear(shape[1], shape[0]) if not kernel else (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(kernel) - 1](shape[1], shape[0], kernel)
    model = inject(nn.Sequential(layer), AdapterConfig(method="cp_lora", rank=3, alpha=6, targets=["0"]))
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.cp_out.normal_()
    factors = [f.detach() for f in adapter.factors]
    with tl.backend_context("pytorch"):
        reference = 2.0 * tl.cp_to_tensor((None, factors))
    letters = "defg"[: len(kernel)]
    einsum = "or,ir," + ",".join(f"{c}r" for c in letters) + "->oi" + letters if letters else "or,ir->oi"
    formula = 2.0 * torch.einsum(einsum, *factors)
    delta = adapter.delta_weight().detach()
    assert delta.shape == shape
    torch.testing.assert_close(delta, reference)
    torch.testing.assert_close(delta, formula, rtol=1e-5, atol=1e-6)


def test_tlora_transform_is_identity_at_init_and_both_orders_agree():
    torch.manual_seed(2)
    model = inject(nn.Sequential(nn.Conv2d(12, 10, 3)), AdapterConfig(method="tlora", rank=3, ring_rank=3, targets=["0"]))
    adapter = model[0].adapters["default"]
    n = 12 * 9
    transform = adapter.transform_matrix().detach()
    assert transform.shape == (n, n)
    torch.testing.assert_close(transform, torch.eye(n), rtol=0, atol=1e-6)
    assert adapter.regularization().item() == pytest.approx(0.0, abs=1e-9)
    assert torch.count_nonzero(adapter.residual_matrix()) == 0
    with torch.no_grad():
        for core in adapter.transform_cores:
            core.add_(0.05 * torch.randn_like(core))
    cores = list(adapter.transform_cores)
    dense = tr_matrix_to_dense(cores)
    w0 = torch.randn(10, n)
    torch.testing.assert_close(tr_matrix_apply(w0, cores), w0 @ dense, rtol=1e-4, atol=1e-5)
    expected = ((dense.detach().double() - torch.eye(n, dtype=torch.float64)) ** 2).sum().item()
    assert tr_matrix_identity_distance(cores).item() == pytest.approx(expected, rel=1e-6)
    # the tensor ring is what the docstring says: T[i, j] = Tr(prod_k G_k[:, i_k, j_k, :])
    sizes = adapter.in_factors
    i, j = (5, 77)
    i_digits = torch.tensor(list(torch.unravel_index(torch.tensor(i), sizes)))
    j_digits = torch.tensor(list(torch.unravel_index(torch.tensor(j), sizes)))
    chain = torch.eye(3)
    for core, a, b in zip(cores, i_digits, j_digits):
        chain = chain @ core[:, a, b, :]
    torch.testing.assert_close(dense[i, j], torch.trace(chain), rtol=1e-5, atol=1e-6)
