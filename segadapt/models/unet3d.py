"""MONAI UNet and DynUNet builders (3D by default), from plain keyword arguments (Hydra/Lightning-CLI friendly).

Input ``(B, C, X, Y, Z)`` channel-first; output logits ``(B, out_channels, X, Y, Z)``. Each spatial size
must be divisible by the product of the strides.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DynUNet, UNet


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


def build_dynunet(
    in_channels: int = 1,
    out_channels: int = 1,
    kernel_size: Sequence[Sequence[int] | int] = (3, 3, 3, 3, 3),
    strides: Sequence[Sequence[int] | int] = (1, 2, 2, 2, 2),
    upsample_kernel_size: Sequence[Sequence[int] | int] | None = None,
    filters: Sequence[int] | None = None,
    res_block: bool = False,
    deep_supervision: bool = False,
    deep_supr_num: int = 1,
    dropout: float | None = None,
    norm: str | tuple = ("INSTANCE", {"affine": True}),
    spatial_dims: int = 3,
) -> DynUNet:
    """``monai.networks.nets.DynUNet`` (nnU-Net-style; anisotropic kernels/strides allowed per level).

    ``upsample_kernel_size`` defaults to ``strides[1:]``; ``filters`` to MONAI's (32, 64, ... capped at 320).
    With ``deep_supervision`` the training-mode output is ``(B, 1 + deep_supr_num, out_channels, X, Y, Z)``
    (MONAI's stacking); in eval mode it is always ``(B, out_channels, X, Y, Z)``.
    """
    if len(kernel_size) != len(strides):
        raise ValueError(f"need one kernel size per level: {len(kernel_size)} kernel sizes, {len(strides)} strides")
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        strides=strides,
        upsample_kernel_size=strides[1:] if upsample_kernel_size is None else upsample_kernel_size,
        filters=filters,
        dropout=dropout,
        norm_name=norm,
        deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num,
        res_block=res_block,
    )
