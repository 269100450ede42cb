"""SAM as a segmenter without prompts (as SAMed does): segment-anything's image encoder, prompt encoder and
mask decoder, with one mask per class from the multimask outputs.

Shapes: image ``(B, in_channels, H, W)`` with H, W <= ``img_size`` (padded bottom-right to ``img_size``, as
``Sam.preprocess`` pads; with ``resize``, any H, W, resized to ``img_size``) -> ``ImageEncoderViT`` -> embedding ``(B, 256, S, S)``, S = img_size / 16 -> the
``MaskDecoder`` with the prompt encoder's no-prompt embeddings (no sparse tokens; the dense "no mask"
embedding) and ``num_multimask_outputs = out_channels`` -> ``(B, out_channels, 4S, 4S)`` -> bilinear to
``img_size`` and cropped -> logits ``(B, out_channels, H, W)``. The mask decoder's single-mask token
(index 0) is not used, as in SAM's multimask mode.

Input: SAM's encoder takes 3 channels; a 1-channel (grayscale, CT window, MRI) image is repeated to 3. By
default the input is taken as already normalised (segadapt's pipeline z-scores or windows intensities,
which is what SAM's ``(x - pixel_mean) / pixel_std`` makes of RGB); ``normalize=True`` applies SAM's pixel
mean / std to 0-255 RGB input instead.

Checkpoints (``checkpoint``): Meta's files (``sam_vit_b_01ec64.pth`` ...: ``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``) or timm's ``samvit_*`` files (image encoder only; the prompt
encoder and mask decoder keep their initialisation, said in one printed line), read safely
(``torch.load(weights_only=True)`` or safetensors) and loaded at any ``img_size``: position tables are
resampled (:func:`segadapt.models.pretrained.resample_positions`). The class-dependent tensors of the mask
decoder (:data:`HEAD_MODULES`: mask tokens, hypernetwork MLPs, IoU head) are loaded where they fit (Meta's
files have 3 multimask outputs) and built afresh otherwise.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from segadapt.models.presets import encoder_presets, split_presets
from segadapt.models.pretrained import check_finite, load_base, read_state_dict, resample_positions
from segadapt.models.registry import ModelSpec, register

PATCH = 16
PIXEL_MEAN = (123.675, 116.28, 103.53)  # segment_anything.modeling.Sam's defaults (RGB, 0-255)
PIXEL_STD = (58.395, 57.12, 57.375)
# segment_anything.build_sam's three encoders, and a small one for CPUs (same layout, fewer and narrower blocks)
VARIANTS: dict[str, dict] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "tiny": dict(embed_dim=128, depth=4, num_heads=4, global_attn_indexes=(1, 3), window_size=8, prompt_dim=64,
                 decoder_mlp_dim=256, iou_head_hidden_dim=64),
}
SAM_DEFAULTS = dict(window_size=14, prompt_dim=256, decoder_mlp_dim=2048, iou_head_hidden_dim=256)
HEAD_MODULES = ["mask_decoder.mask_tokens", "mask_decoder.output_hypernetworks_mlps", "mask_decoder.iou_prediction_head"]


def meta_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A SAM state dict in Meta's key layout: Meta's as is; timm's ``samvit_*`` (image encoder only, no
    prefix, ``mlp.fc1/fc2``) mapped onto ``image_encoder.*`` (``mlp.lin1/lin2``), the inverse of timm's
    ``vision_transformer_sam.checkpoint_filter_fn``."""
    if any(key.startswith("image_encoder.") for key in state):
        return dict(state)
    return {f"image_encoder.{key.replace('mlp.fc', 'mlp.lin')}": value for key, value in state.items()}


class SAMSegmenter(nn.Module):
    """Prompt-free SAM: mask logits for ``out_channels`` classes at input resolution.

    Args:
        in_channels: 1 (repeated to SAM's 3) or 3.
        out_channels: classes, = the mask decoder's ``num_multimask_outputs`` (1: binary, sigmoid).
        img_size: encoder input size, a multiple of 16 (1024 for SAM as released; 256 is the usual medical size).
        variant: ``vit_b``, ``vit_l``, ``vit_h`` (segment-anything's) or ``tiny`` (embed_dim 128, depth 4, a
            64-wide mask decoder: a CPU-sized model in the same layout).
        checkpoint: local SAM file, Meta's or timm's layout (see the module docstring).
        normalize: apply SAM's pixel mean / std (input in 0-255 RGB); default: input already normalised.
        resize: resize the input to img_size (bilinear) instead of padding it, and the logits back to the
            input size: SAM's masks are 1/4 of img_size, so a 64-px patch at img_size 256 gets a mask at its
            own resolution (thin structures such as retinal vessels), at the cost of img_size-sized compute.
        encoder_kwargs: overrides of the variant's values (``embed_dim``, ``depth``, ``num_heads``,
            ``global_attn_indexes``, ``window_size``, ``prompt_dim``, ``decoder_mlp_dim``, ``iou_head_hidden_dim``).

    Modules: ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` (segment-anything's, with their key layout).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, img_size: int = 256, variant: str = "vit_b",
                 checkpoint: str | Path | None = None, normalize: bool = False, resize: bool = False,
                 encoder_kwargs: dict | None = None) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown SAM variant {variant!r}; valid: {', '.join(VARIANTS)}")
        if in_channels not in (1, 3):
            raise ValueError(f"SAM takes 1-channel (repeated to 3) or 3-channel images, got in_channels={in_channels}")
        if img_size % PATCH:
            raise ValueError(f"SAM's img_size must be a multiple of {PATCH}, got {img_size}")
        settings = {**SAM_DEFAULTS, **VARIANTS[variant], **dict(encoder_kwargs or {})}
        unknown = set(settings) - set(SAM_DEFAULTS) - set(VARIANTS["vit_b"])
        if unknown:
            raise ValueError(f"unknown SAM encoder_kwargs {sorted(unknown)}")
        self.in_channels, self.out_channels, self.img_size = in_channels, out_channels, img_size
        self.normalize, self.resize = normalize, resize
        prompt_dim, size = settings["prompt_dim"], img_size // PATCH
        self.image_encoder = ImageEncoderViT(
            depth=settings["depth"], embed_dim=settings["embed_dim"], img_size=img_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=settings["num_heads"], patch_size=PATCH,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(settings["global_attn_indexes"]),
            window_size=settings["window_size"], out_chans=prompt_dim)
        self.prompt_encoder = PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(size, size),
                                            input_image_size=(img_size, img_size), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=out_channels,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=settings["decoder_mlp_dim"],
                                          num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=settings["iou_head_hidden_dim"])
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)
        if checkpoint is not None:
            self.load_sam_checkpoint(checkpoint)

    def load_sam_checkpoint(self, path: str | Path) -> None:
        """Load a Meta or timm SAM file at this ``img_size`` (strictly, but for :data:`HEAD_MODULES` where the
        class count differs, and for the prompt encoder / mask decoder a timm file does not have)."""
        state = read_state_dict(path)
        check_finite(path, state)
        state = resample_positions(meta_layout(state), self.state_dict())
        encoder_only = not any(key.startswith(("prompt_encoder.", "mask_decoder.")) for key in state)
        heads = ["prompt_encoder", "mask_decoder"] if encoder_only else HEAD_MODULES
        new, detail = load_base(self, path, heads, state=state)
        if encoder_only:
            print(f"{Path(path).name}: SAM image encoder loaded (timm layout) at img_size {self.img_size}; the prompt "
                  "encoder and mask decoder are freshly initialised")
        elif new:
            print(f"{Path(path).name}: SAM loaded at img_size {self.img_size}; {', '.join(new)} built afresh for "
                  f"{self.out_channels} classes ({detail})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, out_channels, H, W)`` for images ``(B, in_channels, H, W)``, H, W <= img_size."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SAMSegmenter takes images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if not self.resize and (height > self.img_size or width > self.img_size):
            raise ValueError(f"image {height}x{width} is larger than SAM's img_size {self.img_size}")
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.normalize:
            x = (x - self.pixel_mean) / self.pixel_std
        canvas = (self.img_size, self.img_size)
        if self.resize:
            x = F.interpolate(x, size=canvas, mode="bilinear", align_corners=False)
        else:
            x = F.pad(x, (0, self.img_size - width, 0, self.img_size - height))
        embedding = self.image_encoder(x)
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        masks, _ = self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=True)
        if self.resize:
            return F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
        masks = F.interpolate(masks, size=canvas, mode="bilinear", align_corners=False)
        return masks[..., :height, :width]


def sam_presets(model: SAMSegmenter) -> dict[str, list[str]]:
    """``attention``, ``qkv``, ``mlp``, ``all_linear`` (image encoder), ``mask_decoder``, ``all``."""
    presets = encoder_presets(model.image_encoder, "image_encoder")
    presets.update(split_presets(model, {"mask_decoder": ["mask_decoder"]}, "all"))
    return presets


SPEC = register(ModelSpec(
    name="sam", build=SAMSegmenter, network_types=(SAMSegmenter,), sampling="slice", presets=sam_presets,
    heads=lambda model: list(HEAD_MODULES), train_modules=lambda model: ["mask_decoder"], own_checkpoint=True,
))
