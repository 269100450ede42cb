"""The plan decides the `auto` values of a run config (segadapt.plan.apply), and the hippocampus
experiment config runs end to end on a small subset of the real set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segadapt.plan import Plan
from segadapt.plan.apply import AUTO, PLAN_FILE, apply_plan, run_plan

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = Path(os.environ.get("SEGADAPT_SHARED_DATA", REPO.parent / "shared" / "data")) / "hippocampus_msd"

PLAN = Plan(
    dataset="toy", n_cases=4, modality={"0": "MRI"}, spatial_dims=3, orientation="RAS", median_spacing=[1.0, 1.0, 2.0],
    target_spacing=[1.0, 1.0, 2.0], resample=True, anisotropic_axis=None, median_shape=[40, 40, 20],
    patch_size=[40, 40, 24], pools_per_axis=[3, 3, 2], strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
    kernel_sizes=[[3, 3, 3]] * 4, filters=[32, 64, 128, 256], batch_size=6, slice_size=[48, 48], slice_pools=3,
    slice_filters=[32, 64, 128, 256], slice_batch_size=24, intensity="zscore", background_value=[17.0],
)


def _cfg(**changes) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"{k}={v}" for k, v in changes.items()])
    return OmegaConf.to_container(cfg, resolve=True)


def test_auto_values_come_from_the_plan_and_explicit_values_win(capsys):
    cfg = _cfg(model="dynunet")
    cfg["model"]["kwargs"].update(kernel_size=AUTO, strides=AUTO, filters=[8, 16, 32, 64])
    cfg["data"]["preprocess"].update(intensity=AUTO, background_value=AUTO, target_spacing=AUTO, patch_size=AUTO,
                                     samples_per_volume=2)
    cfg["data"]["batch_size"] = AUTO
    out = apply_plan(cfg, PLAN)
    kwargs, preprocess = out["model"]["kwargs"], out["data"]["preprocess"]
    assert kwargs["kernel_size"] == PLAN.kernel_sizes and kwargs["strides"] == PLAN.strides
    assert kwargs["filters"] == [8, 16, 32, 64]  # the config's own value overrides the plan
    assert preprocess["intensity"] == "zscore" and preprocess["background_value"] == [17.0]
    assert preprocess["target_spacing"] == [1.0, 1.0, 2.0] and preprocess["patch_size"] == [40, 40, 24]
    assert out["data"]["batch_size"] == 6 // 2  # patches per step / samples per volume
    assert cfg["data"]["batch_size"] == AUTO  # the input is not changed
    printed = capsys.readouterr().out
    assert "plan of toy (4 cases)" in printed and "model.kwargs.filters=[8, 16, 32, 64] (plan: [32, 64, 128, 256])" in printed


def test_multiview_batch_comes_from_the_slice_plan():
    cfg = _cfg()
    cfg["data"]["batch_size"] = AUTO
    cfg["model"]["kwargs"]["channels"] = AUTO
    out = apply_plan(cfg, PLAN)
    assert out["data"]["batch_size"] == 24 // cfg["data"]["preprocess"]["samples_per_volume"]
    assert out["model"]["kwargs"]["channels"] == PLAN.slice_filters


def test_auto_for_a_value_the_plan_does_not_decide_is_an_error():
    cfg = _cfg()
    cfg["data"]["preprocess"]["positive_fraction"] = AUTO
    with pytest.raises(ValueError, match=r"data\.preprocess\.positive_fraction=auto.*give a value"):
        apply_plan(cfg, PLAN)


def test_run_plan_uses_the_base_s_stored_plan_for_segadapt_s_own_base(tmp_path):
    cfg = _cfg(**{"paths.runs": str(tmp_path), "paths.data": str(tmp_path / "data")})  # no source to check the plan against
    base_dir = Path(cfg["pretrain"]["run_dir"])
    base_dir.mkdir(parents=True)
    PLAN.to_json(base_dir / PLAN_FILE)

    prepared = []

    def source_never(data):  # the run's own cases are prepared (they decide its schedule), not planned
        if data["name"] != cfg["data"]["name"]:
            raise AssertionError(f"{data['name']} should not be planned: the base's plan.json decides")
        prepared.append(data["name"])

    assert run_plan(cfg, pretraining=False, prepare=source_never) == PLAN and prepared == ["phantom_sah"]

    class Planned(Exception):
        pass

    def record(data):
        raise Planned(data["name"])

    moved = tmp_path / "elsewhere"  # the same base given as a file in another folder: its plan.json still decides
    moved.mkdir()
    PLAN.to_json(moved / PLAN_FILE)
    (moved / "model.safetensors").write_bytes(b"")
    cfg["base_checkpoint"] = str(moved / "model.safetensors")
    prepared.clear()
    assert run_plan(cfg, pretraining=False, prepare=source_never) == PLAN and prepared == ["phantom_sah"]

    cfg["base_checkpoint"] = str(tmp_path / "users_own_base.safetensors")  # a user's base: the run's own data
    (tmp_path / "users_own_base.safetensors").write_bytes(b"")  # a file, with no plan.json beside it
    with pytest.raises(Planned, match=cfg["data"]["name"]):
        run_plan(cfg, pretraining=False, prepare=record)
    with pytest.raises(Planned, match=cfg["source"]["name"]):  # pretraining always plans the source
        run_plan(cfg, pretraining=True, prepare=record)


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason=f"real hippocampus MRI set not found at {HIPPOCAMPUS} (set SEGADAPT_SHARED_DATA)")
def test_hippocampus_experiment_end_to_end_on_a_real_subset(tmp_path):
    """prepare_hippocampus.py on 12 real cases, then `scripts/train.py experiment=hippocampus` with a tiny schedule:
    the base is pretrained on the source, adapted on the target; plan.json and metrics read back."""
    root = tmp_path / "msd"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for path in sorted((HIPPOCAMPUS / sub).glob("hippocampus_*.nii.gz"))[:12]:
            (root / sub / path.name).symlink_to(path)
    env = {**os.environ, "SEGADAPT_HIPPOCAMPUS": str(root)}
    prepare = [sys.executable, str(REPO / "datasets" / "prepare_hippocampus.py"), "--out", str(tmp_path / "data" / "hippocampus"),
               "--n-target", "6"]
    done = subprocess.run(prepare, cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    source = json.loads((tmp_path / "data/hippocampus/source/dataset.json").read_text(encoding="utf-8"))
    target = json.loads((tmp_path / "data/hippocampus/target/dataset.json").read_text(encoding="utf-8"))
    assert (source["numTraining"], target["numTraining"]) == (6, 6)
    assert not {c["case_id"] for c in source["training"]} & {c["case_id"] for c in target["training"]}

    train = [sys.executable, str(REPO / "scripts" / "train.py"), "experiment=hippocampus", "adapter=cp_lora",
             f"paths.data={tmp_path}/data", f"paths.runs={tmp_path}/runs", "data.n_folds=2", "source.n_folds=2",
             "trainer.max_steps=2", "pretrain.max_steps=2", "trainer.enable_progress_bar=false",
             "model.kwargs.filters=[8,8,8,8]", "trainer.threads=1"]
    done = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plan of hippocampus_anterior (6 cases)" in done.stdout
    base_dir = tmp_path / "runs/base/hippocampus_anterior_dynunet"
    run_dirs = [p.parent for p in (tmp_path / "runs" / "hippocampus").rglob("metrics.json")]
    assert len(run_dirs) == 1
    plan = json.loads((run_dirs[0] / PLAN_FILE).read_text(encoding="utf-8"))
    assert plan == json.loads((base_dir / PLAN_FILE).read_text(encoding="utf-8"))  # one plan for base and adapter
    assert plan["target_spacing"] == [1.0, 1.0, 1.0] and plan["modality"] == {"0": "MRI"}
    config = OmegaConf.load(run_dirs[0] / "config.yaml")
    assert list(config.module.model_kwargs.strides) == plan["strides"]  # 'auto' in configs/model/dynunet.yaml
    metrics = json.loads((run_dirs[0] / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["val"]["n_cases"] == 3 and metrics["base_val"] is not None


def test_generic_ct_path_runs_with_the_plan_s_statistics(tmp_path, capsys, monkeypatch):
    """`data=dataset_json data@source=dataset_json` on the phantoms' own dataset.json files (CT): the plan's
    'ct_zscore' statistics reach both datasets' preprocessing (they were lost: no `clip_range` key in the
    generic config), the base is pretrained and adapted for two steps; config.yaml and plan.json read back."""
    from segadapt.data.phantom import make_phantom_dataset
    from segadapt.plan import apply as planning
    from segadapt.training import train

    monkeypatch.setattr(planning, "_printed", set())  # a plan is printed once per process: an earlier test's counts
    grid = {"shape": [32, 32, 16], "spacing": [6.9, 6.9, 10.0]}
    target = make_phantom_dataset(tmp_path / "sah", "sah", 6, **grid)
    source = make_phantom_dataset(tmp_path / "tbi", "tbi", 4, **grid)
    cfg = _cfg(**{"data": "dataset_json", "data@source": "dataset_json", "data.dataset_json": target,
                  "source.dataset_json": source, "data.name": "sah", "source.name": "tbi", "source.n_folds": 2,
                  "paths.runs": tmp_path / "runs", "trainer.max_steps": 2, "pretrain.max_steps": 2,
                  "trainer.enable_progress_bar": False, "eval_base": False, "trainer.threads": 1,
                  "data.preprocess.patch_size": "[32,32,16]", "source.preprocess.patch_size": "[32,32,16]",
                  "data.preprocess.slice_size": "[32,32]", "source.preprocess.slice_size": "[32,32]",
                  "data.preprocess.cache": "memory", "source.preprocess.cache": "memory"})
    result = train(cfg)
    assert result["global_step"] == 2
    run = Path(cfg["run_dir"])
    plan = Plan.from_json(run / PLAN_FILE)
    assert plan.dataset == "phantom_tbi" and plan.intensity == "ct_zscore"
    stored = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    preprocess = stored["datamodule"]["preprocess"]
    assert preprocess["intensity"] == "ct_zscore"
    assert (preprocess["clip_range"], preprocess["norm_mean"], preprocess["norm_std"]) == \
        (plan.clip_range, plan.norm_mean, plan.norm_std)
    assert "hold only" in capsys.readouterr().out  # the printed plan says why the body's range is used
