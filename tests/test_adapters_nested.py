"""Nested ranks (DyLoRA): train with ranks sampled up to r, truncate to any k <= r."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from segadapt.adapters import AdapterConfig, inject, load_adapter, save_adapter, truncate

METHODS = ["conv_lora", "lora_c", "cp_lora", "conv_dora", "cp_dora", "dora_c"]


def leading(name: str, value: torch.Tensor, k: int, kernel: int) -> torch.Tensor:
    """The first k components of a factor, by the shapes in docs/methods.md: LoRA A (r, .) / B (., r); LoRA-C
    A (r k, .) / B (., r k); CP factors (., r); DoRA's magnitude is whole."""
    if name.endswith("magnitude"):
        return value
    if name.endswith("lora_A"):
        return value[: k * kernel]
    return value[:, : k * kernel]


def trained(method: str, rank: int = 4):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    config = AdapterConfig(method=method, rank=rank, alpha=6.0, targets=["0"], nested_ranks=True)
    model = inject(copy.deepcopy(base), config)
    x = torch.randn(2, 4, 6, 6)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    seen = set()
    for _ in range(12):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        seen.add(model[0].adapters["default"].sampled_rank)
        optimizer.step()
    return base, model, config, x, seen


@pytest.mark.parametrize("method", METHODS)
def test_truncation_equals_a_rank_k_adapter_with_the_same_leading_factors(method, tmp_path):
    base, model, config, x, seen = trained(method)
    assert len(seen) > 1, "training sampled more than one rank"
    kernel = 3 if method in ("lora_c", "dora_c") else 1
    params = {n: p.detach().clone() for n, p in model[0].adapters["default"].named_parameters()}
    model.eval()
    with torch.no_grad():
        full = model(x)
    for k in (3, 1):
        reference = inject(copy.deepcopy(base), AdapterConfig(method=method, rank=k, alpha=6.0, targets=["0"]))
        with torch.no_grad():
            for name, p in reference[0].adapters["default"].named_parameters():
                p.copy_(leading(name, params[name], k, kernel))
        truncated = truncate(copy.deepcopy(model), k)
        with torch.no_grad():
            torch.testing.assert_close(truncated(x), reference(x), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(truncated(x), full, atol=1e-5)
        path = save_adapter(truncated, tmp_path / f"rank{k}.safetensors")
        loaded = load_adapter(copy.deepcopy(base), path).eval()
        assert loaded[0].adapters["default"].rank == k
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), truncated(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_a_training_forward_uses_the_sampled_leading_components(method):
    """With s = alpha / b: the truncation to b (rank-b adapter) gives the same output."""
    base, model, _, x, _ = trained(method)
    adapter = model[0].adapters["default"]
    model.train()
    sampled = set()
    with torch.no_grad():
        for _ in range(10):
            y = model(x)
            b = adapter.sampled_rank
            sampled.add(b)
            reference = truncate(copy.deepcopy(model), b).eval()
            torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-6)
    assert min(sampled) < adapter.rank


@pytest.mark.parametrize("method", ["salt", "tlora"])
def test_nested_ranks_are_refused_where_undefined(method):
    with pytest.raises(ValueError, match="module '0': nested_ranks is not defined for"):
        inject(nn.Sequential(nn.Linear(8, 8)), AdapterConfig(method=method, rank=2, targets=["0"], nested_ranks=True))


def test_truncate_refuses_pissa_and_bad_ranks():
    model = inject(nn.Sequential(nn.Linear(8, 8)), AdapterConfig(method="lora", rank=4, targets=["0"], init="pissa"))
    with pytest.raises(ValueError, match="PiSSA-initialised adapter cannot be truncated"):
        truncate(model, 2)
    with pytest.raises(ValueError, match="truncate rank must be a positive integer"):
        truncate(model, 0)
    with pytest.raises(ValueError, match="nested_ranks and init='pissa' cannot be combined"):
        AdapterConfig(targets=["0"], nested_ranks=True, init="pissa")
