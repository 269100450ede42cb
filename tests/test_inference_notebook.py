"""notebooks/inference_ct.ipynb runs clean (nbclient): on the fold runs scripts/train.py wrote, where it wrote
them; on given demo runs, labelled untrained; without runs, saying how to train them."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from segadapt.data import load_dataset_json  # noqa: E402
from segadapt.runs import read_run_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "inference_ct.ipynb"
TINY = ["trainer.max_steps=2", "pretrain.max_steps=2", "data.phantom.n=3", "source.phantom.n=3", "source.n_folds=3",
        "data.phantom.shape=[32,32,16]", "source.phantom.shape=[32,32,16]", "data.phantom.spacing=[6.9,6.9,10.0]",
        "source.phantom.spacing=[6.9,6.9,10.0]", "data.preprocess.slice_size=[32,32]",
        "data.preprocess.patch_size=[32,32,16]", "source.preprocess.slice_size=[32,32]",
        "source.preprocess.patch_size=[32,32,16]", "selection.inner_fraction=0", "eval_base=false",
        "trainer.enable_progress_bar=false"]  # scripts/train.py's demo, a few steps on small phantoms


def run_notebook(demo_runs, out, monkeypatch, scan=None, cwd=NOTEBOOK.parent) -> tuple[object, str]:
    if demo_runs is None:
        monkeypatch.delenv("SEGADAPT_RUNS", raising=False)
    else:
        monkeypatch.setenv("SEGADAPT_RUNS", str(demo_runs[0].parent))  # the kernel inherits the environment
    monkeypatch.setenv("SEGADAPT_INFERENCE_OUT", str(out))
    if scan is None:
        monkeypatch.delenv("SEGADAPT_CT", raising=False)
    else:
        monkeypatch.setenv("SEGADAPT_CT", str(scan))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed clean
    nbclient.NotebookClient(notebook, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    return notebook, text


def test_inference_notebook_runs_and_reports_the_ensemble_volume(demo_runs, tmp_path, monkeypatch):
    notebook, text = run_notebook(demo_runs, tmp_path, monkeypatch)
    assert "no trained fold runs" not in text  # it used the given runs, and says what they are
    assert "UNTRAINED DEMO: multiview_unet with 3 adapter(s)" in text
    assert "UNTRAINED DEMO runs: the mask is noise, not a segmentation. ensemble of 3" in text
    assert f"outputs: {tmp_path}" in text
    # the default scan: none of the three folds trained on it (each dataset case trained two of them)
    scan = re.search(r"^(\S+\.nii\.gz) \(trained on by no fold\)$", text, re.M)
    assert scan and Path(scan.group(1)).is_relative_to(tmp_path)
    trained = {c.image for c in load_dataset_json(read_run_config(demo_runs[0])["datamodule"]["dataset_json"]).cases}
    assert Path(scan.group(1)) not in trained
    assert "modality CT, field of view 220 mm: the run's first CT window (head), level 40, width 80" in text
    (row,) = csv.DictReader(open(tmp_path / "predictions" / "volumes.csv", newline="", encoding="utf-8"))
    printed = re.search(r"ensemble of 3: lesion volume ([0-9.]+) mL", text)
    assert printed and printed.group(1) == row["lesion_volume_ml"]
    assert len(re.findall(r"fold\d alone: [0-9.]+ mL", text)) == 3
    png = tmp_path / "inference_overlay.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert not (NOTEBOOK.parents[1] / "outputs" / "inference_ct").exists()


@pytest.mark.parametrize("name", ["ct_abdomen_totalseg/ct_dicom", "hippocampus_msd/dicom_hcrop"])
def test_notebook_window_follows_the_scans_modality(name, demo_runs, shared_data, tmp_path, monkeypatch):
    scan = shared_data / name
    if not scan.exists():
        pytest.skip(f"{scan} not found")
    _, text = run_notebook(demo_runs, tmp_path, monkeypatch, scan)
    expected = ("modality CT, field of view 500 mm: soft-tissue window, level 40, width 400" if "ct_" in name
                else "modality MRI, field of view 51 mm: 1st-99th percentile")
    assert expected in text


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory) -> Path:
    """A project folder where `python scripts/train.py -m fold=0,1,2 adapter=cp_lora` (tiny settings) ran."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from segadapt.training import train

    project = tmp_path_factory.mktemp("project")
    (project / "notebooks").mkdir()
    here = Path.cwd()
    os.chdir(project)  # training writes runs/ and data/ under the folder it runs in
    try:
        for fold in range(3):
            with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
                cfg = compose("train", overrides=[*TINY, "adapter=cp_lora", f"fold={fold}"])
            train(OmegaConf.to_container(cfg, resolve=True))
    finally:
        os.chdir(here)
    return project


def test_the_notebook_uses_the_runs_training_wrote_where_it_wrote_them(trained_project, tmp_path, monkeypatch):
    from segadapt.inference import Predictor

    _, text = run_notebook(None, tmp_path, monkeypatch, cwd=trained_project / "notebooks")
    runs = [trained_project / "runs" / "phantom_sah" / "multiview_unet" / "cp_lora" / f"fold{k}" for k in range(3)]
    assert "trained runs: multiview_unet with 3 adapter(s)" in text
    assert [Path(line.strip()) for line in text.splitlines() if line.startswith("   ")] == runs
    assert "UNTRAINED" not in text and "no trained fold runs" not in text and not (tmp_path / "demo").exists()
    scan = Path(re.search(r"^(\S+\.nii\.gz) \(trained on by no fold\)$", text, re.M).group(1))
    expected = Predictor.from_runs(runs, device="cpu").predict(scan).volume_ml  # the ensemble of those very runs
    printed = re.search(r"^ensemble of 3: lesion volume ([0-9.]+) mL", text, re.M)
    assert printed and float(printed.group(1)) == pytest.approx(expected, abs=1e-4)


def test_without_trained_runs_the_notebook_says_how_to_train_them(tmp_path, monkeypatch):
    project = tmp_path / "fresh_clone"
    (project / "notebooks").mkdir(parents=True)
    _, text = run_notebook(None, tmp_path / "out", monkeypatch, cwd=project / "notebooks")
    pattern = project / "runs" / "phantom_sah" / "multiview_unet" / "cp_lora" / "fold*"
    assert f"no trained fold runs at {pattern}. Train them (a few minutes on a CPU) with, in {project}:" in text
    assert "    python scripts/train.py -m fold=0,1,2 adapter=cp_lora\n" in text
    assert "UNTRAINED DEMO: multiview_unet" in text
    assert re.search(r"^UNTRAINED DEMO runs: the mask is noise, not a segmentation. ensemble of 3: lesion volume", text, re.M)
