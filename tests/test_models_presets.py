"""Adapter target presets: what each selects, and gradients reaching the adapters of every preset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segadapt.adapters import METHODS, AdapterConfig, AdaptedLayer, inject
from segadapt.models import MultiViewUNet, adaptable_modules, build_model, preset_targets, target_presets

TINY_UNET2D = dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2)
TINY_SAM = dict(depth=2, embed_dim=32, num_heads=2, global_attn_indexes=[1], window_size=2, neck_chans=16)


def multiview(shared):
    return build_model("multiview_unet", in_channels=1, out_channels=1, shared_weights=shared, **TINY_UNET2D)


# name -> (builder, input maker, forward returning a loss-ready tensor)
MODELS = {
    "multiview_shared": (lambda: multiview(True), lambda: torch.randn(3, 1, 16, 16)),
    "multiview_per_view": (lambda: multiview(False), lambda: torch.randn(3, 1, 16, 16)),
    "unet3d": (
        lambda: build_model("unet3d", channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
        lambda: torch.randn(1, 1, 16, 16, 16),
    ),
    "dynunet": (
        lambda: build_model(
            "dynunet", kernel_size=(3, 3, 3), strides=(1, 2, 2), filters=(4, 8, 16), deep_supervision=True
        ),
        lambda: torch.randn(1, 1, 16, 16, 16),
    ),
    "vit": (
        lambda: build_model(
            "vit_seg", encoder="vit_tiny_patch16_224", in_channels=1, img_size=32, encoder_kwargs=TINY_VIT
        ),
        lambda: torch.randn(2, 1, 32, 32),
    ),
    "samvit": (
        lambda: build_model(
            "vit_seg", encoder="samvit_base_patch16", in_channels=3, img_size=32, encoder_kwargs=TINY_SAM
        ),
        lambda: torch.randn(2, 3, 32, 32),
    ),
}
UNET_PRESETS = ["encoder", "bottleneck", "decoder", "all_conv"]
VIT_PRESETS = ["attention", "qkv", "mlp", "all_linear", "decoder", "all"]
PRESETS = {name: VIT_PRESETS if "vit" in name else UNET_PRESETS for name in MODELS}


def run(name, model, x):
    if isinstance(model, MultiViewUNet):  # one slice per view so every per-view UNet is used
        return model(x, view=["axial", "coronal", "sagittal"])
    return model(x)  # DynUNet in train mode also runs its deep-supervision heads


CASES = [(m, p, "conv_lora") for m in MODELS for p in PRESETS[m]]
CASES += [(m, p, "lora") for m in ("vit", "samvit") for p in ("attention", "qkv", "mlp", "all_linear")]


@pytest.mark.parametrize(("model_name", "preset", "method"), CASES)
def test_gradients_reach_adapters_in_every_preset(model_name, preset, method):
    build, make_input = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    targets = preset_targets(model, preset)
    base_params = {id(p) for p in model.parameters()}
    inject(model, AdapterConfig(method=method, rank=2, alpha=2, targets=targets))

    adapted = {name for name, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    assert adapted == set(targets)
    adapter_params = {id(p) for name in adapted for p in model.get_submodule(name).adapters.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == adapter_params
    assert not any(id(p) in base_params for p in trainable)

    model.train()
    run(model_name, model, make_input()).square().mean().backward()
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            assert p.grad is None  # frozen base weights get nothing
    for name in adapted:  # the zero-initialised factor of every adapted layer gets a nonzero gradient
        grads = [p.grad for p in model.get_submodule(name).adapters.parameters()]
        assert any(g.abs().sum() > 0 for g in grads), name


def _types(model, names):
    return {type(model.get_submodule(n)).__name__ for n in names}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_presets_are_adaptable_layers_and_names_are_unambiguous(model_name):
    model = MODELS[model_name][0]()
    presets = target_presets(model)
    assert list(presets) == PRESETS[model_name]
    everything = adaptable_modules(model)
    all_modules = [n for n, _ in model.named_modules()]
    for preset, names in presets.items():
        assert names, preset
        assert set(names) <= set(everything)
        # a full name used as a suffix must select only itself
        for name in names:
            assert [m for m in all_modules if m == name or m.endswith("." + name)] == [name]
    if model_name in ("vit", "samvit"):
        assert presets["all"] == everything
        assert set(presets["attention"]) | set(presets["mlp"]) <= set(presets["all_linear"])
        assert set(presets["qkv"]) < set(presets["attention"])
        assert all(n.endswith("attn.qkv") for n in presets["qkv"])
        assert all(n.split(".")[-1] in ("qkv", "proj") for n in presets["attention"])
        assert all(n.split(".")[-1] in ("fc1", "fc2") for n in presets["mlp"])
        assert _types(model, presets["all_linear"]) == {"Linear"}
        depth = TINY_VIT["depth"]
        assert (len(presets["attention"]), len(presets["qkv"]), len(presets["mlp"])) == (2 * depth, depth, 2 * depth)
    else:
        parts = [presets["encoder"], presets["bottleneck"], presets["decoder"]]
        assert sorted(sum(parts, [])) == sorted(presets["all_conv"]) == sorted(everything)  # a partition
        assert "ConvTranspose" not in "".join(_types(model, presets["encoder"]))
        assert any("ConvTranspose" in t for t in _types(model, presets["decoder"]))


def test_unet_parts_follow_resolution():
    """Encoder convs see the input or downsample, the bottleneck sits at the lowest level, the decoder upsamples."""
    model = build_model("unet3d", channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1)
    presets = target_presets(model)
    widest = max(m.out_channels for m in model.modules() if isinstance(m, nn.Conv3d))
    assert {model.get_submodule(n).out_channels for n in presets["bottleneck"]} == {widest}
    assert model.get_submodule(presets["encoder"][0]).in_channels == 1
    assert model.get_submodule(presets["decoder"][-1]).out_channels == 1
    dyn = build_model("dynunet", kernel_size=(3, 3, 3), strides=(1, 2, 2), filters=(4, 8, 16), deep_supervision=True)
    dyn_presets = target_presets(dyn)
    assert all(n.startswith("bottleneck.") for n in dyn_presets["bottleneck"])
    assert "deep_supervision_heads.0.conv.conv" in dyn_presets["decoder"]
    per_view = target_presets(multiview(False))
    assert {n.split(".")[1] for n in per_view["encoder"]} == {"axial", "coronal", "sagittal"}


def test_preset_errors_list_the_valid_presets():
    model = MODELS["unet3d"][0]()
    valid = "valid presets: encoder, bottleneck, decoder, all_conv"
    with pytest.raises(ValueError, match=f"unknown preset 'attention'.*{valid}"):
        preset_targets(model, "attention")
    with pytest.raises(TypeError, match="no adapter presets for Sequential"):
        target_presets(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    ("model_name", "preset"), [("unet3d", "all_conv"), ("multiview_per_view", "all_conv"), ("vit", "all")]
)
def test_every_method_fits_the_widest_presets(model_name, preset, method):
    """Rank 1, since SALT cannot exceed the single singular value of a 1-channel output layer."""
    build, make_input = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    inject(model, AdapterConfig(method=method, rank=1, targets=preset_targets(model, preset)))
    model.train()
    run(model_name, model, make_input()).square().mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
