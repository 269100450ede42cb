"""Metrics against hand-computed values on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segadapt.training import bin_labels, case_metrics, mask_volume_ml, summarize, volume_bin, voxel_volume_ml

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _affine(spacing):
    return np.diag([*spacing, 1.0])


def test_dice_of_overlapping_boxes():
    truth = torch.zeros(8, 8, 8)
    truth[1:5, 1:5, 1:3] = 1  # 32 voxels
    pred = torch.zeros(8, 8, 8)
    pred[3:7, 1:5, 1:3] = 1  # 32 voxels, 16 shared
    row = case_metrics(pred, truth, _affine([1, 1, 1]))
    assert row["dice"] == pytest.approx(2 * 16 / (32 + 32))


def test_hd95_of_two_points_is_their_distance_in_mm():
    truth, pred = torch.zeros(6, 6, 6), torch.zeros(6, 6, 6)
    truth[0, 0, 0] = 1
    pred[3, 4, 0] = 1
    assert case_metrics(pred, truth, _affine([1, 1, 1]))["hd95"] == pytest.approx(5.0)
    # anisotropic spacing: (3 * 2 mm, 4 * 0.5 mm) apart
    assert case_metrics(pred, truth, _affine([2.0, 0.5, 3.0]))["hd95"] == pytest.approx(math.hypot(6.0, 2.0))


def test_hd95_is_the_larger_directed_percentile_not_the_pooled_one():
    """truth {a}, prediction {a, b} 5 mm apart: directed distances pred->truth [0, 5], truth->pred [0];
    max of the directed 95th percentiles = 4.75 (the pooled [0, 5, 0] would give 4.5)."""
    truth, pred = torch.zeros(8, 8, 8), torch.zeros(8, 8, 8)
    truth[0, 0, 0] = pred[0, 0, 0] = pred[5, 0, 0] = 1
    assert case_metrics(pred, truth, _affine([1, 1, 1]))["hd95"] == pytest.approx(np.percentile([0.0, 5.0], 95))


def test_empty_masks():
    empty, box = torch.zeros(4, 4, 4), torch.zeros(4, 4, 4)
    box[1:3, 1:3, 1:3] = 1
    both = case_metrics(empty, empty, _affine([1, 1, 1]))
    assert both["dice"] == 1.0 and both["hd95"] == 0.0
    missed = case_metrics(empty, box, _affine([1, 1, 1]))
    assert missed["dice"] == 0.0 and math.isnan(missed["hd95"])


def test_volume_in_ml_with_known_spacing():
    mask = np.zeros((10, 10, 10))
    mask[:5, :4, :2] = 1  # 40 voxels of 2 x 2.5 x 4 mm = 20 mm^3 -> 800 mm^3 = 0.8 mL
    affine = _affine([2.0, 2.5, 4.0])
    assert voxel_volume_ml(affine) == pytest.approx(0.02)
    assert mask_volume_ml(mask, affine) == pytest.approx(0.8)
    row = case_metrics(torch.as_tensor(mask), torch.as_tensor(mask), affine)
    assert row["pred_ml"] == pytest.approx(0.8) and row["true_ml"] == pytest.approx(0.8)
    rotated = affine.copy()
    rotated[:3, :3] = rotated[:3, :3] @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])  # a rotation keeps the volume
    assert mask_volume_ml(mask, rotated) == pytest.approx(0.8)


def test_volume_bins():
    edges = [0, 5, 15, 30, math.inf]
    assert [volume_bin(v, edges) for v in (0.0, 4.99, 5.0, 14.9, 29.0, 30.0, 1e6)] == [0, 0, 1, 1, 2, 3, 3]
    assert volume_bin(-1.0, edges) is None
    assert bin_labels(edges) == ["0-5 mL", "5-15 mL", "15-30 mL", ">=30 mL"]
    with pytest.raises(ValueError, match="increasing"):
        bin_labels([0, 5, 5])


def test_summary_matches_numpy():
    cases = [
        {"dice": 0.2, "hd95": 10.0, "pred_ml": 1.0, "true_ml": 2.0},
        {"dice": 0.6, "hd95": math.nan, "pred_ml": 9.0, "true_ml": 8.0},
        {"dice": 0.9, "hd95": 4.0, "pred_ml": 22.0, "true_ml": 20.0},
        {"dice": 0.7, "hd95": 6.0, "pred_ml": 35.0, "true_ml": 40.0},
    ]
    s = summarize(cases, [0, 5, 15, math.inf])
    dice = np.array([0.2, 0.6, 0.9, 0.7])
    assert s["dice"] == pytest.approx(dice.mean()) and s["dice_sd"] == pytest.approx(dice.std(ddof=1))
    assert s["hd95"] == pytest.approx(np.mean([10.0, 4.0, 6.0])) and s["hd95_undefined"] == 1
    assert s["volume_corr"] == pytest.approx(np.corrcoef([1, 9, 22, 35], [2, 8, 20, 40])[0, 1])
    assert s["volume_abs_err_ml"] == pytest.approx(np.mean([1, 1, 2, 5]))
    assert (s["dice_bin0"], s["dice_bin1"], s["dice_bin2"]) == pytest.approx((0.2, 0.6, 0.8))
    assert (s["n_bin0"], s["n_bin1"], s["n_bin2"]) == (1, 1, 2)


def test_2d_sizes_are_named_by_their_unit_and_old_rows_still_read():
    from segadapt.training.metrics import abs_error, case_sizes, case_unit

    mask = torch.zeros(6, 8)
    mask[1:3, 2:5] = 1  # 6 pixels
    truth = torch.zeros(6, 8)
    truth[1:4, 2:5] = 1  # 9 pixels
    px = case_metrics(mask, truth, torch.eye(4, dtype=torch.float64), "px")
    assert (px["pred_px"], px["true_px"]) == (6, 9) and "pred_ml" not in px and case_unit(px) == "px"
    mm2 = case_metrics(mask, truth, torch.diag(torch.tensor([0.5, 2.0, 1.0, 1.0], dtype=torch.float64)))
    assert (mm2["pred_mm2"], mm2["true_mm2"]) == (6.0, 9.0)  # 1 mm^2 pixels, the default unit in 2D
    summary = summarize([px, {**px, "pred_px": 12.0}], [0, 10, math.inf])
    assert summary["area_abs_err_px"] == pytest.approx(np.mean([3, 3])) and "volume_abs_err_ml" not in summary
    assert abs_error(summary) == summary["area_abs_err_px"] and summary["n_bin0"] == 2
    # a row of a metrics.json written before (every unit under *_ml) reads as it did
    old = {"dice": 0.5, "hd95": 1.0, "pred_ml": 6.0, "true_ml": 9.0}
    assert case_sizes(old) == (6.0, 9.0) and abs_error(summarize([old], [0, math.inf])) == 3.0


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="differs"):
        case_metrics(torch.zeros(4, 4, 4), torch.zeros(4, 4, 5), _affine([1, 1, 1]))
