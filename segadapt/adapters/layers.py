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
from typing import Optional

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
    """Plain zero-padded convolution of the (conv) layer's dimensionality."""
    return _CONV_FN[spec.ndim](x, weight, **kwargs)


def base_conv_kwargs(base: nn.Module) -> dict:
    """stride / padding / dilation of a conv base layer, for :func:`conv_nd`."""
    return {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}


def supports_activation_space(base: nn.Module, spec: LayerSpec) -> bool:
    """Activation-space forms run a low-rank branch beside the frozen layer; they reproduce the base
    geometry for Linear and for zero-padded, non-transposed convs with a symmetric padding."""
    return spec.kind == "linear" or explicit_padding(base, spec) is not None


def output_positions(base: nn.Module, spec: LayerSpec, x: torch.Tensor) -> int:
    """Number of output positions (batch x spatial, or tokens for linear) the layer computes for ``x``
    (linear and conv layers: those with an activation-space form)."""
    if spec.kind == "linear":
        return x.numel() // spec.cin
    batch = x.numel() // (spec.cin * math.prod(x.shape[-spec.ndim :]))
    spatial = x.shape[-spec.ndim :]
    if isinstance(base.padding, str):
        out = list(spatial) if base.padding == "same" else [
            (n - d * (k - 1) - 1) // s + 1 for n, s, d, k in zip(spatial, base.stride, base.dilation, spec.kernel)
        ]
    else:
        out = [
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, s, p, d, k in zip(spatial, base.stride, base.padding, base.dilation, spec.kernel)
        ]
    return batch * math.prod(out)


def explicit_padding(base: nn.Module, spec: LayerSpec) -> Optional[tuple[int, ...]]:
    """The base conv's zero padding as one int per spatial dim (``"same"``/``"valid"`` resolved), or
    ``None`` where it cannot be written so (asymmetric "same" padding, non-zero padding modes)."""
    if spec.kind != "conv" or base.padding_mode != "zeros":
        return None
    if not isinstance(base.padding, str):
        return tuple(base.padding)
    if base.padding == "valid":
        return (0,) * spec.ndim
    total = [d * (k - 1) for d, k in zip(base.dilation, spec.kernel)]
    return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)


class FrozenPlusLowRank(torch.autograd.Function):
    """y = conv(x, W0) + up(conv(x, down)) without the bias: the frozen layer and the low-rank branch.

    The frozen W0 (Cout rows) and the down weights (k rows) run as ONE convolution (or matmul for
    linear layers) of Cout + k output channels, so the narrow down-projection shares the wide conv's
    pass over the input instead of running as a separate, memory-bound conv. The backward runs one
    input-gradient conv through [W0; down] and the weight gradient of ``down`` alone.

    Written by hand because autograd, given the concatenated weight, would also compute the weight
    gradient of W0 (the full fine-tuning cost this form exists to avoid).

    Shapes: x (N, Cin, *S) or (..., Cin); w0 (Cout, Cin, *kernel); down (k, Cin, *kernel);
    up (Cout, k). ``geometry`` = (stride, padding, dilation) for convs, ``None`` for linear.

    Written in the ``setup_context`` style so that ``torch.func`` transforms (``grad``, ``vjp``) apply;
    ``forward`` returns the hidden k-channel activation as a second, non-differentiable output for the
    backward (:func:`frozen_plus_low_rank` returns y only).
    """

    @staticmethod
    def forward(x, w0, down, up, geometry):
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, w0, down, up = (t.to(dtype) for t in (x, w0, down, up))
        with torch.autocast(device, enabled=False):
            weight = torch.cat([w0, down])
            cout, k = up.shape
            if geometry is None:
                out = x @ weight.t()
                base_out, hidden = out.split([cout, k], dim=-1)
                y = torch.addmm(base_out.reshape(-1, cout), hidden.reshape(-1, k), up.t()).view(base_out.shape)
                hidden = hidden.contiguous()
            else:
                stride, padding, dilation = geometry
                out = torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, False, [0] * len(stride), 1)
                base_out, hidden = out.split([cout, k], dim=1)
                n = out.shape[0]
                y = torch.baddbmm(base_out.reshape(n, cout, -1), up.expand(n, cout, k), hidden.reshape(n, k, -1))
                y = y.view(base_out.shape)
                hidden = hidden.clone()  # its own storage, so the conv's output can be freed
        return y, hidden, weight

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w0, down, up, geometry = inputs
        _, hidden, weight = output
        ctx.dtypes = (x.dtype, down.dtype, up.dtype)
        ctx.geometry = geometry
        ctx.mark_non_differentiable(hidden, weight)
        # x and up as the forward used them (cast under autocast): the weight already is
        x_used = x.to(weight.dtype) if x.dtype != weight.dtype else x
        up_used = up.to(weight.dtype) if up.dtype != weight.dtype else up
        ctx.save_for_backward(x_used, weight, hidden, up_used)

    @staticmethod
    def backward(ctx, grad_y, _grad_hidden, _grad_weight):
        x, weight, hidden, up = ctx.saved_tensors
        geometry = ctx.geometry
        grad_y = grad_y.to(hidden.dtype)
        cout, k = up.shape
        grad_x = grad_down = None
        if geometry is None:
            grad_y2, hidden2 = grad_y.reshape(-1, cout), hidden.reshape(-1, k)
            grad_up = grad_y2.t() @ hidden2
            grad_hidden = grad_y2 @ up
            if ctx.needs_input_grad[0]:
                grad_x = (torch.cat([grad_y2, grad_hidden], dim=1) @ weight).view(x.shape)
            if ctx.needs_input_grad[2]:
                grad_down = grad_hidden.t() @ x.reshape(-1, x.shape[-1])
        else:
            stride, padding, dilation = geometry
            n = grad_y.shape[0]
            grad_y3, hidden3 = grad_y.reshape(n, cout, -1), hidden.reshape(n, k, -1)
            grad_up = (grad_y3 @ hidden3.transpose(1, 2)).sum(0)
            grad_hidden = (up.t() @ grad_y3).view(n, k, *grad_y.shape[2:])
            zeros = [0] * len(stride)
            if ctx.needs_input_grad[0]:
                grad_x = torch.ops.aten.convolution_backward(
                    torch.cat([grad_y, grad_hidden], dim=1), x, weight, None, stride, padding, dilation, False, zeros, 1, [True, False, False]
                )[0]
            if ctx.needs_input_grad[2]:
                grad_down = torch.ops.aten.convolution_backward(
                    grad_hidden, x, weight[cout:], None, stride, padding, dilation, False, zeros, 1, [False, True, False]
                )[1]
        x_dtype, down_dtype, up_dtype = ctx.dtypes
        return (
            None if grad_x is None else grad_x.to(x_dtype),
            None,
            None if grad_down is None else grad_down.to(down_dtype),
            grad_up.to(up_dtype) if ctx.needs_input_grad[3] else None,
            None,
        )


def frozen_plus_low_rank(base: nn.Module, spec: LayerSpec, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Activation-space form of M(W) = M(W0) + up @ down (up: Cout x k, down: k x Cin*prod(kernel)),
    *without* the bias: conv(x, W0) + a conv Cin -> k with the base geometry followed by a 1x1 conv
    k -> Cout, computed by :class:`FrozenPlusLowRank`."""
    w0 = spec.canonical(base.weight)
    down = down.reshape(down.shape[0], *w0.shape[1:])
    if spec.kind == "linear":
        return FrozenPlusLowRank.apply(x, w0, down, up, None)[0]
    geometry = (list(base.stride), list(explicit_padding(base, spec)), list(base.dilation))
    return FrozenPlusLowRank.apply(x, w0, down, up, geometry)[0]


def frozen_output(base: nn.Module, spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """conv(x, W0) without the bias (x W0^T for linear), for zero-padded layers."""
    if spec.kind == "linear":
        return F.linear(x, base.weight)
    return conv_nd(spec, x, base.weight, **base_conv_kwargs(base))


def low_rank_forward(base: nn.Module, spec: LayerSpec, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up(down(x)) alone, as two plain ops (used when the branch sees another input than the frozen
    layer, e.g. under dropout): a conv Cin -> k with the base geometry, then a 1x1 conv k -> Cout."""
    k = down.shape[0]
    if spec.kind == "linear":
        return F.linear(F.linear(x, down), up)
    hidden = conv_nd(spec, x, down.reshape(k, spec.cin, *spec.kernel), **base_conv_kwargs(base))
    return conv_nd(spec, hidden, up.reshape(spec.cout, k, *(1,) * spec.ndim))
