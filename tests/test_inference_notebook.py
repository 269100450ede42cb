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

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inference_ct.ipynb"


def test_inference_notebook_runs_and_reports_the_ensemble_volume(demo_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGADAPT_RUNS", str(demo_runs[0].parent))  # the kernel inherits the environment
    monkeypatch.setenv("SEGADAPT_INFERENCE_OUT", str(tmp_path))
    monkeypatch.delenv("SEGADAPT_CT", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed clean
    nbclient.NotebookClient(notebook, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "making tiny demo runs" not in text  # it used the given runs
    (row,) = csv.DictReader(open(tmp_path / "predictions" / "volumes.csv", newline="", encoding="utf-8"))
    printed = re.search(r"ensemble of 3: lesion volume ([0-9.]+) mL", text)
    assert printed and printed.group(1) == row["lesion_volume_ml"]
    assert len(re.findall(r"fold\d alone: [0-9.]+ mL", text)) == 3
    png = tmp_path / "inference_overlay.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
