"""Model-level behaviour: injection by name, several adapters, summary, files, bad input, real networks."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from monai.networks.nets import UNet
from safetensors import safe_open
from torch import nn

from segadapt.adapters import (
    METHODS,
    AdaptedLayer,
    AdapterConfig,
    active_adapter,
    adapter_names,
    inject,
    load_adapter,
    merge,
    merge_and_unload,
    regularization_loss,
    remove_adapter,
    save_adapter,
    set_active_adapter,
    summary,
    summary_rows,
    unmerge,
)


class TinyNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=2)
        self.decoder = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2, 1))

    def forward(self, x):
        return self.decoder(self.grouped(self.encoder(x)))


def unchanged(model: nn.Module, reference: nn.Module) -> bool:
    same_state = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    same_grad = all(p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), reference.parameters()))
    return same_state and same_grad and not any(isinstance(m, AdaptedLayer) for m in model.modules())


def randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


# ---- bad input: a clear error and nothing half-applied ---------------------------------------------
@pytest.mark.parametrize(
    "config,error,message",
    [
        (dict(method="lorax", targets=["decoder.0"]), ValueError, "unknown adapter method 'lorax'; valid methods: conv_dora, conv_lora, cp_dora"),
        (dict(method="salt", rank=30, targets=["decoder.0"]), ValueError, r"module 'decoder.0': rank 30 exceeds 8, the most a SALT update of this conv layer \(weight 8x8x3x3\) can hold"),
        (dict(method="lora", targets=["nothing_here"]), ValueError, r"match no module; adaptable modules include: encoder.0, grouped, decoder.0, decoder.2"),
        (dict(method="lora", targets=["encoder.1"]), TypeError, "module 'encoder.1' is a BatchNorm2d; adapters support Linear"),
        (dict(method="lora", targets=["grouped"]), ValueError, r"module 'grouped' is a grouped Conv2d \(groups=2\)"),
        (dict(method="tlora", dropout=0.2, targets=["decoder.0"]), ValueError, "dropout=0.2 needs an activation-space form"),
    ],
)
def test_bad_injection_is_refused_and_leaves_model_unchanged(config, error, message):
    model = TinyNet()
    reference = copy.deepcopy(model)
    with pytest.raises(error, match=message):
        inject(model, config)
    assert unchanged(model, reference)


@pytest.mark.parametrize("values,message", [(dict(rank=0), "rank must be a positive integer"), (dict(rank=-2), "rank must be"), (dict(targets=[]), "targets is empty"), (dict(compute="fast"), "compute must be one of"), (dict(rank_pattern={"x": 0}), r"rank_pattern\['x'\]")])
def test_bad_config_values(values, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**{"targets": ["x"], **values})
    with pytest.raises(ValueError, match="unknown AdapterConfig fields"):
        AdapterConfig.from_dict({"method": "lora", "targets": ["x"], "rnak": 4})


def test_injecting_twice_under_one_name_is_refused():
    model = inject(TinyNet(), AdapterConfig(targets=["decoder.0"]))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="adapter named 'default' is already injected"):
        inject(model, AdapterConfig(method="cp_lora", targets=["decoder.0", "decoder.2"]))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_targets_regex_suffix_exclude_and_rank_pattern():
    model = inject(TinyNet(), AdapterConfig(method="lora", rank=4, targets=r"(encoder|decoder)\.[02]", exclude=["decoder.2"], rank_pattern={"encoder.0": 2}))
    rows = {row["module"]: row for row in summary_rows(model)}
    assert set(rows) == {"encoder.0", "decoder.0"}
    assert rows["encoder.0"]["rank"] == 2 and rows["decoder.0"]["rank"] == 4
    assert rows["encoder.0"]["params"] == 2 * (3 * 9 + 8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"encoder.0.adapters.default.lora_A", "encoder.0.adapters.default.lora_B", "decoder.0.adapters.default.lora_A", "decoder.0.adapters.default.lora_B"}


def test_summary_table_counts():
    model = inject(TinyNet(), AdapterConfig(method="conv_dora", rank=2, targets=["encoder.0", "decoder.0"]))
    table = summary(model)
    rows = summary_rows(model)
    total = sum(row["params"] for row in rows)
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (27 + 8) + 8 + 2 * (72 + 8) + 8
    base = sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n)
    assert f"| {total:,} | {100 * total / base:.3f} of {base:,} base |" in table
    assert f"| encoder.0 | Conv2d | conv_dora | 2 | 78 | {100 * 78 / (3 * 9 * 8 + 8):.2f} |" in table


def test_several_named_adapters_and_switching(tmp_path):
    torch.manual_seed(0)
    model = TinyNet().eval()
    base = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    inject(model, AdapterConfig(method="lora", targets=["decoder.0"]), name="fold0")
    inject(model, AdapterConfig(method="cp_lora", targets=["decoder.0", "encoder.0"]), name="fold1")
    assert adapter_names(model) == ["fold0", "fold1"] and active_adapter(model) == "fold1"
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fold1"}
    randomize(model)
    set_active_adapter(model, "fold0")
    randomize(model)
    with torch.no_grad():
        y0 = model(x)
        set_active_adapter(model, "fold1")
        y1 = model(x)
        set_active_adapter(model, None)
        torch.testing.assert_close(model(x), base(x))
    assert not torch.allclose(y0, y1)
    for name in ("fold0", "fold1"):
        save_adapter(model, tmp_path / f"{name}.safetensors", name=name)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "fold0.safetensors")
    load_adapter(fresh, tmp_path / "fold1.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y1, rtol=0, atol=0)
        set_active_adapter(fresh, "fold0")
        torch.testing.assert_close(fresh(x), y0, rtol=0, atol=0)
    remove_adapter(fresh, "fold0")
    remove_adapter(fresh, "fold1")
    assert not any(isinstance(m, AdaptedLayer) for m in fresh.modules())
    assert type(fresh.decoder[0]) is nn.Conv2d


def test_adapter_file_contents(tmp_path):
    model = inject(TinyNet(), AdapterConfig(method="cp_lora", rank=3, targets=["decoder.0"]))
    path = save_adapter(model, tmp_path / "sub" / "a.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = sorted(handle.keys())
        metadata = handle.metadata()
    assert keys == ["decoder.0.cp_in", "decoder.0.cp_out", "decoder.0.cp_spatial.0", "decoder.0.cp_spatial.1"]
    config = json.loads(metadata["config"])
    assert config["method"] == "cp_lora" and config["rank"] == 3 and config["targets"] == ["decoder.0"]
    fingerprint = dict((name, shape) for name, shape in json.loads(metadata["base_fingerprint"]))
    assert fingerprint["decoder.0.weight"] == [8, 8, 3, 3] and "encoder.1.running_mean" in fingerprint
    assert not list(tmp_path.glob("sub/*.tmp")), "no temporary file left behind"


def test_adapter_file_for_another_base_or_method_is_refused(tmp_path):
    path = save_adapter(inject(TinyNet(width=8), AdapterConfig(targets=["decoder.0"])), tmp_path / "a.safetensors")
    other = TinyNet(width=6)
    reference = copy.deepcopy(other)
    with pytest.raises(ValueError, match=r"made for another base model: module 'encoder.0': 'encoder.0.weight' has shape \[6, 3, 3, 3\] in this model but \[8, 3, 3, 3\]"):
        load_adapter(other, path)
    assert unchanged(other, reference)
    renamed = TinyNet()
    renamed.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="module 'extra' .* exists in this model but not in the file's base"):
        load_adapter(renamed, path)
    with_cp = inject(TinyNet(), AdapterConfig(method="cp_lora", targets=["decoder.0"]))
    with pytest.raises(ValueError, match="method: file 'lora' vs model 'cp_lora'"):
        load_adapter(with_cp, path)
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        load_adapter(TinyNet(), tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_adapter(TinyNet(), tmp_path / "junk.safetensors")


def test_tlora_regularizer_in_loss():
    model = inject(TinyNet(), AdapterConfig(method="tlora", rank=2, targets=["decoder.0"]))
    assert regularization_loss(model).item() == pytest.approx(0.0, abs=1e-9)
    randomize(model)
    loss = regularization_loss(model)
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert model.decoder[0].adapters["default"].transform_cores[0].grad is not None
    assert regularization_loss(inject(TinyNet(), AdapterConfig(targets=["decoder.0"]))).item() == 0.0


# ---- real networks ----------------------------------------------------------------------------------
def check_network(model: nn.Module, x: torch.Tensor, config: AdapterConfig, expected_layers: int) -> None:
    model.eval()  # dropout/batch statistics off: outputs must be comparable
    inject(model, config)
    assert len(summary_rows(model)) == expected_layers
    randomize(model)
    y = model(x)
    y.float().pow(2).mean().backward()
    adapters = [layer.adapters["default"] for layer in model.modules() if isinstance(layer, AdaptedLayer)]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for a in adapters for p in a.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)
    with torch.no_grad():
        adapted = model(x)
        merge(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)
        unmerge(model)
        plain = merge_and_unload(model)
        assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
        torch.testing.assert_close(plain(x), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_monai_unet3d_all_convs(method):
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    n_convs = sum(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in net.modules())
    check_network(net, torch.randn(1, 1, 12, 12, 12), AdapterConfig(method=method, rank=2, lora_rank=2, targets=r".*\.conv|.*residual"), n_convs)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_timm_vit_attention_and_mlp(method):
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=3)
    targets = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    check_network(net, torch.randn(2, 3, 32, 32), AdapterConfig(method=method, rank=4, targets=targets, ring_rank=2), 8)


def trainable_adapters(model: nn.Module) -> set[str]:
    return {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_inactive_injection_leaves_the_active_adapter_trainable():
    model = inject(TinyNet(), AdapterConfig(targets=["decoder.0"]), name="a")
    inject(model, AdapterConfig(method="cp_lora", targets=["decoder.0", "encoder.0"]), name="b", active=False)
    assert active_adapter(model) == "a" and trainable_adapters(model) == {"a"}
    assert model.encoder[0].active_adapter == "a"  # a new adapted layer follows the model's active adapter
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    set_active_adapter(model, "b")
    assert trainable_adapters(model) == {"b"}
    only_inactive = inject(TinyNet(), AdapterConfig(targets=["decoder.0"]), name="c", active=False)
    assert active_adapter(only_inactive) is None and trainable_adapters(only_inactive) == set()


def drop_tensor(path, key):
    """Rewrite an adapter file without one of its tensors (metadata kept)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != key}
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("active", [True, False])
def test_failed_load_restores_the_active_adapter(tmp_path, active):
    base = TinyNet()
    source = inject(copy.deepcopy(base), AdapterConfig(method="cp_lora", targets=["decoder.0"]), name="b")
    path = save_adapter(source, tmp_path / "b.safetensors")
    drop_tensor(path, "decoder.0.cp_in")
    model = inject(base, AdapterConfig(targets=["decoder.0"]), name="a")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"does not fit: missing \['decoder.0.cp_in'\]"):
        load_adapter(model, path, active=active)
    assert adapter_names(model) == ["a"] and active_adapter(model) == "a" and trainable_adapters(model) == {"a"}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_loading_into_a_merged_adapter_is_refused(tmp_path):
    torch.manual_seed(0)
    trained = inject(TinyNet(), AdapterConfig(targets=["decoder.0", "decoder.2"]))
    randomize(trained)
    path = save_adapter(trained, tmp_path / "a.safetensors")
    model = inject(TinyNet(), AdapterConfig(targets=["decoder.0", "decoder.2"]))
    randomize(model)
    w0 = model.decoder[0].base_layer.weight.detach().clone()
    merge(model)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="adapter 'default' is merged into 'decoder.0'; unmerge"):
        load_adapter(model, path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    unmerge(model)
    torch.testing.assert_close(model.decoder[0].base_layer.weight, w0, rtol=0, atol=1e-6)


def test_active_injection_into_a_merged_model_is_refused_and_leaves_it_unchanged():
    model = inject(TinyNet(), AdapterConfig(targets=["decoder.0"]), name="a")
    merge(model)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="module 'decoder.0' has adapter 'a' merged; unmerge"):
        inject(model, AdapterConfig(targets=["decoder.0", "decoder.2"]), name="b")
    assert adapter_names(model) == ["a"] and not isinstance(model.decoder[2], AdaptedLayer)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    inject(model, AdapterConfig(targets=["decoder.0", "decoder.2"]), name="b", active=False)  # allowed
    assert active_adapter(model) == "a"


class _TwoNames(torch.nn.Module):
    """A conv registered under two names, the forward running the second (dynamic-network-architectures does
    this: ``conv`` and ``all_modules.0``); ``conv`` is the name ``named_modules`` lists."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.all_modules = torch.nn.Sequential(self.conv, torch.nn.ReLU())

    def forward(self, x):
        return self.all_modules(x)


def test_a_module_held_under_two_names_is_adapted_on_every_path():
    torch.manual_seed(0)
    model, x = _TwoNames(), torch.randn(1, 2, 6, 6)
    before = model(x)
    inject(model, AdapterConfig(method="lora_c", rank=2, targets=["conv"]))
    assert model.all_modules[0] is model.conv  # the forward's path holds the adapted layer too
    with torch.no_grad():
        for p in model.conv.adapters.parameters():
            p.normal_()
    adapted = model(x)
    assert not torch.allclose(adapted, before)
    merged = merge_and_unload(model)
    assert type(merged.all_modules[0]) is torch.nn.Conv2d and merged.all_modules[0] is merged.conv
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)

    again = _TwoNames()
    inject(again, AdapterConfig(method="lora", rank=2, targets=["conv"]))
    remove_adapter(again, "default")
    assert type(again.all_modules[0]) is torch.nn.Conv2d and again.all_modules[0] is again.conv
