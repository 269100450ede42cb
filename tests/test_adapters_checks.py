"""The silent cases closed: dropout in every computation order, SALT after loading another base,
torch.func transforms, scaling and init conventions, target matching, rank bounds, bad regexes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from segadapt.adapters import METHODS, AdapterConfig, inject, spec_of

DROPOUT_METHODS = ["conv_lora", "conv_dora", "cp_lora", "cp_dora", "salt"]


def adapted(layer: nn.Module, method: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = nn.Sequential(layer)
    config = dict(method=method, rank=2, lora_rank=2, targets=["0"])
    config.update(overrides)
    inject(model, AdapterConfig(**config))
    adapter = model[0].adapters["default"]
    with torch.no_grad():  # a non-zero update, so that the branch (and its dropout) shows in the output
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, adapter


# ---- dropout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", DROPOUT_METHODS)
@pytest.mark.parametrize("case", ["auto_cost_model_weight", "compute_activation", "base_trainable"])
def test_dropout_acts_in_every_computation_order(method, case):
    """Two train-mode forwards differ, two eval-mode forwards are equal, whatever order the layer
    would otherwise use (the cost model picks weight space for this small 2-channel conv; a trainable
    base weight forces weight space without dropout)."""
    layer = nn.Conv2d(2, 2, 3, padding=1)
    compute = "activation" if case == "compute_activation" else "auto"
    model, adapter = adapted(layer, method, dropout=0.5, compute=compute)
    base = model[0].base_layer
    x = torch.randn(1, 2, 24, 24)
    if case == "base_trainable":
        base.weight.requires_grad_(True)
    adapter.eval()
    if case == "auto_cost_model_weight":
        with torch.enable_grad():
            assert not adapter.uses_activation_space(base, x), "precondition: auto picks weight space here"
    model.train()
    assert adapter.uses_activation_space(base, x) and adapter.uses_activation_space(base, x.to("meta"))
    y1, y2 = model(x), model(x)
    assert not torch.equal(y1, y2)
    if case == "base_trainable":  # the unfused dropout path gives W0 its gradient
        y1.square().sum().backward()
        assert base.weight.grad is not None and base.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_dropout_with_forced_weight_space_is_refused():
    with pytest.raises(ValueError, match=r"dropout=0.1 needs activation space; compute='weight' would drop it"):
        AdapterConfig(method="conv_lora", targets=["0"], dropout=0.1, compute="weight")


@pytest.mark.parametrize("method", ["conv_lora", "conv_dora", "cp_lora"])
def test_dropout_on_a_transposed_conv_is_refused_at_injection(method):
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2))
    with pytest.raises(ValueError, match=r"module '0': dropout=0.2 needs an activation-space form"):
        inject(model, AdapterConfig(method=method, rank=2, targets=["0"], dropout=0.2))
    assert isinstance(model[0], nn.ConvTranspose2d)


# ---- SALT follows the base it is loaded onto ----------------------------------------------------
@pytest.mark.parametrize("layer", [lambda: nn.Linear(10, 8), lambda: nn.Conv2d(4, 6, 3, padding=1)])
def test_salt_after_load_state_dict_onto_another_base_equals_a_fresh_injection(layer):
    torch.manual_seed(0)
    base_a, base_b = nn.Sequential(layer()), nn.Sequential(layer())
    x = torch.randn(2, 10) if isinstance(base_a[0], nn.Linear) else torch.randn(2, 4, 5, 5)
    config = AdapterConfig(method="salt", rank=2, lora_rank=2, targets=["0"])
    model = inject(copy.deepcopy(base_a), config)
    with torch.no_grad():
        for p in model[0].adapters["default"].parameters():
            p.add_(0.2 * torch.randn_like(p))
    fresh = inject(copy.deepcopy(base_b), config)
    # the adapter's own state onto base B's fresh injection, and base B's weights onto the first model
    adapter_state = {k: v for k, v in model.state_dict().items() if ".adapters." in k}
    fresh.load_state_dict(adapter_state, strict=False)
    model.load_state_dict(fresh.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=1e-6)
        for name in ("U", "S", "Vh"):
            torch.testing.assert_close(getattr(model[0].adapters["default"], name), getattr(fresh[0].adapters["default"], name))


# ---- torch.func --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["conv_lora", "conv_dora", "cp_lora", "salt"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("compute", ["activation", "weight"])
def test_torch_func_grad_in_both_orders_equals_autograd_in_weight_space(method, layer, compute):
    module = nn.Linear(6, 5) if layer == "linear" else nn.Conv2d(3, 4, 3, padding=1, dilation=1)
    model, adapter = adapted(module, method, compute=compute)
    x = torch.randn(2, 6) if layer == "linear" else torch.randn(2, 3, 6, 6)
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params)
    adapter.compute = "weight"
    model.zero_grad()
    model(x).square().sum().backward()
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-5)


# ---- scaling and init conventions ---------------------------------------------------------------
@pytest.mark.parametrize("alpha,rslora,rank,expected", [(None, False, 4, 1.0), (None, True, 4, 1.0), (None, True, 9, 1.0), (4.0, True, 4, 2.0), (6.0, False, 3, 2.0), (6.0, True, 9, 2.0)])
def test_scaling(alpha, rslora, rank, expected):
    assert AdapterConfig(targets=["0"], alpha=alpha, use_rslora=rslora).scaling(rank) == pytest.approx(expected)


def test_salt_scaling_multiplies_the_low_rank_term_and_is_what_it_prints():
    layer = nn.Linear(12, 10)
    updates = {}
    for alpha in (None, 6.0):  # lora_rank 3: s = 1, then s = 6 / 3 = 2
        model, adapter = adapted(copy.deepcopy(layer), "salt", rank=2, lora_rank=3, alpha=alpha)
        with torch.no_grad():
            adapter.salt_scale.fill_(1.0), adapter.salt_shift.fill_(0.0)  # only the X Y term moves
            updates[alpha] = adapter.delta_weight()
        assert f"scaling={adapter.scaling:g}" in repr(adapter)
    assert adapter.scaling == 2.0
    torch.testing.assert_close(updates[6.0], 2.0 * updates[None])


def test_gaussian_init_has_standard_deviation_one_over_r():
    """PEFT's gaussian init: std 1/r for LoRA's A; for CP, the Khatri-Rao down factor of M(dW)."""
    rank = 4
    torch.manual_seed(0)
    lora = inject(nn.Sequential(nn.Conv2d(64, 8, 3)), AdapterConfig(method="conv_lora", rank=rank, targets=["0"], init="gaussian"))[0].adapters["default"]
    assert lora.lora_A.std().item() == pytest.approx(1 / rank, rel=0.05)
    # each of the 4 factors (Conv3d) has E[U^2] = r^(-1/2), so E[down^2] = prod_j E[U_j^2] = 1/r^2 for
    # their Khatri-Rao product; means over 40 draws, as one draw of a 5-entry spatial factor is noisy
    factor_moments, down_moments = [], []
    for seed in range(40):
        torch.manual_seed(seed)
        model = inject(nn.Sequential(nn.Conv3d(16, 4, 5)), AdapterConfig(method="cp_lora", rank=rank, targets=["0"], init="gaussian"))
        adapter = model[0].adapters["default"]
        factor_moments += [f.detach().square().mean().item() for f in (adapter.cp_in, *adapter.cp_spatial)]
        down_moments.append(adapter.low_rank_factors()[1].detach().square().mean().item())
    assert sum(factor_moments) / len(factor_moments) == pytest.approx(rank**-0.5, rel=0.1)
    assert sum(down_moments) / len(down_moments) == pytest.approx(1 / rank**2, rel=0.3)


def test_tlora_transform_is_the_identity_in_float64():
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Conv2d(12, 10, 3)).double(), AdapterConfig(method="tlora", rank=2, ring_rank=3, targets=["0"]))
    transform = model[0].adapters["default"].transform_matrix().detach()
    assert transform.dtype == torch.float64
    eye = torch.eye(transform.shape[0], dtype=torch.float64)
    assert torch.count_nonzero(transform * (1 - eye)) == 0
    assert (transform.diagonal() - 1).abs().max().item() < 1e-14


# ---- targets ------------------------------------------------------------------------------------
class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.block = nn.Sequential()
        self.block.add_module("conv", nn.Conv2d(2, 2, 1))
        self.block.add_module("conv2", nn.Conv2d(2, 2, 1))


@pytest.mark.parametrize(
    "targets,expected",
    [
        ("conv", ["conv"]),  # a string is a regex over the whole name, not a suffix
        (r".*conv", ["block.conv", "conv"]),
        (r"block\.conv\d*", ["block.conv", "block.conv2"]),
        (["conv"], ["block.conv", "conv"]),  # a list holds suffixes
        (["block.conv2"], ["block.conv2"]),
    ],
)
def test_string_targets_fullmatch_and_lists_match_suffixes(targets, expected):
    model = inject(Named(), AdapterConfig(method="conv_lora", rank=1, targets=targets))
    assert sorted(name for name, m in model.named_modules() if hasattr(m, "adapters")) == expected


@pytest.mark.parametrize("field", ["targets", "exclude", "rank_pattern"])
def test_a_regex_that_does_not_compile_is_a_value_error_naming_it(field):
    values = {"targets": ["conv"], field: "(unclosed"}
    if field == "rank_pattern":
        values[field] = {"(unclosed": 2}
    with pytest.raises(ValueError, match=r"'\(unclosed' is not a valid regular expression"):
        AdapterConfig(**values)


# ---- rank bounds --------------------------------------------------------------------------------
# (method, layer, the bound from the method's docstring, written out for this layer)
CONV = lambda: nn.Conv2d(6, 4, 3)  # noqa: E731  Cout 4, Cin 6, k 3x3: fan-in 54
BOUNDS = [
    ("lora", CONV, 54),  # max(Cout, Cin k^d)
    ("conv_lora", CONV, 54),
    ("conv_dora", CONV, 54),
    ("lora_c", CONV, 18),  # max(Cout k, Cin k^(d-1)) = max(12, 18)
    ("dora_c", CONV, 18),
    ("cp_lora", CONV, 72),  # Cout Cin k k / min(Cout, Cin, k) = 4*6*3*3 / 3
    ("cp_dora", CONV, 72),
    ("salt", CONV, 4),  # min(Cout, Cin k^d)
    ("tlora", CONV, 54),  # max(Cout, Cin k^d), as the LoRA forms
]


@pytest.mark.parametrize("method,layer,bound", BOUNDS)
def test_rank_bound_is_accepted_and_one_above_it_refused_in_one_line(method, layer, bound):
    assert METHODS[method].rank_bound(spec_of(layer()), AdapterConfig(targets=["0"])) == bound
    inject(nn.Sequential(layer()), AdapterConfig(method=method, rank=bound, lora_rank=1, ring_rank=2, targets=["0"]))
    model = nn.Sequential(layer())
    with pytest.raises(ValueError, match=rf"^module '0': rank {bound + 1} exceeds {bound}, the most a \w+ update of this conv layer \(weight 4x6x3x3\) can hold$"):
        inject(model, AdapterConfig(method=method, rank=bound + 1, targets=["0"]))
    assert isinstance(model[0], nn.Conv2d)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_huge_rank_is_refused_before_any_allocation(method):
    """rank 10^12 cannot be allocated at all: a ValueError (not an allocation failure) proves the check
    comes first; also through rank_pattern."""
    for config in (dict(rank=10**12), dict(rank=2, rank_pattern={"0": 10**12})):
        with pytest.raises(ValueError, match=r"module '0': rank 1000000000000 exceeds \d+"):
            inject(nn.Sequential(nn.Linear(16, 16)), AdapterConfig(method=method, targets=["0"], **config))


def test_tlora_ring_rank_above_the_fan_in_is_refused():
    with pytest.raises(ValueError, match=r"module '0': ring_rank 17 exceeds 16, the fan-in"):
        inject(nn.Sequential(nn.Linear(16, 8)), AdapterConfig(method="tlora", rank=2, ring_rank=17, targets=["0"]))
