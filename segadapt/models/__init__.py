"""Segmentation models to adapt, their adapter target presets, and safe pretrained loading.

Each network file registers a :class:`~segadapt.models.registry.ModelSpec` (builder, sampling, presets, heads,
plan fields, bundle network): :data:`MODELS` maps a model name to its spec.

Build by name (plain keyword arguments, so a Hydra/YAML ``model:`` block maps onto it)::

    from segadapt.models import build_model, load_pretrained, preset_targets
    net = build_model("multiview_unet", in_channels=1, out_channels=1, shared_weights=True)
    report = load_pretrained(net, "tbi_unet.ckpt")            # strict; raises with the key report
    targets = preset_targets(net, "encoder")                  # -> AdapterConfig(targets=targets)

=================  ==============================================  ===============================
name               builds                                          input -> output
=================  ==============================================  ===============================
``multiview_unet`` :class:`MultiViewUNet` (MONAI 2D UNet x 3 views)  slices (B,C,H,W) -> logits;
                                                                   ``predict_volume`` (B,C,X,Y,Z)
                                                                   -> fused probabilities
``unet3d``         ``monai.networks.nets.UNet`` (3D)               (B,C,X,Y,Z) -> logits
``dynunet``        ``monai.networks.nets.DynUNet`` (3D)            (B,C,X,Y,Z) -> logits
``unet2d``         ``monai.networks.nets.UNet`` (2D)               (B,C,H,W) -> logits
``vit_seg``        :class:`ViTSegmenter` (timm ``vit_*``/``samvit_*``  (B,C,H,W) -> logits (B,K,H,W)
                   encoder + light decoder)
``sam``            :class:`SAMSegmenter` (segment-anything's        (B,C,H,W) -> logits (B,K,H,W)
                   encoder, prompt encoder and mask decoder,
                   no prompts; Meta / timm SAM files)
=================  ==============================================  ===============================
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from segadapt.models.dynunet import build_dynunet
from segadapt.models.multiview_unet import VIEWS, MultiViewUNet, logits_to_probabilities
from segadapt.models.nnunet import build_nnunet
from segadapt.models.presets import (adaptable_modules, default_train_modules, head_modules, preset_targets,
                                     target_presets)
from segadapt.models.pretrained import (
    CheckpointMismatchError,
    LoadReport,
    UnsafeCheckpointError,
    create_timm_encoder,
    load_pretrained,
    read_state_dict,
)
from segadapt.models.registry import MODELS, ModelSpec, model_spec, register
from segadapt.models.sam import SAMSegmenter
from segadapt.models.unet import build_unet
from segadapt.models.vit_seg import ViTSegmenter

logger = logging.getLogger(__name__)


def build_model(name: str, checkpoint: str | Path | None = None, strict: bool = True, **kwargs) -> nn.Module:
    """Build model ``name`` (a key of :data:`MODELS`, or a model module's dotted path: see
    :func:`~segadapt.models.registry.model_spec`) from keyword arguments.

    Args:
        name: ``multiview_unet``, ``unet3d``, ``dynunet``, ``unet2d``, ``vit_seg``, ``sam``, ``nnunet``, ...
        checkpoint: optional local weights for the whole model, loaded with :func:`load_pretrained`; for
            ``sam``, a SAM file in Meta's or timm's layout, given to :class:`SAMSegmenter` (which resamples
            its position tables to ``img_size``).
        strict: passed to :func:`load_pretrained`; when False, the key report is logged as a warning.
        kwargs: the builder's arguments (see :class:`MultiViewUNet`, :func:`build_unet`,
            :func:`build_dynunet`, :class:`ViTSegmenter`).
    """
    spec = model_spec(name)
    if spec.own_checkpoint:
        kwargs["checkpoint"], checkpoint = checkpoint, None
    model = spec.build(**kwargs)
    if checkpoint is not None:
        report = load_pretrained(model, checkpoint, strict=strict)
        if not report.ok:
            logger.warning("partial load into %s:\n%s", name, report)
    return model


__all__ = [
    "MODELS",
    "VIEWS",
    "CheckpointMismatchError",
    "LoadReport",
    "ModelSpec",
    "MultiViewUNet",
    "SAMSegmenter",
    "UnsafeCheckpointError",
    "ViTSegmenter",
    "adaptable_modules",
    "build_dynunet",
    "build_model",
    "build_nnunet",
    "build_unet",
    "create_timm_encoder",
    "default_train_modules",
    "head_modules",
    "load_pretrained",
    "logits_to_probabilities",
    "model_spec",
    "preset_targets",
    "read_state_dict",
    "register",
    "target_presets",
]
