"""Multi-view 2D UNet: one MONAI 2D UNet run slice by slice along the three axes of a CT volume.

Axis convention (MONAI channel-first, RAS after orientation): a volume is ``(B, C, X, Y, Z)`` with
X = left->right, Y = posterior->anterior, Z = inferior->superior. A view names the axis the slices are
taken along and the in-plane axes the 2D network sees:

=========  =============  ====================  ===========================
view       sliced along   one slice             ``volume`` indexing
=========  =============  ====================  ===========================
axial      Z              ``(B, C, X, Y)``      ``volume[:, :, :, :, z]``
coronal    Y              ``(B, C, X, Z)``      ``volume[:, :, :, y, :]``
sagittal   X              ``(B, C, Y, Z)``      ``volume[:, :, x, :, :]``
=========  =============  ====================  ===========================

The view -> spatial axis mapping is :data:`SLICE_AXES`, the one the training slices use.

Training sees 2D slices (``forward(slices, view)``); validation and inference see volumes
(``predict_volume``), where the three per-view predictions are fused by the mean of the probabilities
or by a learned 1x1x1 convolution over the stacked per-view logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from monai.inferers import SliceInferer
from monai.networks.nets import UNet
from torch import nn

from segadapt.models.registry import ModelSpec, register
from segadapt.models.unet import build_unet, unet_heads, unet_presets

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
"""The three views, in the order used for stacking and fusion."""
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
"""The RAS array axis normal to each view (0-based over the spatial axes)."""

FUSIONS: tuple[str, ...] = ("mean", "learned")


def check_view(view: str) -> str:
    """Return ``view`` if it is one of :data:`VIEWS`, else raise ``ValueError``."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; valid views: {', '.join(VIEWS)}")
    return view


def logits_to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for one output channel (foreground probability), softmax over channels otherwise."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


class MultiViewUNet(nn.Module):
    """A MONAI 2D UNet applied along the axial, coronal and sagittal axes, its three views fused.

    Args:
        in_channels: input channels (e.g. CT windows).
        out_channels: 1 for binary segmentation (sigmoid), else the number of classes (softmax).
        channels, strides, num_res_units, norm, dropout: the 2D UNet (``monai.networks.nets.UNet``).
            Slice sizes must be divisible by ``prod(strides)`` in :meth:`forward`; :meth:`predict_volume`
            pads and crops back.
        shared_weights: one UNet for all views (module ``unet``) or one per view
            (modules ``unets.axial``, ``unets.coronal``, ``unets.sagittal``).
        fusion: ``"mean"`` -- mean of the three probability volumes; ``"learned"`` -- a 1x1x1
            ``Conv3d`` (module ``fusion``) from the stacked per-view logits ``(B, 3*C, X, Y, Z)`` (view order
            :data:`VIEWS`) to fused logits ``(B, C, X, Y, Z)``, initialised to the mean of the logits.

    Example::

        net = MultiViewUNet(in_channels=1, out_channels=1)
        logits = net(slices, view="axial")                 # (B, 1, H, W), training on slices
        net.eval()
        probs = net.predict_volume(ct, slice_batch_size=16)  # (B, 1, X, Y, Z) fused foreground probability
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 2,
        norm: str | tuple = "instance",
        dropout: float = 0.0,
        shared_weights: bool = True,
        fusion: str = "mean",
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
        self.out_channels = out_channels
        self.shared_weights = shared_weights
        self.fusion_mode = fusion
        self.divisor = math.prod(strides)

        unet = partial(
            build_unet, spatial_dims=2, in_channels=in_channels, out_channels=out_channels, channels=channels,
            strides=strides, num_res_units=num_res_units, norm=norm, dropout=dropout,
        )
        if shared_weights:
            self.unet = unet()
        else:
            self.unets = nn.ModuleDict({view: unet() for view in VIEWS})
        if fusion == "learned":
            self.fusion = nn.Conv3d(len(VIEWS) * out_channels, out_channels, kernel_size=1)
            with torch.no_grad():  # fused logits = mean of the three views' logits at init
                self.fusion.weight.copy_(
                    torch.eye(out_channels).repeat(1, len(VIEWS)).div(len(VIEWS)).view_as(self.fusion.weight)
                )
                self.fusion.bias.zero_()

    def unet_for(self, view: str) -> UNet:
        """The 2D UNet that processes ``view``'s slices."""
        check_view(view)
        return self.unet if self.shared_weights else self.unets[view]

    def forward(self, x: torch.Tensor, view: str | Sequence[str] | None = None) -> torch.Tensor:
        """Slice logits for training.

        Args:
            x: slices ``(B, C, H, W)``; H and W divisible by ``self.divisor``.
            view: the view of the slices -- one name for the batch, or one per sample (a mixed batch).
                Required when ``shared_weights=False``; checked but not needed otherwise.

        Returns:
            logits ``(B, out_channels, H, W)``.
        """
        if x.ndim != 4:
            raise ValueError(
                f"MultiViewUNet.forward takes 2D slices (B, C, H, W), got shape {tuple(x.shape)}; "
                "use predict_volume for (B, C, X, Y, Z) volumes"
            )
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(f"slice size {tuple(x.shape[-2:])} is not divisible by prod(strides) = {self.divisor}")
        if view is None:
            if not self.shared_weights:
                raise ValueError("view is required: this MultiViewUNet has one UNet per view (shared_weights=False)")
            return self.unet(x)
        if isinstance(view, str):
            return self.unet_for(view)(x)
        if len(view) != x.shape[0]:
            raise ValueError(f"got {len(view)} view names for a batch of {x.shape[0]} slices")
        views = [check_view(v) for v in view]
        if self.shared_weights:
            return self.unet(x)
        out = x.new_empty((x.shape[0], self.out_channels, *x.shape[2:]))
        for v in set(views):
            rows = torch.tensor([i for i, w in enumerate(views) if w == v], device=x.device)
            out[rows] = self.unets[v](x[rows])
        return out

    def view_logits(self, volume: torch.Tensor, view: str, slice_batch_size: int = 32) -> torch.Tensor:
        """Logits ``(B, out_channels, X, Y, Z)`` of one view, ``slice_batch_size`` slices at a time.

        In-plane sizes not divisible by ``self.divisor`` are zero-padded and cropped back
        (``monai.inferers.SliceInferer``). Follows the module's current train/eval mode and grad mode.
        """
        dim = SLICE_AXES[check_view(view)]
        in_plane = [s for i, s in enumerate(volume.shape[2:]) if i != dim]
        roi = [math.ceil(s / self.divisor) * self.divisor for s in in_plane]
        inferer = SliceInferer(spatial_dim=dim, roi_size=roi, sw_batch_size=slice_batch_size, overlap=0.0)
        return inferer(volume, self.unet_for(view))

    def fuse(self, view_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fused probabilities ``(B, C, X, Y, Z)`` from the per-view logits (order :data:`VIEWS`).

        ``mean``: ``mean_v p(logits_v)``; ``learned``: ``p(fusion(cat_v logits_v))``, with ``p`` the
        sigmoid (C = 1) or channel softmax.
        """
        if len(view_logits) != len(VIEWS):
            raise ValueError(
                f"expected {len(VIEWS)} per-view logit volumes ({', '.join(VIEWS)}), got {len(view_logits)}"
            )
        if self.fusion_mode == "mean":
            return torch.stack([logits_to_probabilities(z) for z in view_logits]).mean(dim=0)
        return logits_to_probabilities(self.fusion(torch.cat(list(view_logits), dim=1)))

    def predict_volume(
        self, volume: torch.Tensor, slice_batch_size: int = 32, return_views: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Fused probabilities of a volume, memory-bounded by batching ``slice_batch_size`` slices.

        The per-view UNet passes run without gradients; the learned fusion stays differentiable
        (when grad is enabled), so it can be fit on volumes. Call ``.eval()`` first for inference.

        Args:
            volume: ``(B, C, X, Y, Z)`` (see the module docstring for the axis convention).
            slice_batch_size: slices per UNet call.
            return_views: also return each view's probabilities.

        Returns:
            fused probabilities ``(B, out_channels, X, Y, Z)`` (the foreground probability when
            ``out_channels == 1``), and with ``return_views`` a dict ``view -> (B, out_channels, X, Y, Z)``.
        """
        if volume.ndim != 5:
            raise ValueError(f"predict_volume takes a (B, C, X, Y, Z) volume, got shape {tuple(volume.shape)}")
        with torch.no_grad():
            logits = [self.view_logits(volume, view, slice_batch_size) for view in VIEWS]
        fused = self.fuse(logits)
        if not return_views:
            return fused
        return fused, {view: logits_to_probabilities(z) for view, z in zip(VIEWS, logits)}


def _roots(model: MultiViewUNet) -> list[str]:
    return ["unet"] if model.shared_weights else [f"unets.{view}" for view in VIEWS]


def multiview_presets(model: MultiViewUNet) -> dict[str, list[str]]:
    """The UNet presets over the shared UNet or all three per-view UNets (the learned-fusion conv is in none)."""
    presets: dict[str, list[str]] = {}
    for root in _roots(model):
        for key, names in unet_presets(model.get_submodule(root)).items():
            presets.setdefault(key, []).extend(f"{root}.{n}" for n in names)
    return presets


def multiview_heads(model: MultiViewUNet) -> list[str]:
    heads = [f"{root}.{h}" for root in _roots(model) for h in unet_heads(model.get_submodule(root))]
    return heads + (["fusion"] if model.fusion_mode == "learned" else [])


def multiview_plan_fields(plan) -> dict:
    """``channels`` (32 x 2^stage, at most 512) and ``strides`` (2 per pooling) of the plan's ``slice_size``
    slices."""
    return {"channels": list(plan.slice_filters), "strides": [2] * plan.slice_pools}


SPEC = register(ModelSpec(
    name="multiview_unet", build=MultiViewUNet, network_types=(MultiViewUNet,), sampling="slice",
    presets=multiview_presets, heads=multiview_heads, plan_fields=multiview_plan_fields, multi_view=True,
))
