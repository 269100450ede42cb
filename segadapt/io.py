"""Atomic files, JSON and safetensors: every file segadapt writes appears whole or not at all.

Each writer fills a temporary file in the destination folder and then `os.replace`s it onto the final
name, so an interrupted run never leaves a half-written JSON or weight file behind. Output paths are
checked before any work (:func:`check_output_file`, :func:`check_output_folder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from safetensors.torch import save


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffixes); on success move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    tmp = path.parent / f".{path.name.split('.')[0]}-{uuid.uuid4().hex}{suffix}"
    # Mode 0o666 so the usual umask applies, as for any new file (mkstemp would make it 0600).
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_path` left beside `path` when its process was killed (kill -9)."""
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    pattern = re.compile(rf"\.{re.escape(path.name.split('.')[0])}-[0-9a-f]{{32}}{re.escape(suffix)}")
    return sorted(p for p in path.parent.glob(f".*{suffix}") if pattern.fullmatch(p.name)) if path.parent.is_dir() else []


def _writable_ancestor(path: Path, what: str) -> None:
    """Raise ValueError unless the nearest existing folder on the way to `path` is a writable folder."""
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be written: folder {ancestor} is not writable")


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Refuse, before any work, an output file name that is a folder or lies in a folder that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    _writable_ancestor(path.parent if path.exists() else path, what)
    return path


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse, before any work, an output folder that is a file or cannot be created or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    _writable_ancestor(path, what)
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write` on a temporary path beside `path`, then move the finished file onto `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def file_signature(path: str | os.PathLike) -> tuple:
    """(size, modification time) of a file; of a folder (a DICOM series), (name, size, mtime) of each file in it."""
    path = Path(path)
    if path.is_dir():
        return tuple((str(f.relative_to(path)), *file_signature(f)) for f in sorted(path.rglob("*")) if f.is_file())
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (of a folder: of its files' names and bytes), computed once per process for each
    (resolved path, :func:`file_signature`)."""
    path = Path(path).resolve()
    return _digest(path, file_signature(path))


@lru_cache(maxsize=4096)
def _digest(path: Path, signature: tuple) -> str:
    digest = hashlib.sha256()
    for file in [path] if not path.is_dir() else [path / entry[0] for entry in signature]:
        if file != path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in `path`; FileNotFoundError ('`what` not found: path') or ValueError (bad JSON, not an
    object) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: top level must be an object")
    return value


def write_json(path: str | os.PathLike, obj: object) -> Path:
    """Write `obj` as indented JSON to `path`, atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` (name -> torch tensor) as a safetensors file, atomically, with the umask's permissions
    (``safetensors.torch.save_file`` makes 0600 files; the bytes are written here instead)."""
    data = save(dict(tensors), metadata=None if metadata is None else dict(metadata))
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))
