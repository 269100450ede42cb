"""Geometry of the base layers adapters attach to, and forward passes with a replacement weight.

Every method works on one *canonical* weight layout, ``(Cout, Cin, *kernel)`` (``(out, in)`` for
``nn.Linear``, i.e. a convolution with no spatial dims). ``nn.ConvTranspose*`` stores its weight as
``(Cin, Cout, *kernel)``; :meth:`LayerSpec.canonical` / :meth:`LayerSpec.to_base` swap the first two
dims so that the same update rules apply. ``M(W)`` in the docstrings is the matrix view
``Cout x (Cin * prod(kernel))`` of the canonical layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_TRANSPOSE_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LayerSpec:
    """Shape facts of one base layer.

    Attributes:
        kind: ``"linear"``, ``"conv"`` or ``"conv_transpose"``.
        cout, cin: output and input channels (features).
        kernel: spatial kernel size, ``()`` for linear.
    """

    kind: str
    cout: int
    cin: int
    kernel: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """Number of spatial dims d (0 for linear)."""
        return len(self.kernel)

    @property
    def fan_in(self) -> int:
        """Columns of M(W): Cin * prod(kernel)."""
        return self.cin * math.prod(self.kernel)

    @property
    def max_rank(self) -> int:
        """Rank of M(W) at most: min(Cout, Cin * prod(kernel))."""
        return min(self.cout, self.fan_in)

    @property
    def shape(self) -> tuple[int, ...]:
        """Canonical weight shape (Cout, Cin, *kernel)."""
        return (self.cout, self.cin, *self.kernel)

    def canonical(self, weight: torch.Tensor) -> torch.Tensor:
        """Base-layout weight -> canonical (Cout, Cin, *kernel) (a view)."""
        return weight.transpose(0, 1) if self.kind == "conv_transpose" else weight

    def to_base(self, weight: torch.Tensor) -> torch.Tensor:
        """Canonical weight -> the base layer's own layout (a view)."""
        return weight.transpose(0, 1) if self.kind == "conv_transpose" else weight

    def channel_view(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-output-channel vector over the layer's *output* y."""
        return (-1,) if self.kind == "linear" else (-1,) + (1,) * self.ndim


def spec_of(module: nn.Module, name: str = "") -> LayerSpec:
    """The :class:`LayerSpec` of a supported layer; a clear error for anything else.

    Raises:
        TypeError: the module is not Linear / Conv1-3d / ConvTranspose1-3d.
        ValueError: a grouped convolution (groups > 1).
    """
    where = f"module '{name}'" if name else "module"
    if not isinstance(module, SUPPORTED_LAYERS):
        supported = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
        raise TypeError(f"{where} is a {type(module).__name__}; adapters support {supported}")
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.out_features, module.in_features, ())
    if module.groups != 1:
        raise ValueError(
            f"{where} is a grouped {type(module).__name__} (groups={module.groups}); "
            "adapters support groups=1 only (exclude it from the targets)"
        )
    kind = "conv_transpose" if isinstance(module, nn.modules.conv._ConvTransposeNd) else "conv"
    return LayerSpec(kind, module.out_channels, module.in_channels, tuple(module.kernel_size))


def forward_with_weight(
    base: nn.Module, spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor, output_size=None
) -> torch.Tensor:
    """``base(x)`` computed with ``weight`` (base layout) in place of ``base.weight``; same bias,
    stride, padding (including non-zero padding modes), dilation and output padding."""
    if spec.kind == "linear":
        return F.linear(x, weight, base.bias)
    if spec.kind == "conv":
        return base._conv_forward(x, weight, base.bias)
    output_padding = base._output_padding(
        x, output_size, base.stride, base.padding, base.kernel_size, spec.ndim, base.dilation
    )
    return _CONV_TRANSPOSE_FN[spec.ndim](
        x, weight, base.bias, base.stride, base.padding, output_padding, base.groups, base.dilation
    )


def conv_nd(spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor, **kwargs) -> torch.Tensor:
    """Plain zero-padded convolution of the layer's dimensionality (F.linear for linear layers)."""
    if spec.kind == "linear":
        return F.linear(x, weight)
    return _CONV_FN[spec.ndim](x, weight, **kwargs)


def base_conv_kwargs(base: nn.Module) -> dict:
    """stride / padding / dilation of a conv base layer, for :func:`conv_nd`."""
    return {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}


def supports_activation_space(base: nn.Module, spec: LayerSpec) -> bool:
    """Activation-space forms run extra small convs beside the frozen one; they reproduce the base
    geometry only for Linear and zero-padded, non-transposed convs."""
    if spec.kind == "linear":
        return True
    return spec.kind == "conv" and base.padding_mode == "zeros"


def output_positions(base: nn.Module, spec: LayerSpec, x: torch.Tensor) -> int:
    """Number of output positions (batch x spatial, or tokens for linear) the layer computes for ``x``."""
    if spec.kind == "linear":
        return x.numel() // spec.cin
    batch = x.numel() // (spec.cin * math.prod(x.shape[-spec.ndim :]))
    spatial = x.shape[-spec.ndim :]
    if spec.kind == "conv_transpose":
        out = [
            (n - 1) * s - 2 * p + d * (k - 1) + 1
            for n, s, p, d, k in zip(spatial, base.stride, base.padding, base.dilation, spec.kernel)
        ]
    elif isinstance(base.padding, str):
        out = list(spatial) if base.padding == "same" else [
            (n - d * (k - 1) - 1) // s + 1 for n, s, d, k in zip(spatial, base.stride, base.dilation, spec.kernel)
        ]
    else:
        out = [
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, s, p, d, k in zip(spatial, base.stride, base.padding, base.dilation, spec.kernel)
        ]
    return batch * math.prod(out)


def low_rank_forward(base: nn.Module, spec: LayerSpec, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Activation-space form of M(dW) = up @ down (up: Cout x k, down: k x Cin*prod(kernel)):
    a conv Cin -> k with the base kernel, stride, padding and dilation, then a 1x1 conv k -> Cout."""
    k = down.shape[0]
    if spec.kind == "linear":
        return F.linear(F.linear(x, down), up)
    hidden = conv_nd(spec, x, down.reshape(k, spec.cin, *spec.kernel), **base_conv_kwargs(base))
    return conv_nd(spec, hidden, up.reshape(spec.cout, k, *(1,) * spec.ndim))
