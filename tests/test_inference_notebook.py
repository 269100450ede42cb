"""notebooks/inference_ct.ipynb runs clean (nbclient) on the demo runs and writes its overlay and mask."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from segadapt.data import load_dataset_json  # noqa: E402
from segadapt.training import read_run_config  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inference_ct.ipynb"


def run_notebook(demo_runs, out, monkeypatch, scan=None) -> tuple[object, str]:
    monkeypatch.setenv("SEGADAPT_RUNS", str(demo_runs[0].parent))  # the kernel inherits the environment
    monkeypatch.setenv("SEGADAPT_INFERENCE_OUT", str(out))
    if scan is None:
        monkeypatch.delenv("SEGADAPT_CT", raising=False)
    else:
        monkeypatch.setenv("SEGADAPT_CT", str(scan))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed clean
    nbclient.NotebookClient(notebook, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    return notebook, text


def test_inference_notebook_runs_and_reports_the_ensemble_volume(demo_runs, tmp_path, monkeypatch):
    notebook, text = run_notebook(demo_runs, tmp_path, monkeypatch)
    assert "making tiny demo runs" not in text  # it used the given runs
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
