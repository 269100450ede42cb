"""Bad input at the entry points and safe run state, on tiny phantoms.

* A table of bad inputs (config overrides, dataset.json and its cases, run folders): each one is one
  ``error:`` line on stderr naming the key / file / case, exit code 2, and nothing is written (or what was
  there is byte for byte unchanged). The in-process cases go through the same functions as
  ``scripts/train.py`` (:func:`segadapt.cli.check_hydra_request`, then the job); a few run the real scripts.
* Exact resume: a run killed with SIGKILL at a random step and resumed with ``ckpt_path=last`` ends with the
  same adapter tensors, metrics and training curve as the uninterrupted run.
* Run folders that could mix or run code: a ``last.ckpt`` whose unpickling would run code, one written by a
  training with other settings, a killed run rerun with other settings, a folder another training holds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from run_fixtures import run_script_in_process, tiny_phantom
from safetensors.torch import load_file

from segadapt.cli import check_hydra_request
from segadapt.cli import main as segadapt_main
from segadapt.errors import user_errors
from segadapt.runs import ADAPTER_FILE, CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, read_metrics, run_folder_lock
from segadapt.training import train
from segadapt.training.callbacks import TRAIN_STATS_KEYS
from segadapt.training.jobs import check_request, format_result

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = tiny_phantom("model.kwargs.channels=[4,8]", "model.kwargs.strides=[2]", "adapter=cp_lora", "eval_base=false",
                    "trainer.threads=1")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
ENV.pop("SEGADAPT_DEBUG", None)


def _compose(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=overrides), resolve=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Phantom data, a base and one finished run, made in process; `args(...)` gives a job's overrides."""
    root = tmp_path_factory.mktemp("bad")
    common = [*TINY, f"paths.data={root}/data", f"paths.runs={root}/runs"]
    finished = root / "runs/finished"
    train(_compose([*common, f"run_dir={finished}"]))
    # a copy of the target dataset to break, without its splits file
    copy = root / "copy"
    shutil.copytree(root / "data/phantom_sah", copy, ignore=shutil.ignore_patterns("splits_*"))
    return {"root": root, "common": common, "finished": finished, "copy": copy, **_unfinished_runs(finished)}


class Plant:
    """Unpickling this creates the file `marker` (what code in a pickle could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _unfinished_runs(finished: Path) -> dict[str, Path]:
    """Copies of the finished run without metrics.json (killed runs) beside it: `killed` as it was, `planted`
    with a last.ckpt whose unpickling creates `marker` (under runs/, so the tree check sees it), `mixed` with the
    last.ckpt of a training with other settings, `garbage` with a last.ckpt that is no checkpoint."""
    runs = {}
    for name in ("killed", "planted", "mixed", "garbage"):
        runs[name] = finished.with_name(name)
        shutil.copytree(finished, runs[name])
        (runs[name] / METRICS_FILE).unlink()
    checkpoint = torch.load(finished / CHECKPOINT_FILE, weights_only=True)
    torch.save({**checkpoint, "loops": Plant(finished.with_name("marker"))}, runs["planted"] / CHECKPOINT_FILE)
    checkpoint["callbacks"]["RunSettings"]["digest"] = "0" * 64
    torch.save(checkpoint, runs["mixed"] / CHECKPOINT_FILE)
    (runs["garbage"] / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    return runs


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the digest of its bytes (what "unchanged" is checked against)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _broken_dataset(world: dict, tmp_path: Path, how: str) -> Path:
    """A copy of the phantom dataset with one defect; returns its dataset.json."""
    folder = tmp_path / "dataset"
    shutil.copytree(world["copy"], folder)
    description = folder / "dataset.json"
    doc = json.loads(description.read_text(encoding="utf-8"))
    first = doc["training"][1]
    if how == "not json":
        description.write_text("{not json", encoding="utf-8")
    elif how == "missing image":
        (folder / first["image"]).unlink()
    elif how in ("nan image", "label value"):
        key = "image" if how == "nan image" else "label"
        image = nib.load(folder / first[key])
        data = np.asarray(image.dataobj).astype(np.float32 if key == "image" else np.int16)
        data[3, 3, 3] = np.nan if key == "image" else 7
        nib.save(nib.Nifti1Image(data, image.affine), folder / first[key])
    elif how in ("duplicate symlink", "duplicate copy"):  # another case id reading case 1's image
        copy = folder / "imagesTr" / "sah_dup.nii.gz"
        if how == "duplicate symlink":
            copy.symlink_to(folder / first["image"])
        else:
            copy.write_bytes((folder / first["image"]).read_bytes())
        doc["training"].append({**first, "image": "imagesTr/sah_dup.nii.gz", "case_id": "sah_dup", "patient_id": "dup"})
    elif how == "three classes":
        doc["labels"] = {"0": "background", "1": "blood", "2": "oedema"}
    elif how == "no background label":
        doc["labels"] = {"1": "blood"}
    elif how == "empty training list":
        doc["training"] = []
    elif how == "entry without label":
        del first["label"]
    elif how == "missing label":
        (folder / first["label"]).unlink()
    elif how == "two channels in one case":  # dataset.json declares one channel (CT)
        image = nib.load(folder / first["image"])
        data = np.asarray(image.dataobj)
        nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), image.affine), folder / first["image"])
    elif how in ("splits: unknown case", "splits: case in two folds"):
        ids = sorted(item["case_id"] for item in doc["training"])
        folds = [ids[0::3], ids[1::3], ids[2::3]]
        if how == "splits: unknown case":
            folds[0] = [*folds[0], "sah_999"]
        else:
            folds[1] = [*folds[1], folds[0][0]]
        splits = [{"train": sorted(set(ids) - set(val)), "val": val} for val in folds]
        (folder / "splits_final.json").write_text(json.dumps(splits), encoding="utf-8")
    elif how == "one case":
        doc["training"] = doc["training"][:1]
        doc["numTraining"] = 1
        description.write_text(json.dumps(doc), encoding="utf-8")
    elif how in ("no labelled voxel", "tiny images"):
        for entry in doc["training"]:
            for key in ("image", "label"):
                image = nib.load(folder / entry[key])
                data = np.asarray(image.dataobj)
                if how == "tiny images":  # 6 x 6 x 3 voxels around the middle, the middle voxel labelled
                    data = data[13:19, 13:19, 6:9].copy()
                    if key == "label":
                        data[:] = 0
                        data[3, 3, 1] = 1
                else:
                    data = np.zeros_like(data) if key == "label" else data
                nib.save(nib.Nifti1Image(data, image.affine), folder / entry[key])
    elif how == "labels absent":
        for entry in doc["training"]:
            entry.pop("label")
    if how in ("duplicate symlink", "duplicate copy", "three classes", "no background label", "empty training list",
               "entry without label", "labels absent"):
        description.write_text(json.dumps(doc), encoding="utf-8")
    return description


def _run_job(argv: list[str]) -> None:
    """What scripts/train.py does with `argv`, in process: the checks before Hydra writes, then the job."""
    check_hydra_request(CONFIGS, "train", check_request, argv)
    with user_errors():
        train(_compose(argv))


# (name, extra overrides (with {run}: a fresh run folder, {finished}: the finished run, {data}: a broken
# dataset.json, {killed} / {planted} / {mixed} / {garbage}: unfinished runs, see _unfinished_runs), the
# dataset defect, the expected message (regex))
CASES = [
    ("rank of wrong type", ["adapter.spec.rank=abc"], None, r"adapter\.spec\.rank='abc': expected an integer, got str"),
    ("max_steps of wrong type", ["trainer.max_steps=x"], None, r"trainer\.max_steps='x': expected an integer"),
    ("float where an integer is expected", ["trainer.max_steps=2.5"], None,
     r"trainer\.max_steps=2\.5: expected an integer, got float"),
    ("boolean of wrong type", ["eval_base=maybe"], None, r"eval_base='maybe': expected a boolean"),
    ("test-time mirroring not a boolean", ["model.inference.tta=sometimes"], None,
     r"model\.inference\.tta='sometimes': expected a boolean"),
    ("list element of wrong type", ["data.preprocess.slice_size=[32,x]"], None,
     r"data\.preprocess\.slice_size\[1\]='x': expected an integer"),
    ("number of wrong type", ["optim.weight_decay=lots"], None, r"optim\.weight_decay='lots': expected a number"),
    ("threads of wrong type", ["trainer.threads=two"], None, r"trainer\.threads='two': expected an integer"),
    ("threads zero", ["trainer.threads=0"], None, r"trainer\.threads must be a positive integer, got 0"),
    ("network argument of wrong type", ["model.kwargs.channels=[4,x]"], None,
     r"model\.kwargs\.channels\[1\]='x': expected an integer, got str"),
    ("loss weight of wrong type", ["loss.lambda_dice=lots"], None, r"loss\.lambda_dice='lots': expected a number"),
    ("auto where the plan decides nothing", ["trainer.log_every_n_steps=auto"], None,
     r"trainer\.log_every_n_steps='auto': expected an integer, got str"),
    ("Lightning setting of wrong type", ["trainer.log_every_n_steps=often"], None,
     r"trainer\.log_every_n_steps='often': expected an integer"),
    ("empty override", ["fold="], None, r"fold='': expected an integer"),
    ("unknown key", ["no_such_key=1"], None, r"Could not override 'no_such_key'\. .*no_such_key"),
    ("unknown config group option", ["model=no_such_model"], None, r"Could not find 'model/no_such_model'"),
    ("fold out of range", ["fold=9"], None, r"fold 9 out of range: .*splits_3fold_seed0\.json has 3 folds"),
    ("module pattern matching nothing", ["+adapter.spec.targets=[\"(unclosed\"]"], None,
     r"targets \['\(unclosed'\] .*match no module"),
    ("norms not a boolean", ["+adapter.spec.norms=yes"], None, r"adapter\.spec\.norms='yes': expected a boolean, got str"),
    ("norm tuning without affine norms", ["adapter=norms"], None,
     r"adapter='norms': MultiViewUNet has no normalisation layer with affine parameters"),
    ("resume with nothing to resume", ["ckpt_path=last"], None, r"ckpt_path=last: nothing to resume, no checkpoint .*last\.ckpt"),
    ("resume from a missing checkpoint", ["ckpt_path={run}/elsewhere.ckpt"], None,
     r"ckpt_path=.*elsewhere\.ckpt: nothing to resume"),
    ("finished run folder", ["run_dir={finished}"], None, r"finished.* holds a finished run \(metrics\.json\); overwrite=true"),
    ("resume with a changed setting", ["run_dir={finished}", "ckpt_path=last", "adapter.spec.rank=3"], None,
     r"ckpt_path=last: these settings differ from the run in .*finished: module\.adapter\.rank: 8 -> 3"),
    ("resume with fewer steps", ["run_dir={finished}", "ckpt_path=last", "trainer.max_steps=1"], None,
     r"ckpt_path=last: these settings differ from the run in .*finished: trainer\.max_steps: 2 -> 1"),
    ("resume from a checkpoint whose unpickling runs code", ["run_dir={planted}", "ckpt_path=last"], None,
     r"refused to resume from .*planted/last\.ckpt: it holds pickled objects .* could run code \(.*io\.open"),
    ("rerun of a killed run whose checkpoint unpickles code", ["run_dir={planted}"], None,
     r"refused to resume from .*planted/last\.ckpt: it holds pickled objects"),
    ("resume from a file that is no checkpoint", ["run_dir={garbage}", "ckpt_path=last"], None,
     r".*garbage/last\.ckpt is not a readable checkpoint"),
    ("resume from another training's checkpoint", ["run_dir={mixed}", "ckpt_path=last"], None,
     r"ckpt_path=last: .*mixed/last\.ckpt was written by a training with other settings than .*mixed/config\.yaml"),
    ("rerun of a killed run with other settings", ["run_dir={killed}", "adapter.spec.rank=3"], None,
     r"killed holds a killed run \(last\.ckpt, no metrics\.json\) with other settings: module\.adapter\.rank: 8 -> 3"),
    ("dataset.json missing", ["data.dataset_json={run}/none/dataset.json", "data.phantom=null"], None,
     r"dataset description not found: .*none/dataset\.json"),
    ("dataset.json not JSON", ["data.dataset_json={data}"], "not json", r"dataset[/\\]dataset\.json"),
    ("case image missing", ["data.dataset_json={data}"], "missing image", r"sah_001"),
    ("case image with NaN", ["data.dataset_json={data}"], "nan image", r"case 'sah_001'.*NaN"),
    ("label value not in dataset.json", ["data.dataset_json={data}"], "label value", r"sah_001.*7"),
    # issue 19, round 2
    ("duplicate case: symlink to another case's image", ["data.dataset_json={data}"], "duplicate symlink",
     r"dataset\.json: case 'sah_dup' and case 'sah_001' are one image: both read .*sah_001\.nii\.gz \(the same path"),
    ("duplicate case: byte copy of another case's image", ["data.dataset_json={data}"], "duplicate copy",
     r"case 'sah_dup' and case 'sah_001' are one image: .*sah_dup\.nii\.gz is a byte-identical copy of"),
    ("three classes for a one-channel head", ["data.dataset_json={data}"], "three classes",
     r"dataset\.json declares 3 classes .* but model\.kwargs\.out_channels=1: .*set model\.kwargs\.out_channels=3"),
    ("labels without background", ["data.dataset_json={data}"], "no background label",
     r"case 'sah_\d+': label .*holds label values \[0\] not declared in dataset\.json labels \[1\]"),
    ("empty training list", ["data.dataset_json={data}"], "empty training list", r"dataset\.json: empty dataset"),
    ("training entry without a label", ["data.dataset_json={data}"], "entry without label",
     r"dataset\.json: training entry 1 has no 'label' path"),
    ("label file missing", ["data.dataset_json={data}"], "missing label",
     r"case 'sah_001' \(entry 1\): label not found: .*sah_001\.nii\.gz"),
    ("channel count differs between cases", ["data.dataset_json={data}"], "two channels in one case",
     r"case 'sah_001': image .*sah_001\.nii\.gz has 2 channel\(s\) .*expected 1 channel"),
    ("splits file with a case that does not exist", ["data.dataset_json={data}"], "splits: unknown case",
     r"splits_final\.json does not match .*dataset\.json: .*removed \['sah_999'\]"),
    ("splits file with a case in two folds", ["data.dataset_json={data}"], "splits: case in two folds",
     r"splits_final\.json: cases \['sah_000'\] are validation cases of several folds"),
    ("more folds than patients", ["data.n_folds=9"], None, r"dataset\.json: cannot make 9 folds from 6 patients"),
    ("one fold", ["data.n_folds=1"], None, r"n_folds must be at least 2, got 1"),
    ("n_folds of wrong type", ["data.n_folds=three"], None, r"data\.n_folds='three': expected an integer"),
    ("negative fold", ["fold=-1"], None, r"fold -1 out of range: .* has 3 folds"),
    ("volume bins not increasing", ["data.volume_bins_ml=[0,15,5]"], None,
     r"volume_bins_ml: volume bin edges must be at least two increasing values, got \[0\.0, 15\.0, 5\.0\]"),
    ("volume bin not a number", ["data.volume_bins_ml=[0,lots]"], None, r"data\.volume_bins_ml\[1\]='lots': expected a number"),
    ("unknown intensity mode", ["+data.preprocess.intensity=hounsfield"], None,
     r"intensity must be one of \('ct', 'ct_zscore', 'zscore', 'mri', 'rgb'\), got 'hounsfield'"),
    ("patch size of two values for a volume", ["data.preprocess.patch_size=[32,32]"], None,
     r"patch_size \[32, 32\] needs 3 values"),
    ("positive fraction above 1", ["data.preprocess.positive_fraction=2"], None, r"positive_fraction must be in \[0, 1\], got 2"),
    ("unknown slice view", ["+data.preprocess.slice_axes=[oblique]"], None,
     r"slice_axes must be a non-empty subset of \['sagittal', 'coronal', 'axial'\], got \['oblique'\]"),
    ("no training case left", ["data.max_train_cases=0"], None, r"max_train_cases must be at least 1, got 0"),
    ("inner fraction of 1", ["selection.inner_fraction=1.0"], None, r"inner_fraction must be in \[0, 1\), got 1\.0"),
    ("dataset of one case", ["data.dataset_json={data}"], "one case",
     r"dataset\.json: cannot make 3 folds from 1 patients \(1 cases\)"),
    ("no labelled voxel in any case", ["data.dataset_json={data}"], "no labelled voxel",
     r"dataset\.json: no case has a labelled voxel \(label > 0\) in any of its 6 cases"),
    ("labels absent from dataset.json", ["data.dataset_json={data}"], "labels absent",
     r"dataset\.json: training entry 0 has no 'label' path"),
    ("images too small for a network", ["data.dataset_json={data}"], "tiny images",
     r"median size after cropping, \[6, 6, 3\] voxels, is too small to plan a network"),
    ("source other than the one the base was pretrained on", ["source.dataset_json=${{data.dataset_json}}"], None,
     r"the base in .*phantom_tbi_multiview_unet was pretrained on 'phantom_tbi' \(4 cases\), not on "
     r"source\.dataset_json .*phantom_sah.*\('phantom_sah', 6 cases\): give the source another source\.name"),
]


@pytest.mark.parametrize("name, overrides, defect, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, capsys, name, overrides, defect, message):
    data = _broken_dataset(world, tmp_path, defect) if defect else None
    run = tmp_path / "run"
    values = {"run": run, "data": data, **{k: world[k] for k in ("finished", "killed", "planted", "mixed", "garbage")}}
    argv = [*world["common"], f"run_dir={run}", *[o.format(**values) for o in overrides]]
    before = {"runs": _tree(world["root"] / "runs"), "data": _tree(world["root"] / "data"),
              "broken": _tree(data.parent) if data else {}}
    with pytest.raises(SystemExit) as exit_:
        _run_job(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert "Traceback" not in err[0] and "applying transform" not in err[0]
    assert not run.exists()  # no run folder, no .hydra, no config.yaml
    assert _tree(world["root"] / "runs") == before["runs"]  # the finished run and the base untouched
    assert _tree(world["root"] / "data") == before["data"]
    if data:
        assert _tree(data.parent) == before["broken"]  # in particular: no splits file beside a broken dataset


def test_debug_shows_the_traceback(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEGADAPT_DEBUG", "1")
    data = _broken_dataset(world, tmp_path, "nan image")
    with pytest.raises(SystemExit):
        _run_job([*world["common"], f"run_dir={tmp_path / 'run'}", f"data.dataset_json={data}"])
    err = capsys.readouterr().err
    assert "Traceback" in err and "CaseError" in err and err.strip().splitlines()[-1].startswith("error: case 'sah_001'")


def test_segadapt_command_errors_and_success(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        segadapt_main(["report", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: experiment folder not found: {tmp_path / 'nowhere'}"]
    # success: main() returns 0 (the console script exits 0 and prints nothing of its own)
    experiment = tmp_path / "experiment"
    shutil.copytree(world["finished"], experiment / "multiview_unet/cp_lora/fold0")
    assert segadapt_main(["report", str(experiment), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report/report.csv").is_file() and capsys.readouterr().err == ""


# ---- segadapt fit / validate (the Lightning CLI) on run folders ----------------------------------------------
@pytest.fixture(scope="module")
def cli_world(world) -> dict:
    """A `segadapt fit` config with the finished run's settings, and a run folder that `segadapt fit` finished."""
    import yaml

    from segadapt.runs import read_run_config

    config = read_run_config(world["finished"])
    path = world["root"] / "cli.yaml"
    path.write_text(yaml.safe_dump({"seed_everything": config["run"]["seed"], "model": config["module"],
                                    "data": config["datamodule"], "trainer": config["trainer"]}), encoding="utf-8")
    finished = world["root"] / "runs/cli_finished"
    assert segadapt_main(["fit", "--config", str(path), "--trainer.default_root_dir", str(finished)]) == 0
    return {"config": path, "finished": finished}


# (name, command line after the subcommand and --config ({run}: a fresh run folder, {finished}: the finished run),
# the expected message (regex))
CLI_CASES = [
    ("fit without a run folder", ["fit"], r"segadapt fit: give the run folder to write, --trainer\.default_root_dir"),
    ("fit into a finished run folder", ["fit", "--trainer.default_root_dir", "{finished}"],
     r"cli_finished holds a finished run \(metrics\.json\)"),
    ("fit resume with a changed setting", ["fit", "--trainer.default_root_dir", "{finished}", "--ckpt_path", "last",
                                           "--model.lr", "0.5"], r"these settings differ from the run in .*cli_finished: module\.lr: .* -> 0\.5"),
    ("fit resume with fewer steps", ["fit", "--trainer.default_root_dir", "{finished}", "--ckpt_path", "last",
                                     "--trainer.max_steps", "1"], r"trainer\.max_steps: 2 -> 1"),
    ("fit with a logger of its own", ["fit", "--trainer.default_root_dir", "{run}", "--trainer.logger", "false"],
     r"trainer\.logger is not taken; the run folder has its own logs"),
    ("validate last without last.ckpt", ["validate", "--trainer.default_root_dir", "{run}", "--ckpt_path", "last"],
     r"segadapt validate --ckpt_path last: no last\.ckpt in trainer\.default_root_dir .*run"),
]


@pytest.mark.parametrize("name, argv, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_writes_nothing(world, cli_world, tmp_path, capsys, name, argv, message):
    run = tmp_path / "run"
    command, *rest = [a.format(run=run, finished=cli_world["finished"]) for a in argv]
    before = _tree(world["root"] / "runs")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        segadapt_main([command, "--config", str(cli_world["config"]), *rest])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line for line in err if "error:" in line] == err[-1:], err  # Lightning's INFO lines may come before
    assert re.search(message, err[-1]), err[-1]
    assert not run.exists() and _tree(world["root"] / "runs") == before


def test_fit_resume_with_more_steps_trains_on(cli_world, tmp_path):
    """``segadapt fit --ckpt_path last --trainer.max_steps 3`` on a finished 2-step run trains step 2 from its
    checkpoint; config.yaml and metrics.json record 3 steps, extended from 2."""
    from segadapt.runs import read_run_config

    run = tmp_path / "run"
    shutil.copytree(cli_world["finished"], run)
    assert segadapt_main(["fit", "--config", str(cli_world["config"]), "--trainer.default_root_dir", str(run),
                          "--ckpt_path", "last", "--trainer.max_steps", "3"]) == 0
    metrics = read_metrics(run)
    assert metrics["global_step"] == 3 and metrics["extended_from_steps"] == 2
    assert metrics["cost"]["resumed_from_step"] == 2 and read_run_config(run)["trainer"]["max_steps"] == 3
    assert read_metrics(cli_world["finished"])["extended_from_steps"] is None


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=600)


def test_scripts_exit_2_with_one_line(world, tmp_path, capsys, monkeypatch):
    """The real scripts: an override of the wrong type (refused before Hydra writes; the script's own code in this
    process, as the other refusals of scripts/train.py), a bad case (raised inside a MONAI transform while the job
    runs: Hydra's record of the job is removed again), an existing base (pretrain.py does not overwrite it): those
    two in a fresh process each, the real start-up of each script."""
    monkeypatch.delenv("SEGADAPT_DEBUG", raising=False)
    run = tmp_path / "run"
    data = _broken_dataset(world, tmp_path, "nan image")
    base = world["root"] / "runs/base/phantom_tbi_multiview_unet"
    before = _tree(base)
    capsys.readouterr()
    code = run_script_in_process(REPO / "scripts/train.py", *world["common"], f"run_dir={run}", "adapter.spec.rank=abc")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: adapter.spec.rank='abc': expected an integer, got str"), err
    assert not run.exists() and _tree(base) == before
    for script, args, message in [
        ("train.py", [f"data.dataset_json={data}"], "error: case 'sah_001': image "),
        ("pretrain.py", [], f"error: {base} holds a finished run (metrics.json); overwrite=true replaces it"),
    ]:
        done = _script(str(REPO / "scripts" / script), *world["common"], f"run_dir={run}", *args, cwd=tmp_path)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1 and err[0].startswith(message), done.stderr[-2000:]
        assert not run.exists() and _tree(base) == before


# ---- safe run state -----------------------------------------------------------------------------------------
def test_overwrite_true_replaces_a_finished_run(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["finished"], run)
    (run / "stale.txt").write_text("kept", encoding="utf-8")
    stored = json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))
    result = train(_compose([*world["common"], f"run_dir={run}", "overwrite=true", "trainer.max_steps=1"]))
    assert result["global_step"] == 1 and stored["global_step"] == 2
    assert json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))["global_step"] == 1
    steps = [int(r["step"]) for r in csv.DictReader((run / "logs/metrics.csv").open(encoding="utf-8")) if r["train/loss"]]
    assert steps == [0]  # a fresh history


KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from segadapt.training import train

    class Kill(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)

    with initialize_config_dir(config_dir=sys.argv[2], version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[3:])
    train(OmegaConf.to_container(cfg, resolve=True), callbacks=[Kill()])
""")


def _curve(run: Path) -> list[tuple[int, str]]:
    rows = csv.DictReader((run / "logs/metrics.csv").open(encoding="utf-8"))
    return [(int(r["step"]), r["train/loss"]) for r in rows if r.get("train/loss")]


def test_killed_run_resumes_exactly(world, tmp_path):
    """7 steps over two epochs (4 training cases, batch 1), checkpoints every 2 steps; SIGKILL at a random
    step (mid-epoch or at an epoch's end), then ``scripts/train.py ... ckpt_path=last``: same adapter tensors (bit for bit), metrics and
    training curve (each step once) as the run that was never interrupted."""
    steps = 7
    kill_at = random.Random().randint(2, steps - 1)  # after the first checkpoint
    settings = [*world["common"], f"trainer.max_steps={steps}", "checkpoint_every=2", "adapter.lr=0.05"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(_compose([*settings, f"run_dir={whole}"]))

    driver = tmp_path / "kill.py"
    driver.write_text(KILL_DRIVER, encoding="utf-8")
    done = _script(str(driver), str(kill_at), str(CONFIGS), *settings, f"run_dir={killed}", cwd=tmp_path)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (killed / METRICS_FILE).exists()
    assert (killed / CHECKPOINT_FILE).is_file()
    done = _script(str(REPO / "scripts/train.py"), *settings, f"run_dir={killed}", "ckpt_path=last", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]

    a, b = load_file(str(whole / ADAPTER_FILE)), load_file(str(killed / ADAPTER_FILE))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f"killed at step {kill_at}"
    first, second = (json.loads((r / METRICS_FILE).read_text(encoding="utf-8")) for r in (whole, killed))
    assert first["cases"] == second["cases"] and first["val"] == second["val"]
    assert second["global_step"] == steps
    assert second["cost"]["resumed_from_step"] == kill_at // 2 * 2  # the last checkpoint before the kill
    assert _curve(whole) == _curve(killed) and [s for s, _ in _curve(killed)] == list(range(steps))
    losses = {loss for _, loss in _curve(whole)}
    assert len(losses) > 1  # the curve moves: a different sample order would show


def test_resume_refusal_leaves_config_unchanged(world, tmp_path, capsys, monkeypatch):
    """A resume with another rank, through scripts/train.py's own code (run in this process; its real start-up is
    test_scripts_exit_2_with_one_line's): refused, config.yaml and .hydra/ as they were."""
    monkeypatch.delenv("SEGADAPT_DEBUG", raising=False)
    run = tmp_path / "run"
    shutil.copytree(world["finished"], run)
    (run / METRICS_FILE).unlink()  # an unfinished run with its checkpoint
    before = _tree(run)
    capsys.readouterr()
    code = run_script_in_process(REPO / "scripts/train.py", *world["common"], f"run_dir={run}", "ckpt_path=last",
                                 "adapter.spec.rank=3")
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        f"error: ckpt_path=last: these settings differ from the run in {run}: module.adapter.rank: 8 -> 3; resume "
        "with the run's own settings, or start it anew (overwrite=true, or another run_dir)"], err[-2000:]
    assert _tree(run) == before and CONFIG_FILE in before


# ---- checkpoints that cannot run code, and one training per run folder --------------------------------------
def test_planted_checkpoint_runs_no_code_through_the_script(world, tmp_path, capsys, monkeypatch):
    """A last.ckpt whose unpickling would create a file: scripts/train.py's own code (run in this process) with
    ``ckpt_path=last`` refuses it in one line naming it; the file is never created, the folder unchanged (a plain
    rerun, which resumes a killed run: the table above)."""
    monkeypatch.delenv("SEGADAPT_DEBUG", raising=False)
    run, marker, proof = tmp_path / "run", tmp_path / "marker", tmp_path / "proof"
    shutil.copytree(world["killed"], run)
    checkpoint = torch.load(run / CHECKPOINT_FILE, weights_only=True)
    torch.save({**checkpoint, "loops": Plant(proof)}, tmp_path / "proof.ckpt")
    torch.load(tmp_path / "proof.ckpt", weights_only=False)
    assert proof.exists()  # the plant is real: a plain unpickling runs it
    torch.save({**checkpoint, "loops": Plant(marker)}, run / CHECKPOINT_FILE)
    before = _tree(run)
    capsys.readouterr()
    code = run_script_in_process(REPO / "scripts/train.py", *world["common"], f"run_dir={run}", "ckpt_path=last")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: refused to resume from {run / CHECKPOINT_FILE}: it holds pickled objects"), err
    assert not marker.exists() and _tree(run) == before


def test_a_checkpoint_replaced_after_the_check_is_refused_by_the_load_itself(world, tmp_path, capsys, monkeypatch):
    """The resume's own load (Lightning's, with weights_only=True) refuses a planted last.ckpt in one line too,
    when the check before it did not see the file (replaced in between)."""
    import segadapt.runs as run_module

    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(world["killed"], run)
    checkpoint = torch.load(run / CHECKPOINT_FILE, weights_only=True)
    torch.save({**checkpoint, "loops": Plant(marker)}, run / CHECKPOINT_FILE)
    monkeypatch.setattr(run_module, "read_resume_checkpoint", lambda path: {})  # the check sees nothing
    with pytest.raises(SystemExit) as exit_:
        _run_job([*world["common"], f"run_dir={run}", "ckpt_path=last"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: refused to resume from {run / CHECKPOINT_FILE}: it holds pickled objects "), err
    assert "GLOBAL io.open" in err[0] and not marker.exists()


def test_what_last_ckpt_holds_loads_with_weights_only(world, tmp_path):
    """Everything segadapt and Lightning write into last.ckpt (loops, optimiser and scheduler states, hyper-
    parameters, the callbacks' states: model selection, early stopping, training figures, settings digest)
    loads with torch.load(weights_only=True) and no allow-listed class."""
    run = tmp_path / "run"
    train(_compose([*world["common"], f"run_dir={run}", "selection.every_n_steps=1", "selection.patience=1",
                    "trainer.max_steps=3"]))
    checkpoint = torch.load(run / CHECKPOINT_FILE, weights_only=True)
    names = {key.split("{")[0] for key in checkpoint["callbacks"]}
    assert {"TrainStats", "SelectBest", "EarlyStopping", "ModelCheckpoint", "RunSettings"} <= names
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"] and checkpoint["hyper_parameters"]
    assert checkpoint["callbacks"]["SelectBest"]["best_state"]  # the selected network's tensors


class _CrashAtTrainEnd(pl.Callback):
    """Dies after the checkpoint of the last step was written, before training ends (like a kill in the final
    validation): the checkpoint holds no peak memory yet."""

    def on_train_end(self, trainer, pl_module):
        raise RuntimeError("simulated crash")


def test_resume_from_the_last_steps_checkpoint_writes_every_figure(world, tmp_path):
    """A run killed after its last step's checkpoint: the plain rerun resumes it, trains nothing, and writes
    metrics with every training figure (was: KeyError 'peak_mem_mb') equal to the uninterrupted run's metrics."""
    run = tmp_path / "run"
    settings = [*world["common"], f"run_dir={run}", "checkpoint_every=1"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_compose(settings), callbacks=[_CrashAtTrainEnd()])
    assert not (run / METRICS_FILE).exists()
    assert "peak_mem_mb" not in torch.load(run / CHECKPOINT_FILE, weights_only=True)["callbacks"]["TrainStats"]["stats"]
    result = train(_compose(settings))
    assert set(TRAIN_STATS_KEYS) <= set(result["cost"]) and result["cost"]["resumed_from_step"] == 2
    assert "peak memory" in format_result(result, run)
    finished = read_metrics(world["finished"])
    assert read_metrics(run)["val"] == finished["val"] and result["cases"] == finished["cases"]
    assert result["extended_from_steps"] is None  # resumed with its own max_steps


HOLD_DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from segadapt.training import train

    signals = Path(sys.argv[1])

    class Hold(pl.Callback):  # mid-training, wait until the test says go
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                (signals / "held").touch()
                deadline = time.monotonic() + 300
                while not (signals / "go").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)

    with initialize_config_dir(config_dir=sys.argv[2], version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[3:])
    train(OmegaConf.to_container(cfg, resolve=True), callbacks=[Hold()])
""")


def test_a_second_training_into_a_held_run_folder_is_refused(world, tmp_path, capsys, monkeypatch):
    """Two trainings into one run folder: while the first holds it (mid-training, in another process), scripts/
    train.py into the same folder (its own code, in this process) is one line naming the first's pid, exit 2, and
    changes no file; the first then finishes with its own settings, curve and metrics."""
    monkeypatch.delenv("SEGADAPT_DEBUG", raising=False)
    run, steps = tmp_path / "run", 3
    driver = tmp_path / "hold.py"
    driver.write_text(HOLD_DRIVER, encoding="utf-8")
    first = subprocess.Popen([sys.executable, str(driver), str(tmp_path), str(CONFIGS), *world["common"],
                              f"trainer.max_steps={steps}", "checkpoint_every=1", f"run_dir={run}"],
                             cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             encoding="utf-8", errors="replace")
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "held").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:] if first.poll() else ""
            time.sleep(0.1)
        before = _tree(run)
        assert (run / CHECKPOINT_FILE).is_file() and (run / ".lock").read_text().strip() == str(first.pid)
        capsys.readouterr()  # the second: scripts/train.py's own code, in this process (the lock is the first's)
        code = run_script_in_process(REPO / "scripts/train.py", *world["common"], "trainer.max_steps=5", f"run_dir={run}")
        err = capsys.readouterr().err
        assert code == 2 and err.strip().splitlines() == [
            f"error: {run} is in use by another training (pid {first.pid}); wait for it to end, or use another "
            "run_dir"], err[-2000:]
        assert _tree(run) == before
        with pytest.raises(BlockingIOError, match=f"in use by another training \\(pid {first.pid}\\)"):
            with run_folder_lock(run):  # the lock fit_run takes at its first write (past the checks)
                pass
    finally:
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert read_metrics(run)["global_step"] == steps
    assert yaml.safe_load((run / CONFIG_FILE).read_text(encoding="utf-8"))["trainer"]["max_steps"] == steps
    assert [s for s, _ in _curve(run)] == list(range(steps))


# `auto` values of data=dataset_json (filled by the plan): an override of the planned type is accepted, nonsense is
# refused naming the key. (data, overrides, the expected message regex, or None: accepted)
AUTO_TYPE_CASES = [
    ("planned types", ["data.preprocess.patch_size=[64,64,32]", "data.preprocess.slice_size=[96,96]",
                       "data.batch_size=2", "data.preprocess.target_spacing=[1,1,2.5]", "data.preprocess.intensity=mri",
                       "data.preprocess.spatial_dims=3", "data.preprocess.orientation=RAS"], None),
    ("auto kept", ["data.preprocess.patch_size=auto", "data.batch_size=auto"], None),
    ("patch size element not an integer", ["data.preprocess.patch_size=[64,x]"],
     r"^data\.preprocess\.patch_size\[1\]='x': expected an integer, got str$"),
    ("patch size not a list", ["data.preprocess.patch_size=big"],
     r"^data\.preprocess\.patch_size='big': expected a list, got str$"),
    ("batch size not an integer", ["data.batch_size=two"], r"^data\.batch_size='two': expected an integer, got str$"),
    ("spacing element not a number", ["data.preprocess.target_spacing=[1,a,1]"],
     r"^data\.preprocess\.target_spacing\[1\]='a': expected a number, got str$"),
    ("spatial dims not an integer", ["data.preprocess.spatial_dims=3d"],
     r"^data\.preprocess\.spatial_dims='3d': expected an integer, got str$"),
    ("planned schedule types", ["trainer.max_steps=400", "pretrain.max_steps=900", "optim.warmup_steps=5",
                                "selection.every_n_steps=20", "selection.patience=2"], None),
    ("no patience instead of the planned", ["selection.patience=null"], None),
    ("max steps not an integer", ["trainer.max_steps=many"], r"^trainer\.max_steps='many': expected an integer, got str$"),
    ("pretraining steps not an integer", ["pretrain.max_steps=1.5"],
     r"^pretrain\.max_steps=1\.5: expected an integer, got float$"),
    ("warm-up not an integer", ["optim.warmup_steps=some"], r"^optim\.warmup_steps='some': expected an integer, got str$"),
    ("selection interval not an integer", ["selection.every_n_steps=often"],
     r"^selection\.every_n_steps='often': expected an integer, got str$"),
    ("step budget not a number", ["plan.step_s=fast"], r"^plan\.step_s='fast': expected a number, got str$"),
]


@pytest.mark.parametrize("name, overrides, message", AUTO_TYPE_CASES, ids=[c[0] for c in AUTO_TYPE_CASES])
def test_auto_values_take_the_planned_type(tmp_path, name, overrides, message):
    from segadapt.cli import hydra_jobs
    from segadapt.training.config import TrainConfig

    argv = ["data=dataset_json", f"data.dataset_json={tmp_path / 'dataset.json'}", *overrides]
    (cfg,) = list(hydra_jobs(CONFIGS, "train", argv))
    if message is None:
        TrainConfig.from_cfg(cfg)
        return
    with pytest.raises(ValueError) as info:
        TrainConfig.from_cfg(cfg)
    assert re.search(message, str(info.value)), str(info.value)
