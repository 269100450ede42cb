"""MONAI UNet builder (3D by default, 2D for 2D images), from plain keyword arguments, and its model specs.

Input ``(B, C, X, Y, Z)`` channel-first; output logits ``(B, out_channels, X, Y, Z)``. Each spatial size
must be divisible by the product of the strides.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn

from segadapt.models.presets import split_presets
from segadapt.models.registry import ModelSpec, register


def build_unet(
    in_channels: int = 1,
    out_channels: int = 1,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    norm: str | tuple = "instance",
    dropout: float = 0.0,
    spatial_dims: int = 3,
) -> UNet:
    """``monai.networks.nets.UNet`` (residual units, strided-conv down, transposed-conv up), 3D by default.

    The defaults are the 3D UNet of the design notes' performance table (channels 16..256, 2 residual
    units; 23 Conv3d/ConvTranspose3d layers, residual projections included). Sizes must be divisible by
    ``prod(strides)`` (16 by default).
    """
    if len(strides) != len(channels) - 1:
        raise ValueError(
            f"need len(strides) == len(channels) - 1, got {len(strides)} strides for {len(channels)} channels"
        )
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        strides=strides,
        num_res_units=num_res_units,
        norm=norm,
        dropout=dropout,
    )


def unet_parts(unet: UNet) -> dict[str, list[str]]:
    """encoder (down blocks), bottleneck (the lowest level), decoder (up blocks, the outermost first)."""
    # MONAI's UNet nests each level as Sequential(down, SkipConnection(next level), up);
    # the innermost submodule is the bottom (bottleneck) block.
    encoder, decoder = [], []
    path, block = "model", unet.model
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        encoder.append(f"{path}.0")
        decoder.append(f"{path}.2")
        path, block = f"{path}.1.submodule", block[1].submodule
    return {"encoder": encoder, "bottleneck": [path], "decoder": decoder}


def unet_presets(unet: UNet) -> dict[str, list[str]]:
    """``encoder`` (down path), ``bottleneck`` (lowest level), ``decoder`` (up path and output), ``all_conv``."""
    return split_presets(unet, unet_parts(unet), "all_conv")


def unet_heads(unet: UNet) -> list[str]:
    return unet_parts(unet)["decoder"][:1]  # the outermost up block ends in out_channels


def unet_plan_fields(plan) -> dict:
    """``channels`` (= the plan's filters) and ``strides`` (one per down step; an int where all axes share it)
    of the plan's ``patch_size`` patches. MONAI's UNet has one kernel size, so thick-slice 1x3x3 kernels are
    lost."""
    down = [s[0] if len(set(s)) == 1 else list(s) for s in plan.strides[1:]]
    return {"channels": list(plan.filters), "strides": down}


SPEC = register(ModelSpec(
    name="unet3d", build=build_unet, network_types=(UNet,), sampling="patch", presets=unet_presets,
    heads=unet_heads, plan_fields=unet_plan_fields, bundle_network="UNet",
))
# MONAI 2D UNet for 2D images (DRIVE), on the patch_size patches of a 2D plan
SPEC_2D = register(ModelSpec(
    name="unet2d", build=functools.partial(build_unet, spatial_dims=2), network_types=(UNet,), sampling="patch",
    presets=unet_presets, heads=unet_heads, plan_fields=unet_plan_fields, bundle_network=None,
))
