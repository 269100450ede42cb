"""Segmentation models to adapt, their adapter target presets, and safe pretrained loading.

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
``vit_seg``        :class:`ViTSegmenter` (timm ``vit_*``/``samvit_*``  (B,C,H,W) -> logits (B,K,H,W)
                   encoder + light decoder)
=================  ==============================================  ===============================
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from segadapt.models.multiview_unet import VIEWS, MultiViewUNet, logits_to_probabilities
from segadapt.models.nnunet import build_nnunet
from segadapt.models.presets import adaptable_modules, preset_targets, target_presets
from segadapt.models.pretrained import (
    CheckpointMismatchError,
    LoadReport,
    UnsafeCheckpointError,
    create_timm_encoder,
    load_pretrained,
    read_state_dict,
)
from segadapt.models.unet3d import build_dynunet, build_unet
from segadapt.models.vit_seg import ViTSegmenter

logger = logging.getLogger(__name__)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "multiview_unet": MultiViewUNet,
    "unet3d": build_unet,
    "dynunet": build_dynunet,
    "vit_seg": ViTSegmenter,
    "nnunet": build_nnunet,
}


def build_model(name: str, checkpoint: str | Path | None = None, strict: bool = True, **kwargs) -> nn.Module:
    """Build model ``name`` (a key of :data:`MODELS`) from keyword arguments.

    Args:
        name: ``multiview_unet``, ``unet3d``, ``dynunet`` or ``vit_seg``.
        checkpoint: optional local weights for the whole model, loaded with :func:`load_pretrained`.
        strict: passed to :func:`load_pretrained`; when False, the key report is logged as a warning.
        kwargs: the builder's arguments (see :class:`MultiViewUNet`, :func:`build_unet`,
            :func:`build_dynunet`, :class:`ViTSegmenter`).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    model = MODELS[name](**kwargs)
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
    "MultiViewUNet",
    "UnsafeCheckpointError",
    "ViTSegmenter",
    "adaptable_modules",
    "build_dynunet",
    "build_model",
    "build_unet",
    "create_timm_encoder",
    "load_pretrained",
    "logits_to_probabilities",
    "preset_targets",
    "read_state_dict",
    "target_presets",
]
