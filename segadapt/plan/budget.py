"""The compute budget: the planned DynUNet sized to the machine's time per training step.

On a GPU the plan keeps nnU-Net's full size (its memory budget, ``plan.memory_gb``). On a CPU one training
step of the planned network is measured once (forward, backward and AdamW step on random data at batch 2,
the fastest of :data:`TIMED_STEPS` after one warm-up step, at the run's thread count, x batch / 2 for the
planned batch: on a CPU the time goes with the samples; the fastest step is the one least slowed by other
processes) and cached beside the plan (``step_time.json``), so a resume or a test re-plans to the same
values. When it is slower than the budget ``plan.step_s``, the network shrinks in these steps, each only
while the predicted step is over budget:

1. batch: halved, down to nnU-Net's minimum of 2. On a CPU the time per sample hardly depends on the batch,
   so a smaller batch buys more optimiser steps in the same time and costs no sample seen per second;
2. filters: halved (every stage), down to :data:`MIN_BASE_FILTERS` in the first stage: the time goes with
   the filters squared, the Dice far less (the hippocampus benchmark: 16..128 gave 0.897 on the source);
3. patch: nnU-Net's own shrink (:func:`~segadapt.plan.topology.fit_patch` with a smaller voxel budget, one
   divisor step of the axis largest relative to the median shape), down to :data:`MIN_PATCH_SHARE` of the
   planned patch's voxels; the topology follows the patch. Last and bounded, because the patch is the
   network's context, and because a smaller patch saves no training time: the schedule
   (:mod:`segadapt.plan.schedule`) gives more steps to tile the volumes.

A network that is still over the budget at these limits is kept and said so (a busy machine measures slow:
the cached time can be replaced with ``plan.measured_step_s``).

The step time of a shrunk network is predicted, not measured again: the measured time x the ratio of
:func:`conv_cost` (batch x sum over stages of voxels x filters^2). Every change is printed with its reason.

The default budget, :data:`CPU_STEP_S` = 0.5 s, follows from the user's time, not from a dataset: a fold of
one method should train in about 2 minutes of one core at the shortest schedule (``MIN_STEPS`` = 250 steps,
:mod:`segadapt.plan.schedule`), so that the standard comparison (3 folds x 6 methods) fits into an hour.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from segadapt.io import write_json

from .planner import Plan
from .topology import INITIAL_VOXELS, MIN_BATCH_SIZE, fit_patch

CPU_STEP_S = 0.5
MIN_BASE_FILTERS = 16
MIN_PATCH_VOXELS = 16**3
MIN_PATCH_SHARE = 0.5
TIMED_STEPS = 3
STEP_TIME_FILE = "step_time.json"


def conv_cost(patch: Sequence[int], strides: Sequence[Sequence[int]], filters: Sequence[int], batch: int) -> float:
    """batch x sum over stages of (voxels at the stage x filters^2): the convolutions' share of a U-Net step."""
    size, cost = [float(p) for p in patch], 0.0
    for stride, width in zip(strides, filters):
        size = [s / st for s, st in zip(size, stride)]
        cost += math.prod(size) * width**2
    return batch * cost


def _cost(plan: Plan) -> float:
    return conv_cost(plan.patch_size, plan.strides, plan.filters, plan.batch_size)


def measure_step(network: Mapping, in_channels: int, patch: Sequence[int], batch: int) -> float:
    """Seconds of one training step of ``build_dynunet(**network)`` at `batch` (see the module doc)."""
    import torch

    from segadapt.models.dynunet import build_dynunet

    net = build_dynunet(in_channels=in_channels, spatial_dims=len(patch), **network)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    measured = min(batch, MIN_BATCH_SIZE)
    image = torch.randn(measured, in_channels, *patch, generator=generator)
    times = []
    for _ in range(TIMED_STEPS + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        output = net(image)
        output.float().square().mean().backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:]) * batch / measured


def cached_step_time(folder: Path, key: Mapping, measure: Callable[[], float]) -> float:
    """The step time of `key` cached in ``folder/step_time.json``; `measure()` it (and cache it) when absent."""
    path = Path(folder) / STEP_TIME_FILE
    cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if digest not in cache:
        cache[digest] = {"key": dict(key), "seconds": measure()}
        write_json(path, cache)
    return float(cache[digest]["seconds"])


def fit_step_budget(plan: Plan, step_s: float, measured_s: float) -> tuple[Plan, list[str]]:
    """A copy of `plan` shrunk until its predicted CPU step fits `step_s` (the steps of the module doc), and
    the lines that say what changed and why. `measured_s`: the step of `plan`'s own network."""
    if not step_s > 0 or not measured_s > 0:
        raise ValueError(f"plan.step_s and the measured step time must be > 0 s, got {step_s} and {measured_s}")
    shrunk, reference = copy.deepcopy(plan), _cost(plan)
    lines = [f"CPU step of the planned network (batch {plan.batch_size}, filters {plan.filters}, patch "
             f"{plan.patch_size}): {measured_s:.3g} s measured; budget plan.step_s={step_s:g} s"]

    def predicted() -> float:
        return measured_s * _cost(shrunk) / reference

    def change(name: str, old: object, new: object, why: str) -> None:
        lines.append(f"{name}: {old} -> {new} ({why}; predicted step {predicted():.3g} s)")

    while predicted() > step_s and shrunk.batch_size > MIN_BATCH_SIZE:
        old, shrunk.batch_size = shrunk.batch_size, max(MIN_BATCH_SIZE, shrunk.batch_size // 2)
        change("batch_size", old, shrunk.batch_size, "over the step budget; the time per sample stays")
    while predicted() > step_s and shrunk.filters[0] > MIN_BASE_FILTERS:
        old, shrunk.filters = shrunk.filters, [max(1, f // 2) for f in shrunk.filters]
        change("filters", old, shrunk.filters, "over the step budget; the time goes with filters^2")
    smallest = max(MIN_PATCH_VOXELS, MIN_PATCH_SHARE * math.prod(plan.patch_size))
    while predicted() > step_s:
        old = list(shrunk.patch_size)
        if not _shrink_patch(shrunk, smallest):
            break
        change("patch_size", old, shrunk.patch_size, "over the step budget; nnU-Net's patch search on fewer voxels")
    if predicted() > step_s:
        lines.append(f"the smallest network this allows still needs {predicted():.3g} s per step: over the budget")
    shrunk.budget = {**plan.budget, "step_s": float(step_s), "measured_step_s": float(measured_s),
                     "predicted_step_s": float(predicted())}
    shrunk.notes = [*plan.notes, *lines]
    return shrunk, lines


def _shrink_patch(plan: Plan, smallest: float) -> bool:
    """The patch nnU-Net's search (:func:`fit_patch`) gives for a voxel budget just below the current patch, in
    place, with its topology; False when it would hold fewer than `smallest` voxels. (A config that pins a
    larger patch stays valid with the planned strides: fewer poolings divide it too.)"""
    voxels = math.prod(plan.patch_size)
    try:
        patch, pools, strides, kernels = fit_patch(plan.target_spacing, plan.median_shape, voxels - 1,
                                                   INITIAL_VOXELS[len(plan.patch_size)])
    except ValueError:
        return False
    if math.prod(patch) < smallest:
        return False
    plan.patch_size, plan.pools_per_axis, plan.strides, plan.kernel_sizes = patch, pools, strides, kernels
    plan.filters = plan.filters[:len(strides)]  # a smaller patch pools no more often: as many stages or fewer
    return True
