"""Table-driven checks of every adapter method on every supported layer type."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from segadapt.adapters import (
    METHODS,
    AdaptedLayer,
    AdapterConfig,
    inject,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    unmerge,
)

RANK, LORA_RANK, RING = 3, 2, 2

# name -> (factory, input shape)
LAYERS = {
    "linear": (lambda: nn.Linear(24, 20), (2, 5, 24)),
    "conv1d": (lambda: nn.Conv1d(6, 12, 3, padding=1), (2, 6, 11)),
    "conv2d": (lambda: nn.Conv2d(6, 12, 3, stride=2, padding=1), (2, 6, 9, 10)),
    "conv2d_dilated_nobias": (lambda: nn.Conv2d(6, 12, 3, padding=2, dilation=2, bias=False), (2, 6, 9, 9)),
    "conv2d_same": (lambda: nn.Conv2d(6, 12, 3, padding="same"), (2, 6, 7, 8)),
    "conv2d_reflect": (lambda: nn.Conv2d(6, 12, (3, 1), padding=(1, 0), padding_mode="reflect"), (2, 6, 8, 7)),
    "conv3d": (lambda: nn.Conv3d(4, 10, 3, padding=1), (2, 4, 6, 5, 6)),
    "conv3d_strided": (lambda: nn.Conv3d(4, 10, (3, 3, 1), stride=(2, 2, 1), padding=(1, 1, 0)), (1, 4, 7, 6, 5)),
    "convT2d": (lambda: nn.ConvTranspose2d(8, 6, 2, stride=2), (2, 8, 5, 4)),
    "convT3d": (lambda: nn.ConvTranspose3d(8, 6, 3, stride=2, padding=1, output_padding=1), (1, 8, 4, 3, 4)),
}
CASES = [(method, layer) for method in sorted(METHODS) for layer in LAYERS]
ACTIVATION_METHODS = ["lora", "conv_lora", "conv_dora", "cp_lora", "cp_dora", "salt"]


def make(layer: str, method: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    factory, shape = LAYERS[layer]
    model = nn.Sequential(factory(), nn.Tanh())
    base = copy.deepcopy(model)
    config = AdapterConfig(method=method, rank=RANK, alpha=2 * RANK, lora_rank=LORA_RANK, ring_rank=RING, targets=["0"], **overrides)
    inject(model, config)
    return base, model, torch.randn(*shape)


def adapter_of(model) -> nn.Module:
    return model[0].adapters["default"]


def train_steps(model, x, steps=3, lr=2e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    target = torch.randn_like(model(x))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()


def expected_params(method: str, module: nn.Module, adapter: nn.Module) -> int:
    """Trainable parameter counts from the table in docs/methods.md, computed from the layer's shape."""
    if isinstance(module, nn.Linear):
        cout, cin, kernel = module.out_features, module.in_features, ()
    else:
        cout, cin, kernel = module.out_channels, module.in_channels, tuple(module.kernel_size)
    fan_in = cin * math.prod(kernel)
    r = RANK
    dora_extra = cout if method.endswith("dora") or method == "dora_c" else 0
    if method in ("lora", "conv_lora", "conv_dora"):
        return r * (fan_in + cout) + dora_extra
    if method in ("lora_c", "dora_c"):
        k = kernel[0] if kernel else 1
        return r * k * (fan_in // k + cout * k) + dora_extra
    if method in ("cp_lora", "cp_dora"):
        return r * (cout + cin + sum(kernel)) + dora_extra
    if method == "salt":
        q = min(cout, fan_in)
        return 2 * r + 2 * (q - r) * min(LORA_RANK, q - r)
    if method == "tlora":
        assert math.prod(adapter.in_factors) == fan_in and math.prod(adapter.out_factors) == cout
        return RING**2 * sum(i * i for i in adapter.in_factors) + r**2 * (sum(adapter.in_factors) + sum(adapter.out_factors))
    raise AssertionError(method)


@pytest.mark.parametrize("method,layer", CASES)
def test_identity_at_init_and_parameter_count(method, layer):
    base, model, x = make(layer, method)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=2e-6)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == expected_params(method, base[0], adapter_of(model))
    assert all(not p.requires_grad for p in model[0].base_layer.parameters())


@pytest.mark.parametrize("method,layer", CASES)
def test_train_merge_unmerge_and_frozen_base(method, layer):
    base, model, x = make(layer, method)
    base_state = {k: v.clone() for k, v in model[0].base_layer.state_dict().items()}
    train_steps(model, x)
    # only adapter parameters changed; the base is bit-identical
    for key, value in model[0].base_layer.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base(x), atol=1e-4), "training did not move the output"
        merge(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)
        unmerge(model)
        for key, value in model[0].base_layer.state_dict().items():
            torch.testing.assert_close(value, base_state[key], rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)
        plain = merge_and_unload(model)
        assert type(plain[0]) is type(base[0]) and not any(isinstance(m, AdaptedLayer) for m in plain.modules())
        torch.testing.assert_close(plain(x), adapted, rtol=1e-4, atol=1e-5)
        # the merged model loads into the bare architecture
        bare = copy.deepcopy(base)
        bare.load_state_dict(plain.state_dict())
        torch.testing.assert_close(bare(x), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,layer", CASES)
def test_save_load_round_trip(method, layer, tmp_path):
    base, model, x = make(layer, method)
    train_steps(model, x, steps=2)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ACTIVATION_METHODS)
@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d", "conv2d_dilated_nobias", "conv2d_same", "conv3d", "conv3d_strided"])
def test_weight_and_activation_space_agree(method, layer):
    """Same outputs, parameter gradients and input gradients in both computation orders."""
    _, model, x = make(layer, method)
    adapter = adapter_of(model)
    assert adapter.has_activation_form
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    outputs, grads = {}, {}
    for compute in ("weight", "activation"):
        adapter.compute = compute
        model.zero_grad()
        inputs = x.clone().requires_grad_()
        y = model(inputs)
        y.square().sum().backward()
        outputs[compute] = y.detach()
        grads[compute] = [p.grad.clone() for p in adapter.parameters()] + [inputs.grad]
    torch.testing.assert_close(outputs["activation"], outputs["weight"], rtol=1e-4, atol=1e-5)
    for g_act, g_weight in zip(grads["activation"], grads["weight"]):
        torch.testing.assert_close(g_act, g_weight, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["lora_c", "dora_c", "tlora"])
def test_weight_space_only_methods(method):
    _, model, _ = make("conv2d", method)
    assert not adapter_of(model).has_activation_form
    with pytest.raises(ValueError, match="dropout"):
        make("conv2d", method, dropout=0.1)


def test_reflect_padding_uses_weight_space():
    _, model, _ = make("conv2d_reflect", "conv_lora")
    assert not adapter_of(model).has_activation_form


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("compute", ["weight", "activation"])
def test_bf16_autocast(method, compute):
    """Output and adapter gradients under bf16 autocast match an fp32 run, in relative Frobenius error
    (measured: output ~0.4%, gradients <= 1.2%, except SALT's X at ~3%: its gradient is a projection
    onto the weak singular directions of W0, where bf16 rounding of the weight gradient dominates)."""

    def relative_error(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    _, model, x = make("conv2d", method, compute=compute)
    train_steps(model, x, steps=1)
    params = list(adapter_of(model).parameters())
    reference = model(x)
    reference.sum().backward()
    reference_grads = [p.grad.clone() for p in params]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert relative_error(y, reference) < 2e-2
    for param, expected in zip(params, reference_grads):
        assert param.grad is not None and param.grad.dtype == param.dtype
        assert relative_error(param.grad, expected) < (5e-2 if param is getattr(adapter_of(model), "salt_X", None) else 2e-2)


def test_dropout_applies_in_training_only():
    _, model, x = make("conv2d", "conv_lora", dropout=0.5, compute="activation")
    train_steps(model, x, steps=2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("method", ACTIVATION_METHODS)
def test_in_place_activation_after_adapted_layer(method):
    """A following nn.ReLU(inplace=True) must not break the backward of either computation order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 1), nn.ReLU(inplace=True))
    inject(model, AdapterConfig(method=method, rank=2, lora_rank=2, targets=["0", "2"], compute="activation"))
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("cin, cout, size", [(64, 64, 12), (4, 4, 12), (32, 8, 6)])
def test_auto_order_follows_the_flop_model_on_cpu_and_weight_space_elsewhere(cin, cout, size):
    """compute="auto": the cheaper order of the documented FLOP model on CPU (training and inference);
    weight space for an input on another device (meta stands in for a GPU: no data is touched)."""
    from segadapt.adapters.base import NARROW_OP_PENALTY

    model = nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1))
    inject(model, AdapterConfig(method="conv_lora", rank=8, targets=["0"]))
    adapter, base = model[0].adapters["default"], model[0].base_layer
    x = torch.randn(1, cin, size, size, size)
    n_out, fan_in, k = size**3, cin * 27, 8
    build = 2.0 * cout * fan_in * k
    for passes, grad in ((3.0, True), (1.0, False)):
        weight_cost = passes * build + (2.0 * n_out * cout * fan_in if grad else 0.0)
        activation_cost = passes * 2.0 * n_out * k * (fan_in + NARROW_OP_PENALTY * cout)
        with torch.set_grad_enabled(grad):
            assert adapter.uses_activation_space(base, x) == (activation_cost < weight_cost)
            assert not adapter.uses_activation_space(base, x.to("meta"))
    # the concrete decisions in training, in case the formula above drifts along with the code
    expected = {(64, 64): True, (4, 4): False}.get((cin, cout))
    if expected is not None:
        with torch.enable_grad():
            assert adapter.uses_activation_space(base, x) is expected


@pytest.mark.parametrize("method", ["conv_lora", "cp_dora", "salt"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("compute", ["auto", "activation"])
def test_unfrozen_base_weight_trains_in_every_compute_mode(method, layer, compute):
    """A base weight the user unfreezes gets the same gradient as in weight space (the fused
    activation-space op would return none for it)."""
    grads = {}
    for mode in ("weight", compute):
        _, model, x = make(layer, method, compute=mode)
        model[0].base_layer.weight.requires_grad_(True)
        assert not adapter_of(model).uses_activation_space(model[0].base_layer, x)
        model(x).square().sum().backward()
        grads[mode] = model[0].base_layer.weight.grad
    assert grads[compute] is not None
    torch.testing.assert_close(grads[compute], grads["weight"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["conv_lora", "conv_dora", "salt"])
@pytest.mark.parametrize("layer", ["conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("compute", ["auto", "activation"])
def test_unbatched_conv_input_matches_the_batched_result(method, layer, compute):
    _, model, x = make(layer, method, compute=compute)
    train_steps(model, x, steps=1)
    torch.testing.assert_close(model(x[0]), model(x[:1])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["conv_dora", "cp_dora", "dora_c", "tlora"])
def test_unmerge_after_moving_the_merged_model(method):
    """State kept from merge for unmerge follows .to(): a dtype change restores W0 to tolerance, a
    device change (meta stands in for a GPU) runs."""
    base, model, x = make("conv2d", method)
    train_steps(model, x)
    merge(model)
    model.double()
    unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, base[0].weight.double(), rtol=0, atol=1e-6)
    merge(model)
    model.to("meta")
    unmerge(model)
    assert model[0].base_layer.weight.device.type == "meta"


@pytest.mark.parametrize("method,name", [("dora_c", "DoRAC"), ("lora_c", "LoRAC"), ("tlora", "TLoRA")])
def test_dropout_error_names_the_requested_method(method, name):
    with pytest.raises(ValueError, match=rf"dropout=0.1 needs an activation-space form; {name} on a conv layer"):
        make("conv2d", method, dropout=0.1)


def test_dora_dropout_applies_to_the_branch_once():
    """DoRA's own dropout module is the only one; its direction is built without dropout."""
    _, model, _ = make("conv2d", "conv_dora", dropout=0.5)
    adapter = adapter_of(model)
    assert isinstance(adapter.dropout, nn.Dropout) and isinstance(adapter.direction.dropout, nn.Identity)
    assert adapter.has_activation_form


def test_tlora_refuses_a_fan_in_with_a_large_prime_factor():
    model = nn.Sequential(nn.Linear(257, 64))
    with pytest.raises(ValueError, match=r"module '0': TLoRA cannot factorise the fan-in Cin\*k\^d = 257 .* tlora_max_factor=16: it has the prime factor 257.*raise tlora_max_factor"):
        inject(model, AdapterConfig(method="tlora", rank=4, targets=["0"]))
    assert isinstance(model[0], nn.Linear)
    inject(model, AdapterConfig(method="tlora", rank=4, targets=["0"], tlora_max_factor=257))
    assert model[0].adapters["default"].in_factors == [257]


@pytest.mark.parametrize("method", ["conv_lora", "conv_dora", "salt"])
@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv2d_dilated_nobias", "conv2d_same", "conv3d_strided"])
def test_dropout_path_matches_weight_space_when_nothing_is_dropped(method, layer):
    """The unfused training path (frozen layer on x, branch on dropout(x)) with p=0 is the adapted layer."""
    _, model, x = make(layer, method, dropout=0.5, compute="activation")
    train_steps(model, x, steps=1)
    adapter = adapter_of(model)
    adapter.dropout.p = 0.0
    y = model(x)
    adapter.compute = "weight"
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5)
