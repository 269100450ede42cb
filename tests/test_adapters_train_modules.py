"""Modules trained in full beside the adapters (``AdapterConfig.train_modules``, PEFT's ``modules_to_save``):
trainable, saved, restored, fingerprinted, merged; model defaults; a new head for another class count."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from segadapt.adapters import (AdapterConfig, inject, load_adapter, merge_and_unload, remove_adapter, save_adapter,
                               set_active_adapter, summary, summary_rows)
from segadapt.adapters.trained import TrainedModule
from segadapt.models import build_model
from segadapt.models.presets import head_modules
from segadapt.training import SegAdaptModule

TINY_VIT = dict(encoder="vit_tiny_patch16_224", img_size=32, encoder_kwargs=dict(depth=1, embed_dim=32, num_heads=2),
                decoder_channels=[16, 16, 16, 16])


class Net(nn.Module):
    """conv -> BatchNorm -> ReLU -> 1x1 head: an adapted conv, a trained BatchNorm (buffers) and head."""

    def __init__(self, classes: int = 2, head_name: str = "head") -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        setattr(self, head_name, nn.Conv2d(4, classes, 1))
        self.head_name = head_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_name)(torch.relu(self.norm(self.conv(x))))


def base(seed: int = 0, **kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


CONFIG = AdapterConfig(method="lora_c", rank=2, targets=["conv"], train_modules=["norm", "head"])
X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def train(model: nn.Module, steps: int = 3) -> None:
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        (model(X) - 1).pow(2).mean().backward()
        optimiser.step()
    model.eval()


@pytest.fixture()
def trained(tmp_path):
    model = inject(base(), CONFIG)
    train(model)
    return model, save_adapter(model, tmp_path / "a.safetensors")


def test_only_adapters_and_train_module_copies_get_gradients_and_the_base_stays():
    model = inject(base(), CONFIG)
    original = {k: v.clone() for k, v in base().state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"conv.adapters.default.lora_A", "conv.adapters.default.lora_B",
                         "norm.modules_to_save.default.weight", "norm.modules_to_save.default.bias",
                         "head.modules_to_save.default.weight", "head.modules_to_save.default.bias"}
    model.train()
    (model(X) - 1).pow(2).mean().backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())
    train(model)
    # the base's modules are untouched: BatchNorm statistics move in the copy only
    assert torch.equal(model.norm.original_module.running_mean, original["norm.running_mean"])
    assert not torch.equal(model.norm.modules_to_save["default"].running_mean, original["norm.running_mean"])
    assert torch.equal(model.head.original_module.weight, original["head.weight"])
    assert torch.equal(model.conv.base_layer.weight, original["conv.weight"])
    assert model.head.weight is model.head.modules_to_save["default"].weight  # attributes of the running copy


def test_same_layout_and_trainable_tensors_as_peft_modules_to_save():
    ours = inject(base(), CONFIG)
    peft_model = get_peft_model(base(), LoraConfig(r=2, target_modules=["conv"], modules_to_save=["norm", "head"]))
    peft_trainable = {n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters()
                      if p.requires_grad and "lora_" not in n}
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad and ".adapters." not in n}
    assert ours_trainable == peft_trainable
    peft_buffers = {n.removeprefix("base_model.model.") for n, _ in peft_model.named_buffers()}
    assert {n for n, _ in ours.named_buffers()} == peft_buffers  # original_module + modules_to_save.default
    with torch.no_grad():
        peft_model.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
        ours.head.modules_to_save["default"].weight.add_(1.0)
    peft_model.eval(), ours.eval()
    torch.testing.assert_close(ours(X), peft_model(X))


def test_saved_with_buffers_and_restored_onto_a_fresh_base(trained, tmp_path):
    model, path = trained
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        trained_head = handle.get_tensor("head.weight")
    assert json.loads(metadata["train_modules"]) == ["norm", "head"]
    assert {"norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
            "head.weight", "head.bias"} <= keys
    assert torch.equal(trained_head, model.head.modules_to_save["default"].weight)
    assert not torch.equal(trained_head, base().head.weight)

    fresh = load_adapter(base(), path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh(X), model(X))
    set_active_adapter(fresh, None)  # no active adapter: the base's modules again
    assert torch.equal(fresh(X), base().eval()(X))


def test_the_fingerprint_refuses_a_base_without_the_module_or_with_another_shape(trained):
    _, path = trained
    with pytest.raises(ValueError, match=r"module 'head' \('head.weight', shape \[2, 4, 1, 1\]\) does not exist"):
        load_adapter(base(head_name="classifier"), path)
    with pytest.raises(ValueError, match=r"module 'head': 'head.weight' has shape \[3, 4, 1, 1\] in this model but \[2, 4, 1, 1\]"):
        load_adapter(base(classes=3), path)
    # another base's weights outside the trained modules are refused as before
    other = base()
    with torch.no_grad():
        other.conv.weight.add_(0.1)
    with pytest.raises(ValueError, match="same modules and shapes but other weights"):
        load_adapter(other, path)
    # ... but the trained modules' own base weights are not part of the digest (a new head is random)
    new_head = base()
    with torch.no_grad():
        new_head.head.weight.normal_()
    assert torch.equal(load_adapter(new_head, path).eval()(X), load_adapter(base(), path).eval()(X))


def test_merge_and_unload_keeps_the_trained_values(trained):
    model, _ = trained
    expected = model(X)
    copy_weight = model.head.modules_to_save["default"].weight.detach().clone()
    plain = merge_and_unload(model)
    assert not any(isinstance(m, TrainedModule) for m in plain.modules())
    assert set(plain.state_dict()) == set(base().state_dict())
    assert torch.equal(plain.head.weight, copy_weight)
    torch.testing.assert_close(plain(X), expected)
    bare = base()
    bare.load_state_dict(plain.state_dict())
    torch.testing.assert_close(bare.eval()(X), expected)


def test_two_adapters_train_their_own_copies_and_remove_restores_the_base(tmp_path):
    model = inject(base(), CONFIG, name="a")
    train(model)
    out_a = model(X)
    inject(model, CONFIG, name="b")
    assert torch.equal(model.head.modules_to_save["b"].weight, base().head.weight)  # b starts from the base
    train(model, steps=2)
    out_b = model(X)
    set_active_adapter(model, "a")
    assert torch.equal(model(X), out_a)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n} == {
        f"{m}.modules_to_save.a.{t}" for m in ("norm", "head") for t in ("weight", "bias")}
    set_active_adapter(model, "b")
    assert torch.equal(model(X), out_b)
    remove_adapter(model, "a")
    remove_adapter(model, "b")
    assert type(model.head) is nn.Conv2d and torch.equal(model.eval()(X), base().eval()(X))


def test_summary_lists_the_trained_modules_and_bad_configs_are_refused():
    model = inject(base(), CONFIG)
    rows = {row["module"]: row for row in summary_rows(model)}
    assert rows["head"]["method"] == "trained" and rows["head"]["params"] == 4 * 2 + 2
    assert "| head | Conv2d | trained | full | 10 |" in summary(model)
    with pytest.raises(ValueError, match=r"module 'conv' would be both adapted \(targets\) and trained in full"):
        inject(base(), AdapterConfig(method="lora_c", rank=2, targets=["conv"], train_modules=["conv"]))
    with pytest.raises(ValueError, match=r"train_modules \['decoder'\] match no module"):
        inject(base(), AdapterConfig(method="lora_c", rank=2, targets=["conv"], train_modules=["decoder"]))
    untouched = base()
    with pytest.raises(ValueError):
        inject(untouched, AdapterConfig(method="lora_c", rank=2, targets=["conv"], train_modules=["conv"]))
    assert type(untouched.conv) is nn.Conv2d and type(untouched.head) is nn.Conv2d


# ---- in the Lightning module: model defaults and a new head ------------------------------------------
@pytest.fixture(scope="module")
def vit_base(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("vit_seg", in_channels=1, out_channels=2, **TINY_VIT)
    path = tmp_path_factory.mktemp("vit") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net


def vit_module(path, out_channels: int = 2, **spec) -> SegAdaptModule:
    return SegAdaptModule(model="vit_seg", model_kwargs=dict(in_channels=1, out_channels=out_channels, **TINY_VIT),
                          base_checkpoint=str(path), adapter={"method": "lora", "rank": 2, **spec}, preset="qkv",
                          roi_size=[32, 32])


class _FakeTrainer:
    estimated_stepping_batches = 10


def test_vit_seg_trains_its_decoder_and_head_by_default_and_the_optimiser_gets_them(vit_base):
    path, _ = vit_base
    module = vit_module(path)
    assert isinstance(module.net.decoder, TrainedModule) and isinstance(module.net.mask_head, TrainedModule)
    module.trainer = _FakeTrainer()
    optimised = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    copies = {id(p) for n, p in module.net.named_parameters() if ".modules_to_save.default." in n}
    assert copies and copies <= optimised
    assert optimised == {id(p) for p in module.net.parameters() if p.requires_grad}
    for disabled in ([], None):
        off = vit_module(path, train_modules=disabled)
        assert type(off.net.mask_head) is nn.Conv2d and not off.net.mask_head.weight.requires_grad


def test_a_target_with_another_class_count_gets_a_new_trained_and_saved_head(vit_base, tmp_path, capsys):
    path, base_net = vit_base
    torch.manual_seed(5)
    module = vit_module(path, out_channels=3)
    assert "new head: mask_head built afresh" in capsys.readouterr().out
    assert module.new_heads == ["mask_head"]
    head = module.net.mask_head
    assert isinstance(head, TrainedModule) and head.modules_to_save["default"].weight.shape == (3, 16, 1, 1)
    assert head.modules_to_save["default"].weight.requires_grad
    base_state = base_net.state_dict()
    for key, value in module.net.state_dict().items():  # everything but the head is the base's
        name = key.replace(".original_module", "").replace(".base_layer", "")
        if not (name.startswith("mask_head") or ".adapters." in key or ".modules_to_save." in key):
            assert torch.equal(value, base_state[name]), key
    images = torch.randn(2, 1, 32, 32)
    labels = torch.randint(0, 3, (2, 1, 32, 32))
    optimiser = torch.optim.AdamW([p for p in module.net.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    for _ in range(2):
        optimiser.zero_grad()
        module._loss(module(images), labels).backward()
        optimiser.step()
    module.eval()
    file = save_adapter(module.net, tmp_path / "adapter.safetensors")
    torch.manual_seed(9)  # another random head on the rebuilt base: the file's head replaces it
    fresh = vit_module(path, out_channels=3)
    load_adapter(fresh.net, file)
    fresh.eval()
    assert torch.equal(fresh(images), module(images)) and fresh(images).shape == (2, 3, 32, 32)

    # a base that differs outside the head is still refused
    other = build_model("vit_seg", in_channels=1, out_channels=2, **{**TINY_VIT, "decoder_channels": [8, 8, 8, 8]})
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)shape mismatch .*decoder\.0\.0\.weight"):
        vit_module(tmp_path / "other.safetensors", out_channels=3)
    with pytest.raises(ValueError, match="mask_head would be untrained"):
        SegAdaptModule(model="vit_seg", model_kwargs=dict(in_channels=1, out_channels=3, **TINY_VIT),
                       base_checkpoint=str(path), adapter="none", roi_size=[32, 32])


def test_exports_keep_the_trained_modules(tmp_path):
    """PEFT folder (modules_to_save) read by PEFT itself, and the fold-ensemble's temporary fold."""
    from peft import PeftModel

    from safetensors.torch import load_file

    from segadapt.export.merged import export_merged, export_peft
    from segadapt.adapters.fold import folded

    model = inject(base(), AdapterConfig(method="conv_lora", rank=2, targets=["conv"], train_modules=["norm", "head"]),
                   name="a")
    train(model)
    inject(model, AdapterConfig(method="conv_lora", rank=2, targets=["conv"]), name="b", active=False)
    expected = model(X)
    export_peft(model, tmp_path / "peft", adapter="a")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["norm", "head"]
    peft_model = PeftModel.from_pretrained(base(), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(X), expected)
    merged = load_file(export_merged(model, tmp_path / "merged.safetensors", adapter="a"))
    bare = base()
    bare.load_state_dict(merged)  # the plain architecture, with adapter a's trained head and BatchNorm
    torch.testing.assert_close(bare.eval()(X), expected)
    set_active_adapter(model, "b")
    with folded(model, "a") as net:
        torch.testing.assert_close(net(X), expected)
    assert model.head.active_adapter is None  # back to adapter b, which trains no head


def test_a_shared_module_is_refused_and_dynunet_gets_a_new_output_block(tmp_path):
    """DynUNet holds its blocks twice (``upsamples.0`` is also ``skip_layers.next_layer.upsample``): a module held
    in two slots is wrapped in both, so both paths run the trained copy; a container whose children are also held
    elsewhere (``deep_supervision_heads``, a ModuleList of the ``super_head`` blocks) would leave the other path
    running the base, so it is refused. The deep-supervision heads train (``head_modules``, the auto search's
    ``+head`` placement) and their trained copies are what the deep-supervision outputs run."""
    kwargs = dict(in_channels=1, kernel_size=[3, 3, 3], strides=[1, 2, 2], filters=[4, 8, 16])
    torch.manual_seed(0)
    net = build_model("dynunet", out_channels=2, **kwargs)
    inject(net, AdapterConfig(method="conv_lora", rank=2, targets=["output_block.conv.conv"], train_modules=["upsamples.0"]))
    assert isinstance(net.upsamples[0], TrainedModule) and net.upsamples[0] is net.skip_layers.next_layer.upsample
    net = build_model("dynunet", out_channels=2, **kwargs)
    deep = build_model("dynunet", out_channels=2, deep_supervision=True, deep_supr_num=1, **kwargs)
    with pytest.raises(ValueError, match=r"'deep_supervision_heads' \(or a module inside it\) is also held as 'skip_layers"):
        inject(deep, AdapterConfig(method="conv_lora", rank=2, targets=["output_block.conv.conv"],
                                   train_modules=["deep_supervision_heads"]))
    heads = head_modules(deep)
    assert heads == ["output_block", "deep_supervision_heads.0", "skip_layers.next_layer.super_head"]
    inject(deep, AdapterConfig(method="conv_lora", rank=2, targets=["upsamples.0.conv_block.conv1.conv"],
                               train_modules=heads))
    head = deep.deep_supervision_heads[0]
    assert isinstance(head, TrainedModule) and head is deep.skip_layers.next_layer.super_head
    deep.train()
    x = torch.randn(1, 1, 16, 16, 16)
    before = deep(x)[:, 1].detach()  # the deep-supervision output (training mode stacks them after the main one)
    with torch.no_grad():
        for param in head.modules_to_save.parameters():
            param.add_(1.0)
    after = deep(x)[:, 1].detach()
    assert not torch.allclose(before, after)  # the trained copy runs on the deep-supervision path
    torch.save(net.state_dict(), tmp_path / "dynunet.pt")
    module = SegAdaptModule(model="dynunet", model_kwargs=dict(out_channels=3, **kwargs),
                            base_checkpoint=str(tmp_path / "dynunet.pt"), adapter={"method": "conv_lora", "rank": 2},
                            preset="all_conv", roi_size=[16, 16, 16])
    assert module.new_heads == ["output_block"]
    assert isinstance(module.net.output_block, TrainedModule)  # excluded from the all_conv targets, trained
    assert module.net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_dynunet_with_deep_supervision_gets_new_heads_for_another_class_count(tmp_path):
    """A deep-supervised DynUNet base (2 classes) adapted to 3 classes: the output block and the deep-supervision
    head get new tensors and train in full (one wrapper in both of the head's slots); the rest loads strictly."""
    kwargs = dict(in_channels=1, kernel_size=[3, 3, 3], strides=[1, 2, 2], filters=[4, 8, 16],
                  deep_supervision=True, deep_supr_num=1)
    torch.manual_seed(0)
    base = build_model("dynunet", out_channels=2, **kwargs)
    torch.save(base.state_dict(), tmp_path / "dynunet.pt")
    module = SegAdaptModule(model="dynunet", model_kwargs=dict(out_channels=3, **kwargs),
                            base_checkpoint=str(tmp_path / "dynunet.pt"), adapter={"method": "conv_lora", "rank": 2},
                            preset="all_conv", roi_size=[16, 16, 16])
    assert module.new_heads == ["output_block", "deep_supervision_heads.0", "skip_layers.next_layer.super_head"]
    net = module.net
    assert isinstance(net.deep_supervision_heads[0], TrainedModule)
    assert net.deep_supervision_heads[0] is net.skip_layers.next_layer.super_head
    torch.testing.assert_close(net.input_block.conv1.conv.base_layer.weight, base.input_block.conv1.conv.weight)
    net.train()
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 3, 16, 16, 16)  # main + 1 deep-supervision output
