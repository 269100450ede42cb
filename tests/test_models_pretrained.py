"""Pretrained loading: round trips per file kind, unsafe pickles refused, foreign weights reported."""

from __future__ import annotations

import lightning as L
import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from segadapt.models import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    build_model,
    load_pretrained,
    read_state_dict,
)

TINY_UNET = dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
TINY_VIT = dict(depth=1, embed_dim=32, num_heads=2)


def tiny_unet3d(seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("unet3d", **{**TINY_UNET, **kwargs})


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


class Wrapper(L.LightningModule):
    """A minimal LightningModule holding the network as ``self.model`` (keys get the ``model.`` prefix)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.save_hyperparameters({"channels": [4, 8, 16], "note": "plain hparams"})

    def training_step(self, batch, _):
        return self.model(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def save_safetensors(model, path):
    safetensors.torch.save_file(model.state_dict(), path)


def save_plain(model, path):
    torch.save(model.state_dict(), path)


def save_ddp_style(model, path):  # keys as saved from a DistributedDataParallel wrapper
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)


@pytest.mark.parametrize(
    ("saver", "suffix", "prefix"),
    [(save_safetensors, ".safetensors", ""), (save_plain, ".pt", ""), (save_ddp_style, ".pth", "module.")],
)
def test_round_trip_per_file_kind(tmp_path, saver, suffix, prefix):
    source, target = tiny_unet3d(0), tiny_unet3d(1)
    path = tmp_path / f"weights{suffix}"
    saver(source, path)
    report = load_pretrained(target, path)
    assert report.ok and report.prefix == prefix
    assert report.loaded == list(target.state_dict())
    assert_same_weights(source, target)
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(source.eval()(x), target.eval()(x))


def test_round_trip_real_lightning_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = Wrapper(build_model("multiview_unet", **TINY_UNET))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 1, 16, 16)), batch_size=2)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    raw = torch.load(tmp_path / "fit.ckpt", weights_only=True)
    assert "pytorch-lightning_version" in raw and all(k.startswith("model.") for k in raw["state_dict"])

    torch.manual_seed(1)
    fresh = build_model("multiview_unet", **TINY_UNET)
    report = load_pretrained(fresh, tmp_path / "fit.ckpt")
    assert report.ok and report.prefix == "model."
    assert_same_weights(module.model, fresh)
    # the same file through the factory
    assert_same_weights(module.model, build_model("multiview_unet", checkpoint=tmp_path / "fit.ckpt", **TINY_UNET))


class CreatesMarker:
    """A pickle payload that creates a file when unpickled -- stands for any code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious(path, marker):
    torch.save({"model.0.conv.unit0.conv.weight": torch.zeros(1), "payload": CreatesMarker(marker)}, path)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    # control: an ordinary (unsafe) load really runs the payload
    write_malicious(tmp_path / "control.pt", tmp_path / "control_ran")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "control_ran").exists()

    write_malicious(tmp_path / "evil.pt", tmp_path / "pwned")
    net = tiny_unet3d(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil\.pt.*weights_only=True") as info:
        load_pretrained(net, tmp_path / "evil.pt")
    assert "Unsupported global: GLOBAL io.open" in str(info.value)  # the offending global is named
    assert not (tmp_path / "pwned").exists()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

    write_malicious(tmp_path / "evil_timm.pth", tmp_path / "pwned_timm")
    with pytest.raises(UnsafeCheckpointError, match="evil_timm.pth"):
        build_model("vit_seg", encoder="vit_tiny_patch16_224", img_size=32, encoder_kwargs=TINY_VIT,
                    encoder_weights=tmp_path / "evil_timm.pth")
    assert not (tmp_path / "pwned_timm").exists()


def test_foreign_architecture_is_refused_with_key_report(tmp_path):
    vit = build_model("vit_seg", encoder="vit_tiny_patch16_224", img_size=32, encoder_kwargs=TINY_VIT)
    safetensors.torch.save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    net = tiny_unet3d(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError) as info:
            load_pretrained(net, tmp_path / "vit.safetensors", strict=strict)
        message = str(info.value)
        assert "vit.safetensors: loaded 0/" in message
        assert "missing from the checkpoint" in message and "model.0.conv.unit0.conv.weight" in message
        assert "unexpected in the checkpoint" in message and "decoder.0.0.weight" in message
        assert "encoder.blocks.0.attn.qkv.weight" in info.value.report.unexpected
        assert len(info.value.report.missing) == len(net.state_dict())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

    # and a UNet file offered as timm encoder weights
    save_plain(net, tmp_path / "unet.pth")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)missing from the checkpoint.*blocks\.0\.attn\.qkv"):
        build_model("vit_seg", encoder="vit_tiny_patch16_224", img_size=32, encoder_kwargs=TINY_VIT,
                    encoder_weights=tmp_path / "unet.pth")


def test_mis_shaped_keys_strict_raises_non_strict_loads_the_rest(tmp_path):
    source = tiny_unet3d(0, out_channels=3)
    save_plain(source, tmp_path / "three_classes.pt")
    target = tiny_unet3d(1, out_channels=1)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch \(checkpoint vs model\)"):
        load_pretrained(target, tmp_path / "three_classes.pt")

    original = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_pretrained(target, tmp_path / "three_classes.pt", strict=False)
    assert not report.ok and not report.missing and not report.unexpected
    mismatched = {key for key, _, _ in report.mismatched}
    assert mismatched and all(key.startswith("model.2.") for key in mismatched)  # the output level only
    assert ("model.2.0.conv.weight", (8, 3, 3, 3, 3), (8, 1, 3, 3, 3)) in report.mismatched
    for key, value in target.state_dict().items():
        expected = original[key] if key in mismatched else source.state_dict()[key]
        assert torch.equal(value, expected), key


def test_bad_files_get_clear_errors(tmp_path):
    net = tiny_unet3d(0)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_pretrained(net, tmp_path / "nowhere.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"epoch": 3, "weight": torch.zeros(1)}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"not a state dict: entries \['epoch'\]"):
        read_state_dict(tmp_path / "mixed.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(ValueError, match=r"garbage\.pt: not a readable torch checkpoint") as info:
        read_state_dict(tmp_path / "garbage.pt")
    assert not isinstance(info.value, UnsafeCheckpointError) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_from_local_file_one_channel(tmp_path, suffix):
    """An ImageNet-style 3-channel, 224 px checkpoint (with classifier) into a 1-channel, 64 px encoder."""
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)  # 1000-class head, 14x14 positions
    path = tmp_path / f"vit_tiny{suffix}"
    (safetensors.torch.save_file if suffix == ".safetensors" else torch.save)(source.state_dict(), path)
    net = build_model("vit_seg", encoder="vit_tiny_patch16_224", in_channels=1, img_size=64,
                      encoder_kwargs=TINY_VIT, encoder_weights=path)
    enc = net.encoder
    torch.testing.assert_close(enc.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(enc.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(enc.cls_token, source.cls_token)
    assert enc.pos_embed.shape == (1, 1 + 4 * 4, 32)  # resampled from 14x14 to 4x4 by timm's filter


def test_sam_checkpoint_layout_from_local_file(tmp_path):
    """Segment-Anything's own checkpoint layout (image_encoder.*, mlp.lin*, plus decoder keys) via timm's filter."""
    sam_kwargs = dict(TINY_VIT, global_attn_indexes=[0], window_size=2, neck_chans=16)
    torch.manual_seed(0)
    source = timm.create_model("samvit_base_patch16", img_size=64, num_classes=0, **sam_kwargs)
    sam = {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v for k, v in source.state_dict().items()}
    sam["mask_decoder.iou_token.weight"] = torch.zeros(1, 16)
    torch.save(sam, tmp_path / "sam_vit_tiny.pth")
    net = build_model("vit_seg", encoder="samvit_base_patch16", in_channels=3, img_size=64,
                      encoder_kwargs=sam_kwargs, encoder_weights=tmp_path / "sam_vit_tiny.pth")
    assert_same_weights(source, net.encoder)
