"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data folder ($SEGADAPT_SHARED_DATA, default <repo>/../shared/data); skip if absent."""
    root = Path(os.environ.get("SEGADAPT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real sample data not found at {root} (set SEGADAPT_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory) -> list[Path]:
    """Three tiny cp_lora fold runs on one tiny base (segadapt.inference.make_demo_runs, a few steps each)."""
    from segadapt.inference import make_demo_runs

    return make_demo_runs(tmp_path_factory.mktemp("demo"), steps=(2, 2))
