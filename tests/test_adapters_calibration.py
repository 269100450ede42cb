"""compute="auto" by measurement (segadapt/adapters/calibration.py): the faster measured order, timed once
per key, with no trace on the model, the gradients or the random number generators."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segadapt.adapters import AdapterConfig, calibration, inject


@pytest.fixture
def measuring(monkeypatch):
    monkeypatch.setenv(calibration.ENV_VAR, "measure")
    calibration.clear()
    yield
    calibration.clear()


def conv_adapter(method="conv_lora", cin=4, cout=4):
    model = inject(nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1)), AdapterConfig(method=method, rank=2, targets=["0"]))
    return model, model[0].adapters["default"], model[0].base_layer


@pytest.mark.parametrize("activation_s, weight_s", [(1.0, 2.0), (2.0, 1.0)])
def test_auto_takes_the_faster_measured_order_and_measures_each_key_once(measuring, monkeypatch, activation_s, weight_s):
    calls = []

    def fake_measure(adapter, base, x, activation):
        calls.append((tuple(x.shape), activation))
        return activation_s if activation else weight_s

    monkeypatch.setattr(calibration, "measure_order", fake_measure)
    _, adapter, base = conv_adapter()
    x = torch.randn(1, 4, 5, 5, 5, requires_grad=True)
    with torch.enable_grad():
        assert adapter.uses_activation_space(base, x) is (activation_s < weight_s)
        assert adapter.uses_activation_space(base, x) is (activation_s < weight_s)
    assert sorted(calls) == [((1, 4, 5, 5, 5), False), ((1, 4, 5, 5, 5), True)]  # once per order, then cached
    with torch.enable_grad():
        adapter.uses_activation_space(base, torch.randn(1, 4, 6, 5, 5, requires_grad=True))  # another input shape only: measured again
    assert len(calls) == 4
    with torch.no_grad():
        adapter.uses_activation_space(base, x)  # inference: another key
    assert len(calls) == 6
    # an explicit order, a meta input (no timing possible) and the cost-model switch measure nothing
    assert not adapter.uses_activation_space(base, x.to("meta"))
    adapter.compute = "weight"
    assert not adapter.uses_activation_space(base, torch.randn(1, 4, 7, 7, 7))
    adapter.compute = "auto"
    monkeypatch.setenv(calibration.ENV_VAR, "cost_model")
    adapter.uses_activation_space(base, torch.randn(1, 4, 8, 8, 8))
    assert len(calls) == 6


@pytest.mark.parametrize("method", ["conv_lora", "cp_dora", "salt"])
def test_measuring_leaves_the_step_unchanged(measuring, method):
    """The measuring forward returns what the chosen order computes, touches no .grad and no RNG, and the
    backward gives the weight-space gradients."""
    torch.manual_seed(0)
    model, adapter, base = conv_adapter(method, cin=3, cout=5)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 3, 6, 6, 6, requires_grad=True)
    rng = torch.get_rng_state()
    y = model(x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    chosen = adapter.uses_activation_space(base, x)  # cached now
    torch.testing.assert_close(y, adapter.run_order(base, x, chosen) + 0, rtol=0, atol=0)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in adapter.parameters()]
    adapter.compute = "weight"
    for p in adapter.parameters():
        p.grad = None
    y_weight = model(x)
    y_weight.square().sum().backward()
    torch.testing.assert_close(y, y_weight, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, (p.grad for p in adapter.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_an_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(calibration.ENV_VAR, "fastest")
    _, adapter, base = conv_adapter()
    with pytest.raises(ValueError, match=r"SEGADAPT_AUTO_COMPUTE='fastest': expected one of measure, cost_model"):
        adapter.uses_activation_space(base, torch.randn(1, 4, 5, 5, 5))


def test_an_empty_mode_variable_is_unset(monkeypatch):
    """`SEGADAPT_AUTO_COMPUTE= segadapt ...` (set but empty, the shell's way to clear it for one command) measures,
    as when the variable is not set."""
    monkeypatch.setenv(calibration.ENV_VAR, "")
    assert calibration.mode() == "measure"
    monkeypatch.delenv(calibration.ENV_VAR)
    assert calibration.mode() == "measure"
