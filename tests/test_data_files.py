"""Atomic writers: files appear whole with the usual permissions, and nothing is left behind on failure."""

from __future__ import annotations

import json
import os

import pytest

from segadapt.io import atomic_path, write_json


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_finished_files_follow_the_current_umask(tmp_path, umask_027):
    path = write_json(tmp_path / "a" / "doc.json", {"x": 1})
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": 1}
    assert path.stat().st_mode & 0o777 == 0o640
    assert os.listdir(path.parent) == ["doc.json"]


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "doc.json", {"x": 1})
    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".json") and tmp.exists()
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["doc.json"]
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": 1}


def test_temporary_names_are_unique(tmp_path):
    with atomic_path(tmp_path / "v.nii.gz") as a, atomic_path(tmp_path / "v.nii.gz") as b:
        assert a != b and a.name.endswith(".nii.gz")
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert (tmp_path / "v.nii.gz").read_bytes() == b"a" and os.listdir(tmp_path) == ["v.nii.gz"]
