"""``compute="auto"`` by measurement: which computation order is faster for one layer, timed once.

At the first call for a given key -- method, layer shape and geometry, input shape, dtype, device,
autocast dtype, whether the step trains (and whether the input needs a gradient), torch's thread count --
both orders of the adapter are run and timed (CPU time on CPU) on the call's own input (detached: nothing reaches the autograd graph,
the parameters' ``.grad`` or the random number generators), forward plus, in training, the backward
products a training step needs, and the faster one is kept for every later call with the same key (in
memory, for the process). Both orders compute the same function; only the floating-point rounding of
the output can differ between them.

``SEGADAPT_AUTO_COMPUTE=cost_model`` (the test suite sets it) switches measurement off: auto then uses
the FLOP model of :meth:`Adapter.uses_activation_space` -- deterministic, machine-independent. The FLOP
model also stands in where timing is impossible: while ``torch.compile`` traces, under ``torch.func``
transforms, and on meta tensors.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

ENV_VAR = "SEGADAPT_AUTO_COMPUTE"
MODES = ("measure", "cost_model")
REPEATS = 2  # timed runs per order, after one warm-up run; the minimum counts

_decisions: dict[tuple, bool] = {}


def mode() -> str:
    """``measure`` (default) or ``cost_model``, from ``$SEGADAPT_AUTO_COMPUTE`` (set but empty: as unset, the shell's
    way of clearing a variable for one command)."""
    value = os.environ.get(ENV_VAR) or "measure"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(MODES)}")
    return value


def can_measure(x: torch.Tensor) -> bool:
    """False where no honest timing exists (compile tracing, functorch transforms, meta tensors)."""
    if x.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)


def decision_key(adapter: nn.Module, base: nn.Module, x: torch.Tensor) -> tuple:
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    geometry = tuple(getattr(base, name, None) for name in ("stride", "padding", "dilation"))
    training = torch.is_grad_enabled() and any(p.requires_grad for p in adapter.parameters())
    return (type(adapter).__name__, adapter.spec, adapter.branch_rank(), geometry, tuple(x.shape), x.dtype, str(x.device),
            autocast, training, training and x.requires_grad, torch.get_num_threads())


def measure_order(adapter: nn.Module, base: nn.Module, x: torch.Tensor, activation: bool) -> float:
    """Seconds (CPU time on CPU, wall time elsewhere) of the fastest of ``REPEATS`` runs of one order (after a
    warm-up): forward, and in training the gradients of the adapter's parameters (and of x where it needs
    one) via ``torch.autograd.grad``."""
    params = [p for p in adapter.parameters() if p.requires_grad]
    training = torch.is_grad_enabled() and bool(params)
    inputs = x.detach().requires_grad_(training and x.requires_grad)
    wrt = params + ([inputs] if inputs.requires_grad else [])
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    # on CPU this process's CPU time (all torch threads): other processes' load does not inflate it
    timer = time.process_time if x.device.type == "cpu" else time.perf_counter
    best = float("inf")
    for run in range(REPEATS + 1):
        sync()
        start = timer()
        y = adapter.run_order(base, inputs, activation)
        if training:
            torch.autograd.grad(y, wrt, grad_outputs=torch.ones_like(y))
        sync()
        if run > 0:
            best = min(best, timer() - start)
        del y
    return best


def measured_choice(adapter: nn.Module, base: nn.Module, x: torch.Tensor) -> bool:
    """True if activation space measured faster for this key (measured at the key's first call)."""
    key = decision_key(adapter, base, x)
    if key not in _decisions:
        activation = measure_order(adapter, base, x, True)
        weight = measure_order(adapter, base, x, False)
        _decisions[key] = activation < weight
    return _decisions[key]


def clear() -> None:
    """Forget every measured decision (e.g. after changing the thread count or the machine's load)."""
    _decisions.clear()
