"""Network topology from spacing and patch: nnU-Net v2's ``get_pool_and_conv_props``, its patch-size search
and its batch size, with a voxel budget standing in for its GPU-memory estimate.

* topology (:func:`pooling_topology`): an axis is pooled (stride 2) while its feature-map size is >= 8 and
  its spacing is within 2x of the finest; kernels are 3, or 1 on an axis while its spacing is >= 2x the
  finest (1x3x3 for thick slices); the patch is padded to a multiple of 2^(poolings) per axis.
* patch (:func:`fit_patch`): start from the spacing's aspect ratio scaled to an initial voxel count, clipped
  to the median shape; while it holds more than the voxel budget, shrink the axis that is largest relative
  to the median shape by one divisor step.
* batch size (:func:`batch_for_budget`): reference batch x budget / patch voxels, at most 5% of the
  dataset's voxels per batch, at least 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .fingerprint import MIN_FEATURE_MAP

REFERENCE_GB = 8.0                # nnU-Net's reference GPU memory
REFERENCE_PATCH_VOXELS = 128**3   # 3D patch voxels at batch REFERENCE_BATCH_3D in REFERENCE_GB
REFERENCE_SLICE_PIXELS = 512**2   # 2D slice pixels at batch REFERENCE_BATCH_2D in REFERENCE_GB
REFERENCE_BATCH_3D, REFERENCE_BATCH_2D = 2, 12
MIN_BATCH_SIZE = 2
MAX_DATASET_FRACTION = 0.05       # one batch covers at most this share of the dataset's voxels
BASE_FILTERS, MAX_FILTERS_3D, MAX_FILTERS_2D = 32, 320, 512
INITIAL_VOXELS = {3: 256.0**3, 2: 2048.0**2}  # nnU-Net's patch search starts from this many voxels


def pooling_topology(
    spacing: Sequence[float], patch_size: Sequence[int], min_feature_map: int = MIN_FEATURE_MAP
) -> tuple[list[int], list[list[int]], list[list[int]], list[int]]:
    """nnU-Net's ``get_pool_and_conv_props``: poolings per axis, strides and kernels per stage, padded patch.

    Each round pools (stride 2) the axes whose size is >= 2 x `min_feature_map` and whose spacing is within
    2x of the finest of those (a lone axis only while its size is >= 3 x `min_feature_map`), doubling
    their spacing. An axis's kernel is 3 from the first stage where its spacing is within 2x of the finest,
    1 before (nnU-Net compares the spacings of the size-valid axes here by position; this uses each axis's
    own spacing, which is what that code means). The bottleneck's kernel is 3. ``strides[0]`` is all ones;
    the patch is padded up to a multiple of 2^poolings per axis.

    Example: spacing (1, 1, 1), patch (36, 50, 35) -> 3 poolings per axis, 4 stages of kernel 3, patch
    (40, 56, 40).
    """
    dims = len(spacing)
    current, size = [float(s) for s in spacing], [int(s) for s in patch_size]
    pools, strides, kernels, kernel = [0] * dims, [[1] * dims], [], [1] * dims
    while True:
        valid = [i for i in range(dims) if size[i] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(current[i] for i in valid)
        valid = [i for i in valid if current[i] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * min_feature_map:
            break
        kernel = [3 if kernel[d] == 3 or current[d] / min(current) < 2 else 1 for d in range(dims)]
        for i in valid:
            pools[i] += 1
            current[i] *= 2
            size[i] = math.ceil(size[i] / 2)
        strides.append([2 if i in valid else 1 for i in range(dims)])
        kernels.append(kernel)
    kernels.append([3] * dims)
    padded = [math.ceil(s / 2**p) * 2**p for s, p in zip(patch_size, pools)]
    return pools, strides, kernels, padded


def fit_patch(
    spacing: Sequence[float], median_shape: Sequence[int], budget: int, initial_voxels: float
) -> tuple[list[int], list[int], list[list[int]], list[list[int]]]:
    """nnU-Net's patch-size search with a voxel budget: (patch, poolings per axis, strides, kernels).

    Start from the aspect ratio 1 / spacing scaled to `initial_voxels`, clipped to `median_shape`; while the
    (padded) patch holds more than `budget` voxels, shrink the axis that is largest relative to the median
    shape by its divisor 2^poolings (recomputed on the shrunk size, as nnU-Net does).
    """
    dims = len(spacing)
    if budget < 16**dims:
        raise ValueError(f"patch budget {budget} voxels is too small; at least 16^{dims} = {16**dims} are needed")
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    initial = np.round(inverse * (initial_voxels / np.prod(inverse)) ** (1.0 / dims)).astype(int)
    patch = [max(1, min(int(i), int(m))) for i, m in zip(initial, median_shape)]
    pools, strides, kernels, patch = pooling_topology(spacing, patch)
    while math.prod(patch) > budget:
        ratios = [p / max(m, 1) for p, m in zip(patch, median_shape)]
        axis = max(i for i in range(dims) if ratios[i] == max(ratios))
        shrunk = list(patch)
        shrunk[axis] -= 2 ** pools[axis]
        step = 2 ** pooling_topology(spacing, shrunk)[0][axis]
        patch = list(patch)
        patch[axis] -= step
        if patch[axis] < 1:
            raise ValueError(f"cannot fit a patch into {budget} voxels (median shape {list(median_shape)})")
        pools, strides, kernels, patch = pooling_topology(spacing, patch)
    return patch, pools, strides, kernels


def batch_for_budget(patch: Sequence[int], budget: int, reference_batch: int, dataset_voxels: float) -> int:
    """reference_batch x budget / patch voxels, capped at 5% of the dataset's voxels, at least 2 (nnU-Net)."""
    voxels = math.prod(patch)
    by_memory = round(reference_batch * budget / voxels)
    by_dataset = round(dataset_voxels * MAX_DATASET_FRACTION / voxels)
    return max(min(by_memory, by_dataset), MIN_BATCH_SIZE)


def stage_filters(stages: int, base: int, maximum: int) -> list[int]:
    return [min(base * 2**i, maximum) for i in range(stages)]
