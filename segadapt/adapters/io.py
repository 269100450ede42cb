"""Adapter files: one ``.safetensors`` file holding only the adapter's tensors, with its JSON config
and a fingerprint of the base (module names and shapes) in the safetensors header metadata.

Read the metadata without torch: ``safetensors.safe_open(path, "pt").metadata()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import AdapterConfig
from .model import active_adapter, adapted_layers, adapter_names, inject, remove_adapter, set_active_adapter

FORMAT = "segadapt-adapter"
FORMAT_VERSION = "1"


def base_fingerprint(model: nn.Module) -> list[list]:
    """[[name, shape], ...] of the base model's state (adapter tensors left out, ``.base_layer``
    folded away, so the fingerprint is the same before and after injection)."""
    entries = []
    for key, tensor in model.state_dict().items():
        if ".adapters." in f".{key}":
            continue
        base_key = ".".join(part for part in key.split(".") if part != "base_layer")
        entries.append([base_key, list(tensor.shape)])
    return entries


def fingerprint_digest(entries: list[list]) -> str:
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def first_mismatch(expected: list[list], actual: list[list]) -> Optional[str]:
    """A sentence naming the first module whose parameters differ between two fingerprints."""
    have = {name: shape for name, shape in actual}
    for name, shape in expected:
        module = name.rpartition(".")[0] or name
        if name not in have:
            return f"module '{module}' ('{name}', shape {shape}) does not exist in this model"
        if have[name] != shape:
            return f"module '{module}': '{name}' has shape {have[name]} in this model but {shape} in the file"
    want = {name for name, _ in expected}
    extra = next((name for name, _ in actual if name not in want), None)
    if extra is not None:
        return f"module '{extra.rpartition('.')[0] or extra}' ('{extra}') exists in this model but not in the file's base"
    return None


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """{'<module>.<tensor>': tensor} of one adapter."""
    return {
        f"{layer_name}.{key}": tensor
        for layer_name, layer in adapted_layers(model)
        if name in layer.adapters
        for key, tensor in layer.adapters[name].state_dict().items()
    }


def save_adapter(model: nn.Module, path: Union[str, Path], name: Optional[str] = None) -> Path:
    """Write one adapter (default: the active one) to ``path`` atomically; returns the path."""
    name = name or active_adapter(model)
    if name is None or name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r} to save; injected adapters: {adapter_names(model)}")
    config = next(layer.adapters[name].config for _, layer in adapted_layers(model) if name in layer.adapters)
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in adapter_state(model, name).items()}
    fingerprint = base_fingerprint(model)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": name,
        "config": json.dumps(config.to_dict()),
        "base_fingerprint": json.dumps(fingerprint),
        "base_digest": fingerprint_digest(fingerprint),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_adapter_metadata(path: Union[str, Path]) -> tuple[AdapterConfig, list[list], dict]:
    """(config, base fingerprint, raw metadata) of an adapter file; clear errors for other files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a segadapt adapter file (no '{FORMAT}' metadata)")
    return AdapterConfig.from_dict(json.loads(metadata["config"])), json.loads(metadata["base_fingerprint"]), metadata


def load_adapter(model: nn.Module, path: Union[str, Path], name: Optional[str] = None, active: bool = True) -> nn.Module:
    """Inject the adapter stored in ``path`` into ``model`` and load its weights (in place).

    ``name`` defaults to the name it was saved under. If the model already holds an adapter of that
    name (e.g. injected from a training config), its config must match the file's.

    Raises:
        ValueError: the file was made for another base (the message names the first mismatching
            module), for another method or rank than the adapter already injected, or its tensors
            do not fit. The model is left as it was.
        RuntimeError: the adapter ``name`` on the model is merged (unmerge first).
    """
    path = Path(path)
    config, fingerprint, metadata = read_adapter_metadata(path)
    name = name or metadata.get("adapter_name", "default")
    mismatch = first_mismatch(fingerprint, base_fingerprint(model))
    if mismatch is not None:
        raise ValueError(f"adapter file {path} was made for another base model: {mismatch}")

    injected_here = name not in adapter_names(model)
    previous = active_adapter(model)
    if injected_here:
        inject(model, config, name=name, active=active)
    else:
        merged = next((layer_name for layer_name, layer in adapted_layers(model) if layer.merged_adapter == name), None)
        if merged is not None:  # new tensors under a merged W would make unmerge() restore a wrong W0
            raise RuntimeError(f"adapter '{name}' is merged into '{merged}'; unmerge() before loading {path} into it")
        existing = next(layer.adapters[name].config for _, layer in adapted_layers(model) if name in layer.adapters)
        differing = [k for k, v in config.to_dict().items() if existing.to_dict()[k] != v and k not in ("dropout", "compute")]
        if differing:
            detail = ", ".join(f"{k}: file {config.to_dict()[k]!r} vs model {existing.to_dict()[k]!r}" for k in differing)
            raise ValueError(f"adapter file {path} does not match adapter '{name}' already on the model ({detail})")
    try:
        expected = adapter_state(model, name)
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or unexpected:
                raise ValueError(f"adapter file {path} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
            loaded = {key: handle.get_tensor(key) for key in expected}
        for key, tensor in loaded.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"adapter file {path}: '{key}' has shape {list(tensor.shape)}, expected {list(expected[key].shape)}")
        with torch.no_grad():
            for key, tensor in loaded.items():
                expected[key].copy_(tensor)
    except Exception:
        if injected_here:
            remove_adapter(model, name)
            set_active_adapter(model, previous)  # inject made `name` active and froze `previous`
        raise
    return model
