"""Run folders named by the data (segadapt/names.py, configs/data/dataset_json.yaml, configs/model/auto.yaml), the
experiment files as data pointers that plan the generic command's runs, the RGB intensity rule, and the schedule's
count of a fold's real training cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from segadapt.data import make_phantom_dataset
from segadapt.names import dataset_name, folder_safe
from segadapt.plan import Plan
from segadapt.plan.apply import PLAN_FILE, apply_plan, run_plan
from segadapt.plan.planner import load_or_make_plan
from segadapt.plan.schedule import fold_training_cases
from segadapt.runs import leaves
from segadapt.training.config import TrainConfig, planned_run
from segadapt.training.jobs import prepare_dataset

REPO = Path(__file__).resolve().parents[1]
GRID = {"shape": [24, 24, 12], "spacing": [6.9, 6.9, 10.0]}


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=hydra)
    return cfg if hydra else OmegaConf.to_container(cfg, resolve=True)


def _named_dataset(folder: Path, name, n: int = 6) -> Path:
    """A dataset.json of `n` cases (placeholder files: composing reads only the json) named `name` (None: no name)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        for kind in ("img", "lab"):
            (folder / f"{kind}{i}.nii.gz").write_bytes(f"{kind}{i}".encode())
        cases.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "case_id": f"c{i}"})
    doc = {"modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "fg"}, "training": cases}
    path = folder / "dataset.json"
    path.write_text(json.dumps(doc if name is None else {"name": name, **doc}), encoding="utf-8")
    return path


def test_dataset_names_are_folder_safe_and_fall_back_to_the_folder(tmp_path):
    assert folder_safe("Hippocampus posterior/T2 (MRI)") == "Hippocampus_posterior_T2_MRI"
    assert folder_safe("../..") == "" and folder_safe(".hidden") == "hidden"
    assert dataset_name(_named_dataset(tmp_path / "a", "Task04 Hippocampus")) == "Task04_Hippocampus"
    assert dataset_name(_named_dataset(tmp_path / "my data", None)) == "my_data"  # no name: the folder's
    assert dataset_name(_named_dataset(tmp_path / "b", "..")) == "b"              # nothing usable: the folder's
    assert dataset_name(tmp_path / "absent" / "dataset.json") == "absent"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text("{not json", encoding="utf-8")
    assert dataset_name(tmp_path / "bad" / "dataset.json") == "bad"  # the loader reports the file's error


def test_the_generic_command_names_its_folders_by_the_datasets_and_the_planned_network(tmp_path):
    target = _named_dataset(tmp_path / "t", "hippocampus_posterior")
    source = _named_dataset(tmp_path / "s", "hippocampus_anterior")
    generic = ("data=dataset_json", f"data.dataset_json={target}", "data@source=dataset_json",
               f"source.dataset_json={source}", "adapter=cp_lora", "fold=2")
    cfg = _compose(*generic, hydra=True)
    assert cfg.run_dir == "runs/hippocampus_posterior/dynunet/cp_lora/fold2"
    assert cfg.pretrain.run_dir == "runs/base/hippocampus_anterior_dynunet"
    assert cfg.base_checkpoint == "runs/base/hippocampus_anterior_dynunet/model.safetensors"
    sweep = cfg.hydra.sweep  # a -m sweep writes .hydra/ into the run folder itself, no `auto/` folder beside it
    assert f"{sweep.dir}/{sweep.subdir}" == cfg.run_dir
    assert cfg.model.name == "dynunet" and cfg.model.planned  # chosen by the plan (configs/model/auto.yaml)
    assert _compose(*generic, "data.name=x", "source.name=y")["run_dir"] == "runs/x/dynunet/cp_lora/fold2"
    assert _compose(*generic, "data.name=x", "source.name=y")["pretrain"]["run_dir"] == "runs/base/y_dynunet"
    other = _named_dataset(tmp_path / "o", "brain_tumour")  # another dataset: other folders, another base
    assert _compose(*generic, f"data.dataset_json={other}", f"source.dataset_json={other}")["base_checkpoint"] == \
        "runs/base/brain_tumour_dynunet/model.safetensors"


def test_a_second_dataset_of_one_name_is_refused_the_first_one_s_base(tmp_path):
    """Two datasets whose dataset.json names coincide share runs/base/<name>_dynunet: the second's runs must not
    adapt the first's base with the first's plan (they did: the stored plan.json was taken as it was)."""
    first = _named_dataset(tmp_path / "one", "dataset", n=6)
    second = _named_dataset(tmp_path / "two", "dataset", n=9)
    cfg = _compose("data=dataset_json", f"data.dataset_json={first}", "data@source=dataset_json",
                   f"source.dataset_json={first}", f"paths.runs={tmp_path / 'runs'}")
    base_dir = Path(cfg["pretrain"]["run_dir"])
    base_dir.mkdir(parents=True)
    stored = _toy_plan("dataset", 6)
    stored.to_json(base_dir / PLAN_FILE)
    assert run_plan(cfg, pretraining=False, prepare=lambda data: Path(data["dataset_json"])) == stored
    cfg["data"]["dataset_json"] = cfg["source"]["dataset_json"] = str(second)
    with pytest.raises(ValueError, match=r"pretrained on 'dataset' \(6 cases\), not on source.dataset_json .*two.* "
                                         r"\('dataset', 9 cases\).*source.name"):
        run_plan(cfg, pretraining=False, prepare=lambda data: Path(data["dataset_json"]))


def _toy_plan(name: str, n_cases: int) -> Plan:
    return Plan(
        dataset=name, n_cases=n_cases, modality={"0": "MRI"}, spatial_dims=3, orientation="RAS",
        median_spacing=[1.0, 1.0, 1.0], target_spacing=[1.0, 1.0, 1.0], resample=False, anisotropic_axis=None,
        median_shape=[32, 32, 32], patch_size=[32, 32, 32], pools_per_axis=[3, 3, 3],
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 4, filters=[32, 64, 128, 256],
        batch_size=2, slice_size=[32, 32], slice_pools=3, slice_filters=[32, 64, 128, 256], slice_batch_size=12,
        intensity="mri", background_value=[0.0])


def _planned_records(cfg: dict) -> dict[str, dict]:
    """The config.yaml of the pretraining and of the run a composed config plans (no training)."""
    raw = TrainConfig.from_cfg(cfg).to_dict()
    records = {}
    for kind in ("pretrain", "train"):
        plan = run_plan(raw, pretraining=kind == "pretrain", prepare=prepare_dataset)
        planned = apply_plan(raw, plan, pretraining=kind == "pretrain", show=False)
        dataset = prepare_dataset(planned["source" if kind == "pretrain" else "data"])
        records[kind] = leaves(planned_run(planned, kind, dataset, plan).record(threads=1))
    return records


def test_experiment_hippocampus_plans_the_runs_of_the_generic_command(tmp_path):
    """`experiment=hippocampus` and the generic command on the same two dataset.json files plan the same base and
    the same runs: only the experiment's name (its run folder) and its volume bins differ."""
    data = tmp_path / "data"
    target = make_phantom_dataset(data / "hippocampus" / "target", "sah", 6, **GRID)
    source = make_phantom_dataset(data / "hippocampus" / "source", "tbi", 6, seed=1, **GRID)
    common = (f"paths.data={data}", f"paths.runs={tmp_path / 'runs'}", "plan.measured_step_s=2.0", "adapter=cp_lora")
    generic = _planned_records(_compose("data=dataset_json", f"data.dataset_json={target}", "data@source=dataset_json",
                                        f"source.dataset_json={source}", *common))
    named = _planned_records(_compose("experiment=hippocampus", *common))
    assert generic["pretrain"] == {**named["pretrain"], "module.volume_bins_ml": [0.0, 5.0, 15.0, 30.0, np.inf]}
    differ = {key for key in generic["train"] if generic["train"][key] != named["train"].get(key)}
    assert set(generic["train"]) == set(named["train"])
    assert differ == {"run.experiment", "run.run_dir", "module.volume_bins_ml"}
    assert named["train"]["run.run_dir"] == str(tmp_path / "runs/hippocampus/dynunet/cp_lora/fold0")
    assert generic["train"]["run.run_dir"] == str(tmp_path / "runs/phantom_sah/dynunet/cp_lora/fold0")
    assert named["pretrain"]["run.run_dir"] == str(tmp_path / "runs/base/phantom_tbi_dynunet")  # one shared base
    assert named["train"]["module.volume_bins_ml"] == [0.0, 1.4, 1.7, np.inf]


@pytest.mark.parametrize("experiment", ["hippocampus_2d", "hippocampus_nnunet", "drive"])
def test_the_other_experiment_files_hold_no_schedule(experiment):
    cfg = _compose(f"experiment={experiment}")
    assert cfg["trainer"]["max_steps"] == cfg["pretrain"]["max_steps"] == "auto"
    assert (cfg["optim"]["warmup_steps"], cfg["selection"]["every_n_steps"], cfg["selection"]["patience"]) == \
        ("auto", "auto", "auto")
    assert cfg["selection"]["inner_fraction"] == 0.2 and cfg["data"]["n_folds"] == 3


def _rgb_dataset(folder: Path, mode: str, n: int = 3) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    rng = np.random.default_rng(0)
    cases = []
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    for i in range(n):
        pixels = rng.integers(0, 256, (40, 48, channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(folder / "images" / f"c{i}.png")
        label = np.zeros((40, 48), np.uint8)
        label[10:20 + i, 12:30] = 1
        Image.fromarray(label).save(folder / "labels" / f"c{i}.png")
        cases.append({"image": f"images/c{i}.png", "label": f"labels/c{i}.png"})
    modality = {str(c): name for c, name in enumerate(["red", "green", "blue", "alpha"][:channels])}
    path = folder / "dataset.json"
    path.write_text(json.dumps({"name": "fundus", "modality": modality, "labels": {"0": "bg", "1": "vessel"},
                                "training": cases}), encoding="utf-8")
    return path


def test_8_bit_rgb_image_files_are_planned_as_rgb(tmp_path, capsys):
    plan = load_or_make_plan(_rgb_dataset(tmp_path / "rgb", "RGB"), tmp_path / "plans", spatial_dims=2)
    assert plan.intensity == "rgb"
    assert "8-bit RGB image files (modality ['red', 'green', 'blue']): 'rgb', x / 255" in plan.notes
    from segadapt.cli import main

    printed = main(["plan", str(tmp_path / "rgb" / "dataset.json"), "--out", str(tmp_path / "cli" / "plan.json")])
    assert printed == 0 and Plan.from_json(tmp_path / "cli" / "plan.json").intensity == "rgb"  # 2D detected, as training
    assert "8-bit RGB image files" in capsys.readouterr().out
    grey = load_or_make_plan(_rgb_dataset(tmp_path / "grey", "L"), tmp_path / "plans", spatial_dims=2)
    assert grey.intensity != "rgb" and not any("RGB" in note for note in grey.notes)  # one channel: not RGB


def test_a_fingerprint_cached_before_the_rgb_rule_gets_it_from_the_files(tmp_path):
    from segadapt.plan.fingerprint import fingerprint_folder

    path = _rgb_dataset(tmp_path / "rgb", "RGB")
    load_or_make_plan(path, tmp_path / "plans", spatial_dims=2)
    cached = fingerprint_folder(path, tmp_path / "plans", None, 2) / "fingerprint.json"
    fp = json.loads(cached.read_text(encoding="utf-8"))
    assert fp.pop("rgb8_images") is True
    cached.write_text(json.dumps(fp), encoding="utf-8")  # as an earlier segadapt wrote it
    assert load_or_make_plan(path, tmp_path / "plans", spatial_dims=2).intensity == "rgb"


def test_the_schedule_counts_the_fold_s_training_cases_in_the_split_the_run_uses(tmp_path):
    """A splits file with unequal folds (nnU-Net's format): fold 0 validates 2 of 12 cases, fold 1 validates 7,
    fold 2 validates 3. The schedule counts the largest fold's training cases (fold 0: 10, inner split 2 -> 8) for
    every fold, so the folds of one cross-validation train the same steps; the formula n - round(n / k) said 6."""
    path = _named_dataset(tmp_path / "d", "toy", n=12)
    ids = [f"c{i}" for i in range(12)]
    folds = [ids[:2], ids[2:9], ids[9:]]
    splits = tmp_path / "d" / "splits_final.json"
    splits.write_text(json.dumps([{"train": [c for c in ids if c not in val], "val": val} for val in folds]))
    # fold 0: 10 training cases, inner split round(0.2 x 10) = 2 -> 8; fold 1: 5 -> 4; fold 2: 9 -> 7
    counted = [fold_training_cases(path, 3, 0, k, 0.2, splits_path=str(splits)) for k in range(3)]
    assert all((c.fold, c.fold_train, c.inner, c.trained) == (0, 10, 2, 8) for c in counted)
    assert counted[1].describe() == ("8 training cases (fold 0 of splits_final.json, the largest of its 3 folds, 10 "
                                     "training cases, 2 of them the inner split)")
    cut = fold_training_cases(path, 3, 0, 1, 0.2, max_train_cases=3, splits_path=str(splits))
    assert cut.trained == 3 and cut.describe().endswith("2 of them the inner split, 3 after max_train_cases)")
    with pytest.raises(ValueError, match="fold 3"):
        fold_training_cases(path, 3, 0, 3, 0.2, splits_path=str(splits))
    # found beside dataset.json as the run finds it, and in the printed schedule of a planned config
    cfg = _compose("data=dataset_json", f"data.dataset_json={path}", "fold=1", "data.preprocess.patch_size=[8,8,8]")
    planned = apply_plan(cfg, _toy_plan("toy", 12), data_keys=("data",), show=False)
    # 32^3 / 8^3 = 64 patches per volume, 2 per step (the plan's batch): ceil(25 x 8 x 64 / 2); the formula's 6: 4800
    assert planned["trainer"]["max_steps"] == 6400
    from segadapt.plan.apply import _job_steps

    steps, how = _job_steps(planned, planned["data"], _toy_plan("toy", 12), pretraining=False)
    assert "8 training cases (fold 0 of splits_final.json, the largest of its 3 folds, 10 training cases" in how
