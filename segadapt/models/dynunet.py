"""MONAI DynUNet (nnU-Net style, 3D by default) from plain keyword arguments, and its model spec.

Input ``(B, C, X, Y, Z)`` channel-first; output logits ``(B, out_channels, X, Y, Z)``. Each spatial size
must be divisible by the product of the strides.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.nets import DynUNet

from segadapt.models.presets import split_presets
from segadapt.models.registry import ModelSpec, register


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


def dynunet_presets(model: DynUNet) -> dict[str, list[str]]:
    """encoder = ``input_block`` + ``downsamples``, ``bottleneck``, decoder = ``upsamples`` + ``output_block`` +
    deep-supervision heads, ``all_conv``."""
    parts = {
        "encoder": ["input_block", "downsamples"],
        "bottleneck": ["bottleneck"],
        "decoder": ["upsamples", "output_block", "deep_supervision_heads"],
    }
    return split_presets(model, parts, "all_conv")


def dynunet_heads(model: DynUNet) -> list[str]:
    """Every name of every output block (``output_block``, each deep-supervision head under both of its names:
    ``deep_supervision_heads.<i>`` and ``skip_layers...super_head``): their shapes follow the class count."""
    return [name for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, UnetOutBlock)]


def dynunet_plan_fields(plan) -> dict:
    """``kernel_size``, ``strides`` (one per stage, the first all ones), ``upsample_kernel_size``
    (``strides[1:]``), ``filters`` (32 x 2^stage, at most 320) and ``deep_supr_num`` (every decoder output but
    the lowest two: nnU-Net) of the plan's ``patch_size`` patches."""
    return {"kernel_size": [list(k) for k in plan.kernel_sizes], "strides": [list(s) for s in plan.strides],
            "upsample_kernel_size": [list(s) for s in plan.strides[1:]], "filters": list(plan.filters),
            "deep_supr_num": max(1, len(plan.strides) - 2)}


def dynunet_bundle_kwargs(kwargs: dict) -> dict:
    """build_dynunet's arguments -> ``monai.networks.nets.DynUNet``'s (its names and its one derived default)."""
    kwargs = dict(kwargs)
    kwargs["norm_name"] = kwargs.pop("norm")
    if kwargs["upsample_kernel_size"] is None:
        kwargs["upsample_kernel_size"] = list(kwargs["strides"])[1:]
    return kwargs


SPEC = register(ModelSpec(
    name="dynunet", build=build_dynunet, network_types=(DynUNet,), sampling="patch", presets=dynunet_presets,
    heads=dynunet_heads, plan_fields=dynunet_plan_fields,
    bundle_network="DynUNet", bundle_kwargs=dynunet_bundle_kwargs,
))
