"""scripts/profile_models.py writes its outputs atomically: whole files or none, no temp files left."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_models.py"
ROW = {"model": "m", "parameters": 10, "input_shape": [1, 1, 8, 8], "forward_s_best": 0.1,
       "forward_s_median": 0.2, "forward_s_all": [0.1, 0.2], "presets": {}}


@pytest.fixture()
def script(monkeypatch):
    spec = importlib.util.spec_from_file_location("profile_models_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "profile", lambda small, repeats: [dict(ROW)])
    return module


def test_outputs_are_written(script, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["profile_models.py", "--out", str(tmp_path)])
    script.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile_models.json", "profile_models.md"]
    assert json.loads((tmp_path / "profile_models.json").read_text(encoding="utf-8"))["models"][0]["model"] == "m"
    assert "| m | 10 | 1x1x8x8 |" in (tmp_path / "profile_models.md").read_text(encoding="utf-8")


def test_failed_write_leaves_no_files(script, tmp_path, monkeypatch):
    def half_write(self, text, *args, **kwargs):
        with open(self, "w", encoding="utf-8") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sys, "argv", ["profile_models.py", "--out", str(tmp_path)])
    monkeypatch.setattr(Path, "write_text", half_write)
    with pytest.raises(OSError, match="No space left"):
        script.main()
    assert list(tmp_path.iterdir()) == []
