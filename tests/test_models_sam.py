"""SAM: Meta's and timm's checkpoint layouts at 1024 and at another img_size (resampled position tables
against ``torch.nn.functional.interpolate``), the prompt-free segmenter against segment-anything's own
``Sam.forward``, and load -> adapt -> train -> save -> load -> predict."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from segadapt.adapters import AdapterConfig, inject, load_adapter, save_adapter
from segadapt.models import SAMSegmenter, build_model, default_train_modules, preset_targets

# a small SAM in Meta's exact key layout (segment_anything.build_sam._build_sam with other widths)
SMALL = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=14, prompt_dim=32,
             decoder_mlp_dim=64, iou_head_hidden_dim=32)


def meta_sam(img_size: int, seed: int = 0) -> Sam:
    """segment-anything's Sam, built as build_sam does (3 multimask outputs), with SMALL's widths and
    random values in every tensor (the position tables start at zero in segment-anything)."""
    torch.manual_seed(seed)
    size = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=SMALL["depth"], embed_dim=SMALL["embed_dim"], img_size=img_size, mlp_ratio=4,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=SMALL["num_heads"],
                                      patch_size=16, qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=SMALL["global_attn_indexes"], window_size=SMALL["window_size"],
                                      out_chans=SMALL["prompt_dim"]),
        prompt_encoder=PromptEncoder(embed_dim=SMALL["prompt_dim"], image_embedding_size=(size, size),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=SMALL["prompt_dim"],
                                                               mlp_dim=SMALL["decoder_mlp_dim"], num_heads=8),
                                 transformer_dim=SMALL["prompt_dim"], iou_head_depth=3,
                                 iou_head_hidden_dim=SMALL["iou_head_hidden_dim"]),
    )
    with torch.no_grad():
        for name, param in sam.named_parameters():
            if "pos" in name:
                param.normal_()
    return sam.eval()


@pytest.fixture(scope="module")
def meta_file(tmp_path_factory):
    sam = meta_sam(1024)
    path = tmp_path_factory.mktemp("sam") / "sam_small.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


def ours(img_size: int, checkpoint=None, **kwargs) -> SAMSegmenter:
    return SAMSegmenter(**{"in_channels": 3, "out_channels": 3, "img_size": img_size, "variant": "tiny",
                           "encoder_kwargs": SMALL, "checkpoint": checkpoint, **kwargs})


def expected_resampled(state: dict, size: int) -> dict:
    """The position tables at ``size`` tokens per side, computed here from the originals."""
    out = {"image_encoder.pos_embed": F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(size, size),
                                                    mode="bicubic", align_corners=False).permute(0, 2, 3, 1)}
    for axis in ("h", "w"):  # block 1 is the global-attention block
        table = state[f"image_encoder.blocks.1.attn.rel_pos_{axis}"]
        out[f"image_encoder.blocks.1.attn.rel_pos_{axis}"] = F.interpolate(
            table[None].permute(0, 2, 1), size=2 * size - 1, mode="linear").permute(0, 2, 1)[0]
    return out


def test_sam_vit_b_key_layout_is_meta_s():
    registry = {k: tuple(v.shape) for k, v in sam_model_registry["vit_b"](checkpoint=None).state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours(1024, variant="vit_b", encoder_kwargs=None).state_dict().items()}
    assert mine == registry


def test_meta_file_loads_exactly_at_1024_and_resampled_at_256(meta_file, capsys):
    path, state = meta_file
    exact = ours(1024, path).state_dict()
    assert exact.keys() == state.keys() and all(torch.equal(exact[k], v) for k, v in state.items())

    resampled = ours(256, path).state_dict()
    expected = expected_resampled(state, 16)
    assert resampled["image_encoder.pos_embed"].shape == (1, 16, 16, 32)
    assert resampled["image_encoder.blocks.1.attn.rel_pos_h"].shape == (31, 16)
    for key, value in resampled.items():
        if key in expected:
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
        else:  # windowed blocks keep their (2 * 14 - 1)-long tables, and every other tensor is the file's
            assert torch.equal(value, state[key]), key
    assert resampled["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 16)

    # another class count: the class-dependent decoder tensors are new, the rest is the file's
    capsys.readouterr()
    binary = ours(256, path, out_channels=1).state_dict()
    assert "mask_decoder.mask_tokens, mask_decoder.output_hypernetworks_mlps, mask_decoder.iou_prediction_head built afresh" \
        in capsys.readouterr().out
    assert binary["mask_decoder.mask_tokens.weight"].shape == (2, 32)
    assert torch.equal(binary["mask_decoder.output_hypernetworks_mlps.1.layers.0.weight"],
                       state["mask_decoder.output_hypernetworks_mlps.1.layers.0.weight"])
    assert torch.equal(binary["mask_decoder.transformer.layers.0.mlp.lin1.weight"],
                       state["mask_decoder.transformer.layers.0.mlp.lin1.weight"])


def test_timm_samvit_file_loads_at_256_into_vit_seg_and_sam(tmp_path, capsys):
    timm_kwargs = dict(depth=2, embed_dim=32, num_heads=2, global_attn_indexes=[1], window_size=14, neck_chans=32)
    torch.manual_seed(0)
    source = timm.create_model("samvit_base_patch16", num_classes=0, **timm_kwargs)  # img_size 1024
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "pos" in name:
                param.normal_()
    torch.save(source.state_dict(), tmp_path / "samvit.pth")
    state = {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v for k, v in source.state_dict().items()}
    expected = expected_resampled(state, 16)

    vit = build_model("vit_seg", encoder="samvit_base_patch16", in_channels=3, img_size=256,
                      encoder_kwargs=timm_kwargs, encoder_weights=tmp_path / "samvit.pth")
    for key, value in vit.encoder.state_dict().items():
        meta_key = f"image_encoder.{key.replace('mlp.fc', 'mlp.lin')}"
        if meta_key in expected:
            torch.testing.assert_close(value, expected[meta_key], rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, state[meta_key]), key

    sam = ours(256, tmp_path / "samvit.pth", encoder_kwargs={**SMALL, "prompt_dim": 32})
    assert "SAM image encoder loaded (timm layout) at img_size 256" in capsys.readouterr().out
    for key, value in sam.image_encoder.state_dict().items():
        full = f"image_encoder.{key}"
        if full in expected:
            torch.testing.assert_close(value, expected[full], rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, state[full]), key


def test_prompt_free_forward_equals_segment_anything_sam_forward():
    """Sam.forward without prompts (per image: preprocess, encoder, no-prompt embeddings, multimask decoder,
    postprocess_masks) against the batched segmenter, on 3-channel 0-255 images smaller than img_size."""
    sam = meta_sam(64, seed=3)
    net = ours(64, normalize=True)
    net.load_state_dict(sam.state_dict())
    net.eval()
    images = torch.rand(2, 3, 48, 56) * 255
    with torch.no_grad():
        logits = net(images)
        reference = sam([{"image": image, "original_size": (48, 56)} for image in images], multimask_output=True)
        low_res = torch.cat([r["low_res_logits"] for r in reference])
        expected = sam.postprocess_masks(low_res, input_size=(48, 56), original_size=(48, 56))
    assert logits.shape == (2, 3, 48, 56)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits > sam.mask_threshold, torch.cat([r["masks"] for r in reference]))

    gray = ours(64, in_channels=1)  # grayscale input: repeated to SAM's three channels
    gray.load_state_dict(sam.state_dict())
    one = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        three = ours(64)
        three.load_state_dict(sam.state_dict())
        assert torch.equal(gray.eval()(one), three.eval()(one.repeat(1, 3, 1, 1)))
        # resize: the input scaled to img_size, the logits back (SAM on a 2x enlarged image)
        resized = ours(64, resize=True, normalize=True)
        resized.load_state_dict(sam.state_dict())
        small = torch.rand(1, 3, 32, 32) * 255
        enlarged = F.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False)
        low_res = sam([{"image": enlarged[0], "original_size": (64, 64)}], multimask_output=True)[0]["low_res_logits"]
        torch.testing.assert_close(resized.eval()(small), F.interpolate(low_res, size=(32, 32), mode="bilinear",
                                                                        align_corners=False), rtol=1e-4, atol=1e-4)


def test_meta_file_load_adapt_train_save_load_predict(meta_file, tmp_path):
    """The vit_b pipeline of scripts/sam_pipeline.py on the small Meta-layout file: img_size 32 (resampled),
    SALT on the encoder's qkv, the mask decoder trained in full (the model default), 10 steps."""
    path, _ = meta_file
    torch.manual_seed(0)
    net = ours(32, path, in_channels=1, out_channels=2)
    targets = preset_targets(net, "qkv")
    assert targets == ["image_encoder.blocks.0.attn.qkv", "image_encoder.blocks.1.attn.qkv"]
    config = AdapterConfig(method="salt", rank=4, lora_rank=2, targets=targets, train_modules=default_train_modules(net))
    inject(net, config)
    images, labels = torch.randn(2, 1, 32, 32), torch.randint(0, 2, (2, 32, 32))
    optimiser = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    net.train()
    losses = []
    for _ in range(10):
        optimiser.zero_grad()
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    net.eval()
    file = save_adapter(net, tmp_path / "sam_salt.safetensors")
    torch.manual_seed(1)  # the fresh model's new class tokens differ: the adapter file brings the trained ones
    fresh = load_adapter(ours(32, path, in_channels=1, out_channels=2), file).eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), net(images))


def test_model_sam_runs_from_the_training_configs(tmp_path, capsys):
    """``model=sam`` (tiny variant) through scripts/train.py's config: base pretraining on the source phantom,
    LoRA on the encoder with the mask decoder trained beside it, a run folder that loads back."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from segadapt.adapters.trained import TrainedModule
    from segadapt.training import load_run, train

    grid = ["shape=[32,32,16]", "spacing=[6.9,6.9,10.0]"]
    preprocess = ["preprocess.slice_size=[32,32]", "preprocess.patch_size=[32,32,16]", "preprocess.samples_per_volume=2"]
    overrides = [*[f"{d}.phantom.{g}" for d in ("data", "source") for g in grid],
                 *[f"{d}.{p}" for d in ("data", "source") for p in preprocess],
                 "data.phantom.n=6", "source.phantom.n=4", "source.n_folds=2", "data.batch_size=1", "source.batch_size=1",
                 "trainer.max_steps=1", "pretrain.max_steps=1", "trainer.enable_progress_bar=false",
                 "model=sam", "model.kwargs.variant=tiny", "model.kwargs.img_size=32", "adapter=lora",
                 f"paths.data={tmp_path}/data", f"paths.runs={tmp_path}/runs"]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    result = train(OmegaConf.to_container(cfg, resolve=True))
    assert result["global_step"] == 1
    module, _ = load_run(tmp_path / "runs/phantom_sah/sam/lora/fold0")
    assert isinstance(module.net.mask_decoder, TrainedModule)
    assert module.hparams.roi_size == [32, 32]
