"""Norm tuning (``AdapterConfig.norms``, the ``norms`` baseline): exactly the normalisation layers' affine
parameters train beside the adapter, counted against a hand count; they round-trip through the adapter file and
the merged network computes what the adapted one computes."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from segadapt.adapters import AdapterConfig, inject, load_adapter, merge_and_unload, norm_layers, save_adapter
from segadapt.models import build_model
from segadapt.training.module import SegAdaptModule

CONVS = ["0", "3", "7"]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),   # 0
        nn.BatchNorm2d(4),               # 1: 4 + 4 affine
        nn.ReLU(),                       # 2
        nn.Conv2d(4, 6, 3, padding=1),   # 3
        nn.GroupNorm(2, 6),              # 4: 6 + 6
        nn.InstanceNorm2d(6),            # 5: no affine parameters: not trained
        nn.InstanceNorm2d(6, affine=True),  # 6: 6 + 6
        nn.Conv2d(6, 2, 1),              # 7
        nn.LayerNorm([2, 5, 5]),         # 8: 50 + 50
    )


NORM_PARAMS = 8 + 12 + 12 + 100  # by hand, from the layers above
X = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(1))


def _config(norms: bool, **kw) -> AdapterConfig:
    return AdapterConfig(method="lora_c", rank=2, alpha=2, targets=CONVS, norms=norms, **kw)


def _trainable(net: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in net.named_parameters() if p.requires_grad}


def _perturb(net: nn.Module) -> None:
    """Move every trainable tensor (and the norms' running statistics) away from its initial value."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    net.train()
    net(X)  # BatchNorm running statistics of the trained copy
    net.eval()


def test_exactly_the_norms_affine_parameters_train_beside_the_adapter():
    adapter_only = _trainable(inject(_net(), _config(norms=False)))
    with_norms = _trainable(inject(_net(), _config(norms=True)))
    extra = {n: k for n, k in with_norms.items() if n not in adapter_only}
    assert set(adapter_only) <= set(with_norms)
    assert sum(extra.values()) == NORM_PARAMS
    assert {n.split(".")[0] for n in extra} == {"1", "4", "6", "8"}  # the affine norms; not the plain InstanceNorm
    assert all(n.endswith((".weight", ".bias")) and ".modules_to_save.default." in n for n in extra)
    assert norm_layers(_net()) == ["1", "4", "6", "8"]


def test_norms_round_trip_through_the_adapter_file_and_merge(tmp_path):
    net = inject(_net(), _config(norms=True))
    _perturb(net)
    with torch.no_grad():
        expected = net(X)
    path = save_adapter(net, tmp_path / "adapter.safetensors")

    loaded = _net().eval()
    load_adapter(loaded, path)
    with torch.no_grad():
        assert torch.equal(loaded(X), expected)
        assert not torch.allclose(_net().eval()(X), expected)  # the trained norms do change the output

    merged = merge_and_unload(copy.deepcopy(net)).eval()
    assert all(type(m) in (nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.GroupNorm, nn.InstanceNorm2d,
                           nn.LayerNorm) for m in merged.modules())
    bare = _net().eval()
    bare.load_state_dict(merged.state_dict())  # loads into the bare architecture
    with torch.no_grad():
        torch.testing.assert_close(bare(X), expected, rtol=1e-5, atol=1e-6)


class _SharedNorm(nn.Module):
    """nnU-Net's layout: the norm registered twice (``norm`` and ``all_modules.1``); forward uses all_modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.all_modules = nn.Sequential(self.conv, self.norm)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.all_modules(x))


def test_a_norm_held_twice_is_trained_on_the_path_forward_takes():
    torch.manual_seed(0)
    net = inject(_SharedNorm().eval(), AdapterConfig(method="lora_c", rank=2, targets=["conv", "head"], norms=True))
    assert net.all_modules[1] is net.norm  # the wrapper in both slots
    with torch.no_grad():
        before = net(X)
        net.norm.modules_to_save["default"].bias.add_(1.0)
        after = net(X)
    assert not torch.allclose(before, after)
    merged = merge_and_unload(net)
    assert merged.all_modules[1] is merged.norm and isinstance(merged.norm, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(merged(X), after)


def test_norms_without_any_normalisation_layer_is_refused():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 1, 1))
    with pytest.raises(ValueError, match="no normalisation layer with affine parameters"):
        inject(net, AdapterConfig(method="lora_c", rank=2, targets=["0", "2"], norms=True))
    with pytest.raises(ValueError, match="norms must be true or false"):
        AdapterConfig(norms="yes", targets=["0"])


def test_the_norms_baseline_trains_only_the_norms(tmp_path):
    kwargs = {"in_channels": 1, "out_channels": 1, "channels": [4, 8], "strides": [2], "num_res_units": 0,
              "norm": "batch"}
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("multiview_unet", **kwargs).state_dict().items()}, str(base))
    module = SegAdaptModule(model="multiview_unet", model_kwargs=kwargs, base_checkpoint=str(base), adapter="norms")
    norms = [m for m in module.net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and module.trainable_params == sum(p.numel() for m in norms for p in m.parameters())
    assert all(p.requires_grad == any(p is q for m in norms for q in m.parameters()) for p in module.net.parameters())


def test_the_norms_baseline_on_a_network_without_affine_norms_is_refused(tmp_path):
    kwargs = {"in_channels": 1, "out_channels": 1, "channels": [4, 8], "strides": [2], "num_res_units": 0}
    base = tmp_path / "base.safetensors"  # MONAI's default: InstanceNorm without affine parameters
    save_file({k: v.contiguous() for k, v in build_model("multiview_unet", **kwargs).state_dict().items()}, str(base))
    with pytest.raises(ValueError, match="adapter='norms': .* no normalisation layer with affine parameters"):
        SegAdaptModule(model="multiview_unet", model_kwargs=kwargs, base_checkpoint=str(base), adapter="norms")
