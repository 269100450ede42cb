"""Export: merged plain models for every method; PEFT on-disk format both ways, checked against PEFT itself."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from segadapt.adapters import METHODS, AdapterConfig, adapted_layers, inject
from segadapt.adapters.peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, import_peft
from segadapt.export.merged import PEFT_BASE_FILE, export_merged, export_peft, load_merged
from segadapt.models import MultiViewUNet

peft = pytest.importorskip("peft")


class Mixed(nn.Module):
    """Conv2d, Conv3d and Linear on one input, so one adapter covers every layer type PEFT's LoRA has."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv3 = nn.Conv3d(1, 4, (3, 1, 3), padding=(1, 0, 1))
        self.head = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        a = self.conv2(x).mean(dim=(2, 3))
        b = self.conv3(x[:, None]).mean(dim=(2, 3, 4))
        return self.head(torch.cat([a, b], dim=1))


def randomized(model: nn.Module, name: str = "default", scale: float = 0.3) -> nn.Module:
    """Give every parameter of adapter `name` random non-zero values (a trained-looking adapter)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for p in layer.adapters[name].parameters():
                p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merged_export_loads_into_the_bare_model_and_reproduces_the_adapter(method, tmp_path):
    torch.manual_seed(0)
    base, x = Mixed(), torch.randn(2, 3, 6, 6)
    adapted = randomized(inject(copy.deepcopy(base), AdapterConfig(method=method, rank=2, targets=["conv2", "conv3", "head"])))
    with torch.no_grad():
        expected = adapted(x)
    path = export_merged(adapted, tmp_path / "merged.safetensors")
    plain = Mixed()
    plain.load_state_dict(load_file(path))  # strict, plain torch
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(adapted(x), expected, atol=0, rtol=0)  # the adapted model is left as it was
        assert (plain(x) - base(x)).abs().max() > 1e-3


def test_load_merged_rebuilds_the_architecture_from_the_metadata(tmp_path):
    kwargs = {"in_channels": 2, "out_channels": 1, "channels": [4, 8], "strides": [2], "num_res_units": 0}
    net = randomized(inject(MultiViewUNet(**kwargs), AdapterConfig(method="cp_lora", rank=2, targets=r".*conv")))
    path = export_merged(net, tmp_path / "m.safetensors", architecture={"model": "multiview_unet", "model_kwargs": kwargs})
    volume = torch.randn(1, 2, 8, 12, 6)
    with torch.no_grad():
        torch.testing.assert_close(load_merged(path).predict_volume(volume), net.eval().predict_volume(volume), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="architecture"):
        load_merged(export_merged(net, tmp_path / "bare.safetensors"))


@pytest.mark.parametrize("alpha", [None, 6.0])
@pytest.mark.parametrize("method", ["lora", "conv_lora", "conv_dora"])
def test_peft_export_loads_in_peft_and_imports_back(method, alpha, tmp_path):
    torch.manual_seed(0)
    base, x = Mixed(), torch.randn(2, 3, 6, 6)
    config = AdapterConfig(method=method, rank=3, alpha=alpha, targets=["conv2", "conv3", "head"], rank_pattern={"conv3": 2})
    ours = randomized(inject(copy.deepcopy(base), config))
    folder = export_peft(ours, tmp_path / "peft")
    written = json.loads((folder / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    assert written["peft_type"] == "LORA" and written["use_dora"] == (method == "conv_dora")
    assert all(k.startswith("base_model.model.") for k in load_file(folder / PEFT_WEIGHTS_FILE))

    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    assert len([m for m in reference.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]) == 3
    back = import_peft(copy.deepcopy(base), folder, name="imported")
    with torch.no_grad():
        expected = ours(x)
        assert (expected - base(x)).abs().max() > 1e-2
        torch.testing.assert_close(reference(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(back(x), expected, atol=0, rtol=0)
    imported = {n: layer.adapters["imported"] for n, layer in adapted_layers(back)}
    for name, layer in adapted_layers(ours):
        assert imported[name].rank == layer.adapters["default"].rank
        for (key, ours_p), (_, back_p) in zip(layer.adapters["default"].state_dict().items(), imported[name].state_dict().items()):
            torch.testing.assert_close(back_p, ours_p, atol=0, rtol=0, msg=key)
    # ... and a second export of the imported adapter is the same files.
    assert load_file(export_peft(back, tmp_path / "again") / PEFT_WEIGHTS_FILE).keys() == load_file(folder / PEFT_WEIGHTS_FILE).keys()


@pytest.mark.parametrize("use_dora", [False, True])
def test_an_adapter_trained_in_peft_imports_with_the_same_outputs(use_dora, tmp_path):
    torch.manual_seed(0)
    kwargs = {"in_channels": 3, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 1}
    base, slices = MultiViewUNet(**kwargs), torch.randn(2, 3, 8, 8)
    targets = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]  # PEFT has no ConvTranspose LoRA
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=10, target_modules=targets, use_dora=use_dora))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn_like(p))
    reference.save_pretrained(tmp_path)
    ours = import_peft(copy.deepcopy(base), tmp_path)
    assert next(layer.adapters["default"].config for _, layer in adapted_layers(ours)).method == ("conv_dora" if use_dora else "conv_lora")
    with torch.no_grad():
        torch.testing.assert_close(ours(slices), reference(slices), atol=1e-5, rtol=1e-4)
        assert (ours(slices) - base(slices)).abs().max() > 1e-2


def test_what_peft_cannot_hold_is_refused_with_the_reason(tmp_path):
    for method in ("cp_lora", "lora_c"):
        other = inject(Mixed(), AdapterConfig(method=method, rank=2, targets=["conv2"]))
        with pytest.raises(ValueError, match=rf"^method '{method}' has no PEFT form"):
            export_peft(other, tmp_path / method)
    transposed = inject(nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2)), AdapterConfig(method="conv_lora", rank=2, targets=["0"]))
    with pytest.raises(ValueError, match="no adapted layer .* PEFT's LoRA can hold .*0 is a ConvTranspose2d"):
        export_peft(transposed, tmp_path / "t")
    dilated = inject(nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2)), AdapterConfig(method="lora", rank=2, targets=["0"]))
    with pytest.raises(ValueError, match="dilation"):
        export_peft(dilated, tmp_path / "d")
    assert not any(tmp_path.iterdir())  # nothing written for a refused export
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        import_peft(Mixed(), tmp_path)
    folder = export_peft(randomized(inject(Mixed(), AdapterConfig(method="lora", rank=2, targets=["head"]))), tmp_path / "ok")
    with pytest.raises(ValueError, match="module 'head' does not exist"):
        import_peft(nn.Sequential(nn.Linear(10, 5)), folder)


def test_layers_peft_cannot_hold_go_into_the_exported_base(tmp_path):
    """A ConvTranspose (no PEFT LoRA) and a dilated conv (PEFT's conv LoRA assumes dilation 1) are merged into
    base_model.safetensors, named in one warning; the Conv2d stays a PEFT layer; together they compute the adapter."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 2, stride=2), nn.Conv2d(4, 2, 3, dilation=2))
    ours = randomized(inject(copy.deepcopy(base), AdapterConfig(method="conv_dora", rank=2, targets=["0", "1", "2"])))
    with pytest.warns(UserWarning, match=r"2 adapted layer\(s\) PEFT cannot hold are merged .*: 1, 2$"):
        folder = export_peft(ours, tmp_path / "peft")
    written = json.loads((folder / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    assert written["target_modules"] == "(0)" and written["base_model_name_or_path"] == str((folder / PEFT_BASE_FILE).resolve())
    exported = copy.deepcopy(base)
    exported.load_state_dict(load_file(folder / PEFT_BASE_FILE))
    torch.testing.assert_close(exported[0].weight, base[0].weight, atol=0, rtol=0)  # the PEFT layer's base is W0
    assert (exported[1].weight - base[1].weight).abs().max() > 1e-3  # the others carry their adapter
    reference = peft.PeftModel.from_pretrained(exported, folder)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), ours(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["conv_lora", "conv_dora"])
def test_a_pissa_adapter_exports_with_its_residual_as_the_base(method, tmp_path):
    """segadapt's PiSSA keeps W0 and adds s (B A - B0 A0); PEFT's LoRA adds s B A to its base, which must then
    be the residual W0 - s B0 A0: on the original base PEFT would be off by s B0 A0."""
    torch.manual_seed(0)
    base, x = Mixed(), torch.randn(2, 3, 6, 6)
    config = AdapterConfig(method=method, rank=2, init="pissa", targets=["conv2", "conv3", "head"])
    ours = randomized(inject(copy.deepcopy(base), config))
    folder = export_peft(ours, tmp_path / "peft")
    exported = Mixed()
    exported.load_state_dict(load_file(folder / PEFT_BASE_FILE))
    for name, layer in adapted_layers(ours):
        lora = layer.adapters["default"].direction if method == "conv_dora" else layer.adapters["default"]
        residual = layer.base_layer.weight - lora.scaling * (lora.initial_B @ lora.initial_A).reshape(layer.base_layer.weight.shape)
        torch.testing.assert_close(exported.get_submodule(name).weight, residual, atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = ours(x)
        assert (expected - base(x)).abs().max() > 1e-2
        torch.testing.assert_close(peft.PeftModel.from_pretrained(exported, folder)(x), expected, atol=1e-5, rtol=1e-4)
