"""ViT / SAM segmenter: a timm image encoder (``vit_*``, ``samvit_*``, ...) and a light upsampling decoder.

Shapes: image ``(B, in_channels, H, W)`` -> encoder feature map ``(B, D, H/p, W/p)`` (timm
``forward_intermediates`` of the last block, with the final norm, or SAM's neck) -> ``n = ceil(log2 p)``
decoder stages, each ``ConvTranspose2d(k=2, s=2) -> LayerNorm2d -> GELU -> Conv2d(3x3) -> LayerNorm2d
-> GELU`` -> 1x1 conv -> logits ``(B, out_channels, H, W)`` (bilinear resize when ``2**n * (H/p) != H``).
The decoder is written here because neither timm nor MONAI ships a skip-free decoder for a plain ViT
feature map (UNETR's needs intermediate skips and 3D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from segadapt.models.presets import encoder_presets, split_presets
from segadapt.models.pretrained import create_timm_encoder
from segadapt.models.registry import ModelSpec, register


def _up_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
        LayerNorm2d(out_channels),
        nn.GELU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        LayerNorm2d(out_channels),
        nn.GELU(),
    )


class ViTSegmenter(nn.Module):
    """Mask logits at input resolution from a timm ViT/SAM image encoder.

    Args:
        encoder: any timm model with ``forward_intermediates`` and a patch embedding, e.g.
            ``vit_base_patch16_224``, ``samvit_base_patch16``.
        in_channels: 1 (a CT window) or 3 (three windows, or RGB); passed to timm as ``in_chans``.
        out_channels: 1 for binary (sigmoid) or the number of classes.
        img_size: encoder input size (timm builds position embeddings for it; pretrained ones are resampled).
        encoder_weights: local file of timm weights for the encoder (no hub access); see
            :func:`segadapt.models.pretrained.create_timm_encoder`.
        decoder_channels: channels of the ``ceil(log2 patch)`` upsampling stages (default 128, 64, 32, 16, ...).
        encoder_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``depth``, ``embed_dim``,
            ``dynamic_img_size``).

    Modules: ``encoder`` (timm), ``decoder`` (``nn.Sequential`` of stages), ``mask_head`` (1x1 conv).
    """

    def __init__(
        self,
        encoder: str = "vit_base_patch16_224",
        in_channels: int = 3,
        out_channels: int = 1,
        img_size: int | None = None,
        encoder_weights: str | Path | None = None,
        decoder_channels: Sequence[int] | None = None,
        encoder_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(encoder_kwargs or {}, in_chans=in_channels, num_classes=0)
        if img_size is not None:
            kwargs["img_size"] = img_size
        self.encoder = create_timm_encoder(encoder, weights_file=encoder_weights, **kwargs)
        if not hasattr(self.encoder, "forward_intermediates"):
            raise ValueError(f"timm model {encoder!r} has no forward_intermediates; use a ViT/SAM encoder")
        reduction = self.encoder.feature_info[-1]["reduction"]
        n_stages = max(math.ceil(math.log2(reduction)), 0)
        if decoder_channels is None:
            decoder_channels = [max(128 >> i, 16) for i in range(n_stages)]
        if len(decoder_channels) != n_stages:
            raise ValueError(
                f"encoder {encoder!r} reduces by {reduction}: "
                f"need {n_stages} decoder_channels, got {list(decoder_channels)}"
            )
        widths = [self.encoder.num_features, *decoder_channels]
        self.decoder = nn.Sequential(*[_up_stage(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.mask_head = nn.Conv2d(widths[-1], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, out_channels, H, W)`` for images ``(B, in_channels, H, W)``."""
        if x.ndim != 4:
            raise ValueError(f"ViTSegmenter takes images (B, C, H, W), got shape {tuple(x.shape)}")
        features = self.encoder.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[-1]
        logits = self.mask_head(self.decoder(features))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def vit_presets(model: ViTSegmenter) -> dict[str, list[str]]:
    """``attention``, ``qkv``, ``mlp``, ``all_linear`` (encoder), ``decoder`` (decoder convs and mask head), ``all``."""
    presets = encoder_presets(model.encoder, "encoder")
    presets.update(split_presets(model, {"decoder": ["decoder", "mask_head"]}, "all"))
    return presets


SPEC = register(ModelSpec(
    name="vit_seg", build=ViTSegmenter, network_types=(ViTSegmenter,), sampling="slice", presets=vit_presets,
    heads=lambda model: ["mask_head"], train_modules=lambda model: ["decoder", "mask_head"],
))
