"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import SimpleITK as sitk
import tqdm

# compute="auto" from the FLOP model, not from timings: the same order on every machine and run
# (tests/test_adapters_calibration.py switches measurement on where it tests it)
os.environ.setdefault("SEGADAPT_AUTO_COMPUTE", "cost_model")

# No tqdm monitor thread (tqdm's documented switch; the monitor only tunes the refresh of slow bars). The first
# progress bar of the session starts it and a disabled bar never stops it, so every later in-process user error
# waited 5 s for it (segadapt.errors._let_threads_finish lets other threads end before the exit): 5 s per bad-input case.
tqdm.tqdm.monitor_interval = 0


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data folder ($SEGADAPT_SHARED_DATA, default <repo>/../shared/data); skip if absent."""
    root = Path(os.environ.get("SEGADAPT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real sample data not found at {root} (set SEGADAPT_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory) -> list[Path]:
    """Three tiny cp_lora fold runs on one tiny base (segadapt.training.demo.make_demo_runs, a few steps each)."""
    from segadapt.training.demo import make_demo_runs

    return make_demo_runs(tmp_path_factory.mktemp("demo"), steps=(2, 2))


def _write_dicom_series(folder: Path, image: sitk.Image, uid: str, first_instance: int = 0) -> None:
    """Write `image` as one DICOM file per slice (SimpleITK's series-from-array recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0020|000e": uid,
            "0020|000d": uid + ".0",
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(first_instance + k),
            "0008|0018": f"{uid}.{k + 1}",
        }.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid}-{k:03d}.dcm"))
        writer.Execute(piece)


@pytest.fixture(scope="session")
def write_dicom_series():
    """``write(folder, sitk_image, series_uid, first_instance=0)``: one DICOM file per slice."""
    return _write_dicom_series
