"""Every file segadapt writes gets the usual permissions, 0666 & ~umask (safetensors' save_file and mkstemp make
0600 files whatever the umask): a whole run folder and a predictions folder, under umask 077 and 022."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from segadapt.data import make_phantom_dataset
from segadapt.inference import Predictor, predict_to_folder
from segadapt.training import RunConfig, fit_run
from segadapt.training.demo import DEMO_MODEL


@pytest.fixture()
def umask():
    """``umask(mask)`` sets the process umask for the test; the old one comes back afterwards.

    fsspec (Lightning's checkpoint writer) reads the umask once per process (``get_umask`` is an lru_cache), as
    right for a real run, whose umask does not change; a test that changes it mid-process clears that cache.
    """
    from fsspec.implementations.local import get_umask

    def set_umask(mask: int) -> None:
        os.umask(mask)
        get_umask.cache_clear()

    old = os.umask(0o022)
    os.umask(old)
    yield set_umask
    set_umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask", [0o077, 0o022])
def test_run_and_prediction_files_follow_the_umask(mask, umask, tmp_path):
    umask(mask)
    dataset = make_phantom_dataset(tmp_path / "data", "tbi", 2, 0, (24, 24, 12), (9.0, 9.0, 13.0))
    run = tmp_path / "run"
    preprocess = {"slice_size": [24, 24], "samples_per_volume": 2, "augment": False}
    fit_run(RunConfig(run, {"experiment": "perm", "method": "scratch", "fold": 0},
                      {"model": "multiview_unet", "model_kwargs": {"in_channels": 3, **DEMO_MODEL}, "adapter": "scratch"},
                      {"dataset_json": str(dataset), "fold": 0, "n_folds": 2, "preprocess": preprocess, "batch_size": 2},
                      {"accelerator": "cpu", "devices": 1, "max_steps": 1, "enable_progress_bar": False,
                       "enable_model_summary": False, "num_sanity_val_steps": 0, "check_val_every_n_epoch": 10_000},
                      eval_base=False))
    written = modes(run)
    assert {"model.safetensors", "config.yaml", "fingerprint.json", "metrics.json", "last.ckpt",
            "logs/metrics.csv"} <= set(written)
    predict_to_folder(Predictor.from_runs([run], device="cpu"), tmp_path / "data" / "imagesTr", tmp_path / "pred",
                      probabilities=True, progress=False)
    written.update({f"pred/{k}": v for k, v in modes(tmp_path / "pred").items()})
    assert len(written) > 10
    expected = 0o666 & ~mask
    assert {name: oct(m) for name, m in written.items() if m != expected} == {}
