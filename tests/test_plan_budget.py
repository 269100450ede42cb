"""The compute budget (segadapt.plan.budget), the schedule (segadapt.plan.schedule) and model=auto
(segadapt.plan.apply), against hand-computed values."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file

from segadapt.plan import Plan
from segadapt.plan.apply import apply_plan, planned_model, step_budget_plan
from segadapt.plan.budget import cached_step_time, conv_cost, fit_step_budget
from segadapt.plan.schedule import StepSchedule, coverage, planned_steps
from segadapt.plan.topology import fit_patch

REPO = Path(__file__).resolve().parents[1]

# the hippocampus plan's network (segadapt plan on the 30 target cases): 32..256 at 40 x 56 x 40, batch 8
HIPPOCAMPUS = Plan(
    dataset="hippocampus", n_cases=30, modality={"0": "MRI"}, spatial_dims=3, orientation="RAS",
    median_spacing=[1.0, 1.0, 1.0], target_spacing=[1.0, 1.0, 1.0], resample=False, anisotropic_axis=None,
    median_shape=[36, 50, 35], patch_size=[40, 56, 40], pools_per_axis=[3, 3, 3],
    strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 4, filters=[32, 64, 128, 256],
    batch_size=8, slice_size=[64, 64], slice_pools=3, slice_filters=[32, 64, 128, 256], slice_batch_size=24,
    intensity="mri", background_value=[0.0],
)


def test_conv_cost_is_batch_times_voxels_times_filters_squared_per_stage():
    # stage 0: 40*56*40 voxels x 32^2; stage 1: 20*28*20 x 64^2; stage 2: 10*14*10 x 128^2; stage 3: 5*7*5 x 256^2
    by_hand = 8 * (89600 * 32**2 + 11200 * 64**2 + 1400 * 128**2 + 175 * 256**2)
    assert conv_cost([40, 56, 40], HIPPOCAMPUS.strides, [32, 64, 128, 256], 8) == by_hand


def test_budget_halves_batch_then_filters_and_prints_each_change():
    # 8 s measured: batch 8 -> 4 (4 s) -> 2 (2 s), filters halved (cost / 4: 0.5 s) fits the 0.5 s budget
    shrunk, lines = fit_step_budget(HIPPOCAMPUS, step_s=0.5, measured_s=8.0)
    assert shrunk.batch_size == 2 and shrunk.filters == [16, 32, 64, 128] and shrunk.patch_size == [40, 56, 40]
    assert shrunk.budget["predicted_step_s"] == pytest.approx(0.5)
    assert lines[0].startswith("CPU step of the planned network (batch 8, filters [32, 64, 128, 256], patch "
                               "[40, 56, 40]): 8 s measured; budget plan.step_s=0.5 s")
    assert lines[1].startswith("batch_size: 8 -> 4 (over the step budget") and lines[1].endswith("predicted step 4 s)")
    assert lines[2].startswith("batch_size: 4 -> 2") and lines[2].endswith("predicted step 2 s)")
    assert lines[3].startswith("filters: [32, 64, 128, 256] -> [16, 32, 64, 128]") and lines[3].endswith("0.5 s)")
    assert len(lines) == 4 and shrunk.notes[-4:] == lines
    assert HIPPOCAMPUS.batch_size == 8  # the input plan is not changed


def test_budget_shrinks_the_patch_last_with_nnunets_search():
    shrunk, lines = fit_step_budget(HIPPOCAMPUS, step_s=0.3, measured_s=8.0)
    assert shrunk.batch_size == 2 and shrunk.filters[0] == 16
    assert math.prod(shrunk.patch_size) < 40 * 56 * 40
    # the patch nnU-Net's search gives for a voxel budget just below the last one, topology with it
    expected = fit_patch([1.0, 1.0, 1.0], [36, 50, 35], 40 * 56 * 40 - 1, 256.0**3)
    assert lines[4].startswith(f"patch_size: [40, 56, 40] -> {expected[0]}")
    predicted = 8.0 * conv_cost(shrunk.patch_size, shrunk.strides, shrunk.filters, 2) / conv_cost(
        [40, 56, 40], HIPPOCAMPUS.strides, [32, 64, 128, 256], 8)
    assert shrunk.budget["predicted_step_s"] == pytest.approx(predicted) and predicted <= 0.3


def test_the_patch_keeps_at_least_half_its_voxels_and_an_overrun_is_said():
    shrunk, lines = fit_step_budget(HIPPOCAMPUS, step_s=0.05, measured_s=8.0)
    assert shrunk.batch_size == 2 and shrunk.filters[0] == 16
    voxels = math.prod(shrunk.patch_size)
    assert 40 * 56 * 40 / 2 <= voxels and math.prod(fit_patch([1.0] * 3, [36, 50, 35], voxels - 1, 256.0**3)[0]) < 44800
    assert lines[-1].startswith("the smallest network this allows still needs") and "over the budget" in lines[-1]


def test_a_network_within_the_budget_is_kept():
    shrunk, lines = fit_step_budget(HIPPOCAMPUS, step_s=10.0, measured_s=8.0)
    assert (shrunk.batch_size, shrunk.filters, shrunk.patch_size) == (8, [32, 64, 128, 256], [40, 56, 40])
    assert len(lines) == 1


def test_the_measurement_is_cached_so_a_replan_is_deterministic(tmp_path):
    calls = []
    key = {"network": {"filters": [32, 64]}, "batch": 8}
    first = cached_step_time(tmp_path, key, lambda: calls.append(1) or 1.25)
    again = cached_step_time(tmp_path, key, lambda: calls.append(1) or 99.0)
    assert first == again == 1.25 and len(calls) == 1
    assert cached_step_time(tmp_path, {**key, "batch": 4}, lambda: 0.7) == 0.7  # another network: measured
    stored = json.loads((tmp_path / "step_time.json").read_text())
    assert sorted(v["seconds"] for v in stored.values()) == [0.7, 1.25]


def _cfg(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_step_budget_plan_uses_the_cache_unless_a_step_time_is_given(tmp_path, monkeypatch):
    from segadapt.plan import apply as apply_module

    cfg = _cfg("data=dataset_json", "data.dataset_json=x.json")
    model = planned_model(cfg)
    measured = []
    monkeypatch.setattr(apply_module, "_measure", lambda *a: measured.append(a) or 8.0)
    first = step_budget_plan(HIPPOCAMPUS, model, cfg, tmp_path)
    again = step_budget_plan(HIPPOCAMPUS, model, cfg, tmp_path)
    assert first == again and len(measured) == 1 and first.filters == [16, 32, 64, 128]
    cfg["plan"]["measured_step_s"] = 2.0  # injected: batch 8 -> 4 -> 2 (0.5 s) is enough
    injected = step_budget_plan(HIPPOCAMPUS, model, cfg, tmp_path)
    assert len(measured) == 1 and injected.batch_size == 2 and injected.filters == [32, 64, 128, 256]


def test_schedule_rule_against_hand_computed_values():
    assert coverage([36, 50, 35], [40, 56, 40]) == 1.0 and coverage([64, 64, 32], [64, 64]) == 32.0
    assert planned_steps(16, 1.0, 2) == 250                        # ceil(25 x 16 / 2) = 200 -> the floor
    assert planned_steps(147, 1.0, 2, pretraining=True) == 1838    # ceil(25 x 147 / 2)
    assert planned_steps(6, 32.0, 16) == 300                       # ceil(25 x 6 x 32 / 16)
    assert planned_steps(6, 1.0, 16, pretraining=True) == 600      # the floor from random init
    assert StepSchedule.of(300) == StepSchedule(300, 10, 50, 3)    # 6 validations, patience 3
    assert StepSchedule.of(1838) == StepSchedule(1838, 55, 300, 3)  # round(0.03 x 1838); 25 x round(12.25)
    assert StepSchedule.of(250) == StepSchedule(250, 10, 50, 3)    # 5 validations: ceil(2.5)


def _dataset(folder: Path, n: int, n_folds: int) -> Path:
    """`n` placeholder cases and an nnU-Net splits_final.json of `n_folds` equal folds (the schedule counts them)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        for kind in ("img", "lab"):
            (folder / f"{kind}{i}.nii.gz").write_bytes(f"{kind}{i}".encode())
        cases.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    path = folder / "dataset.json"
    path.write_text(json.dumps({"name": "toy", "modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "fg"},
                                "training": cases}))
    ids = [f"img{i}" for i in range(n)]
    (folder / "splits_final.json").write_text(json.dumps(
        [{"train": [c for c in ids if c not in ids[k::n_folds]], "val": ids[k::n_folds]} for k in range(n_folds)]))
    return path


def test_apply_plan_fills_the_schedule_of_the_job(tmp_path, capsys):
    cfg = _cfg("data=dataset_json", f"data.dataset_json={_dataset(tmp_path / 't', 30, 3)}",
               "data@source=dataset_json", f"source.dataset_json={_dataset(tmp_path / 's', 230, 5)}", "source.n_folds=5",
               "data.preprocess.samples_per_volume=1")
    out = apply_plan(cfg, HIPPOCAMPUS)
    assert out["data"]["batch_size"] == 8 and out["trainer"]["max_steps"] == 250  # ceil(25 x 16 / 8) = 50 -> 250
    # source: samples_per_volume auto = 1 (a patch covers its volume), batch 8: ceil(25 x 147 / 8) = 460 -> 600
    assert out["source"]["preprocess"]["samples_per_volume"] == 1 and out["pretrain"]["max_steps"] == 600
    assert (out["optim"]["warmup_steps"], out["selection"]["every_n_steps"], out["selection"]["patience"]) == (10, 50, 3)
    printed = capsys.readouterr().out
    assert ("train.max_steps=250: ceil(25 passes x 16 training cases (fold 0 of splits_final.json, the largest of "
            "its 3 folds, 20 training cases, 4 of them the inner split)") in printed
    # a pretraining started from this planned config re-plans the job keys for its own steps
    pre = apply_plan(out, HIPPOCAMPUS, pretraining=True, show=False)
    assert pre["pretrain"]["max_steps"] == 600 and pre["optim"]["warmup_steps"] == 18
    assert pre["selection"]["every_n_steps"] == 100 and pre["trainer"]["max_steps"] == 250
    assert apply_plan(pre, HIPPOCAMPUS, pretraining=True, show=False) == pre  # planned again: the same


def test_model_auto_is_the_planned_dynunet_or_the_bases_own(tmp_path):
    cfg = _cfg("data=dataset_json", "data.dataset_json=x.json", f"base_checkpoint={tmp_path / 'none.safetensors'}")
    assert cfg["model"]["name"] == "dynunet" and cfg["model"]["planned"]  # named by the network the plan chooses
    planned = apply_plan(cfg, HIPPOCAMPUS, data_keys=("data",), show=False)
    assert planned["model"]["name"] == "dynunet" and planned["model"]["kwargs"]["filters"] == [32, 64, 128, 256]
    kwargs = planned["model"]["kwargs"]  # nnU-Net's: plain convolutions, every decoder output but the lowest two
    assert (kwargs["res_block"], kwargs["deep_supervision"], kwargs["deep_supr_num"]) == (False, True, 2)
    base = tmp_path / "base.safetensors"
    architecture = {"name": "dynunet", "kwargs": {"in_channels": 1, "out_channels": 1, "filters": [8, 16, 32, 64],
                                                  "kernel_size": [[3, 3, 3]] * 4, "strides": HIPPOCAMPUS.strides}}
    save_file({"w": torch.zeros(1)}, str(base), metadata={"format": "segadapt-weights", "model": json.dumps(architecture)})
    cfg["base_checkpoint"] = str(base)
    adapted = apply_plan(cfg, HIPPOCAMPUS, data_keys=("data",), show=False)
    assert adapted["model"]["kwargs"]["filters"] == [8, 16, 32, 64] and "in_channels" not in adapted["model"]["kwargs"]
    other = copy.deepcopy(architecture) | {"name": "multiview_unet"}
    save_file({"w": torch.zeros(1)}, str(base), metadata={"format": "segadapt-weights", "model": json.dumps(other)})
    with pytest.raises(ValueError, match="holds a multiview_unet network; choose its model group: model=multiview_unet"):
        apply_plan(cfg, HIPPOCAMPUS, data_keys=("data",), show=False)
    assert _cfg("data=dataset_json", "data.dataset_json=x.json", "model=unet3d")["model"]["name"] == "unet3d"


def test_samples_per_volume_auto_tiles_the_volume_up_to_the_batch():
    cfg = _cfg("data=dataset_json", "data.dataset_json=x.json", "data.preprocess.patch_size=[32,32,16]")
    out = apply_plan(cfg, HIPPOCAMPUS, data_keys=("data",), show=False)
    # median 36 x 50 x 35 = 63000 voxels / (32 x 32 x 16 = 16384) = 3.85 -> 4 patches, batch 8 / 4 = 2 volumes
    assert out["data"]["preprocess"]["samples_per_volume"] == 4 and out["data"]["batch_size"] == 2
    out = apply_plan(_cfg("data=dataset_json", "data.dataset_json=x.json"), HIPPOCAMPUS, data_keys=("data",), show=False)
    assert out["data"]["preprocess"]["samples_per_volume"] == 1 and out["data"]["batch_size"] == 8  # one patch covers
