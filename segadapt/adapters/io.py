"""Adapter files: one ``.safetensors`` file holding only the adapter's tensors, with its JSON config
and a fingerprint of the base in the safetensors header metadata: module names and shapes, and a digest
of the base's weights (:func:`base_weights_digest`), so an adapter is refused on a base of the same
architecture with other weights.

Modules trained in full beside the adapter (``AdapterConfig.train_modules``) are stored with it: the
state of the adapter's copy (parameters and buffers) as ``<module>.<tensor>``, their names in the
metadata (``train_modules``, JSON list). Their names and shapes are part of the base fingerprint (a base
without the module, or with another shape, is refused); their weights are left out of the digest (a
new head is freshly initialised on every build of the base).

Read the metadata without torch: ``safetensors.safe_open(path, "pt").metadata()``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from segadapt.io import save_safetensors

from .config import AdapterConfig
from .model import active_adapter, adapted_layers, adapter_names, inject, remove_adapter, set_active_adapter
from .trained import trained_modules

FORMAT = "segadapt-adapter"
FORMAT_VERSION = "1"
WEIGHTS_DIGEST = "strided-1024-v1"  # how base_weights_digest samples; files with another scheme are not compared
SAMPLES_PER_TENSOR = 1024


WRAPPER_PARTS = ("base_layer", "original_module")  # AdaptedLayer's and TrainedModule's hold of the base's module


def _base_key(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in WRAPPER_PARTS)


def _is_adapter_key(key: str) -> bool:
    """An adapter's tensor, or that of an adapter's copy of a trained module."""
    return ".adapters." in f".{key}" or ".modules_to_save." in f".{key}"


def base_fingerprint(model: nn.Module) -> list[list]:
    """[[name, shape], ...] of the base model's state (adapter tensors and trained copies left out,
    ``.base_layer`` / ``.original_module`` folded away, so the fingerprint is the same before and after
    injection)."""
    entries = []
    for key, tensor in model.state_dict().items():
        if _is_adapter_key(key):
            continue
        entries.append([_base_key(key), list(tensor.shape)])
    return entries


def base_weights_digest(model: nn.Module, leave_out: Optional[list[str]] = None) -> str:
    """SHA-256 over the base's parameters (adapter parameters, trained copies and the parameters of the
    modules named in ``leave_out`` -- an adapter's ``train_modules`` -- left out, ``.base_layer`` /
    ``.original_module`` folded away):
    per parameter, in name order, its name, dtype, shape and the bytes of ``SAMPLES_PER_TENSOR`` elements
    at a fixed stride (``flat[::max(1, n // 1024)][:1024]``).

    Parameters only: buffers such as BatchNorm running statistics move while an adapter trains, the frozen
    parameters do not. A sample, not every byte, so it costs milliseconds even on a ViT-B (~86M
    parameters): it tells another base apart (any retraining moves every sampled weight), not a single
    edited weight. Call it with the adapters unmerged (a merged layer holds W, not W0).
    """
    digest = hashlib.sha256()
    roots = [f"{module}." for module in leave_out or []]
    params = sorted((_base_key(name), p) for name, p in model.named_parameters(remove_duplicate=False)
                    if not _is_adapter_key(name) and not _base_key(name).startswith(tuple(roots)))
    for name, param in params:
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)][:SAMPLES_PER_TENSOR].contiguous().cpu()
        digest.update(f"{name}|{param.dtype}|{list(param.shape)}|".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    """{'<module>.<tensor>': tensor} of one adapter: its layers' tensors, then the state of its copies of
    trained modules."""
    state = {
        f"{layer_name}.{key}": tensor
        for layer_name, layer in adapted_layers(model)
        if name in layer.adapters
        for key, tensor in layer.adapters[name].state_dict().items()
    }
    for module_name, copy in trained_copies(model, name).items():
        state.update({f"{module_name}.{key}": tensor for key, tensor in copy.state_dict().items()})
    return state


def trained_copies(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """{module name: adapter ``name``'s trained copy} of the modules it trains in full."""
    return {module_name: wrapper.modules_to_save[name] for module_name, wrapper in trained_modules(model)
            if name in wrapper.modules_to_save}


def save_adapter(model: nn.Module, path: Union[str, Path], name: Optional[str] = None) -> Path:
    """Write one adapter (default: the active one) to ``path`` atomically; returns the path."""
    name = name or active_adapter(model)
    if name is None or name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r} to save; injected adapters: {adapter_names(model)}")
    config = next(layer.adapters[name].config for _, layer in adapted_layers(model) if name in layer.adapters)
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in adapter_state(model, name).items()}
    merged = next((layer_name for layer_name, layer in adapted_layers(model) if layer.merged_adapter is not None), None)
    if merged is not None:
        raise RuntimeError(f"an adapter is merged into '{merged}': unmerge() before saving {path} (the file "
                           "records a digest of the base weights, which a merged layer no longer holds)")
    fingerprint = base_fingerprint(model)
    trained = list(trained_copies(model, name))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": name,
        "config": json.dumps(config.to_dict()),
        "train_modules": json.dumps(trained),
        "base_fingerprint": json.dumps(fingerprint),
        "base_digest": fingerprint_digest(fingerprint),
        "base_weights_digest": base_weights_digest(model, trained),
        "base_weights_digest_scheme": WEIGHTS_DIGEST,
    }
    path = Path(path)
    save_safetensors(path, tensors, metadata)  # atomic, with the umask's permissions
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
    config = _metadata_json(path, metadata, "config", dict)
    fingerprint = _metadata_json(path, metadata, "base_fingerprint", list)
    _metadata_json(path, metadata, "train_modules", list, "[]")  # read again by check_base_weights
    if not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], list)
               for e in fingerprint):
        raise ValueError(f"adapter file {path}: metadata 'base_fingerprint' is not a list of [name, shape]")
    try:
        return AdapterConfig.from_dict(config), fingerprint, metadata
    except (TypeError, ValueError) as error:
        raise ValueError(f"adapter file {path}: metadata 'config' is not an adapter config: "
                         f"{' '.join(str(error).split())[:300]}") from None


def _metadata_json(path: Path, metadata: dict, key: str, kind: type, default: Optional[str] = None):
    """The JSON value of `key` in an adapter file's metadata, of type `kind`; one-line errors naming file and key."""
    text = metadata.get(key, default)
    if text is None:
        raise ValueError(f"adapter file {path}: metadata has no '{key}' (a damaged or hand-edited file)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"adapter file {path}: metadata '{key}' is not valid JSON ({error})") from None
    if not isinstance(value, kind):
        raise ValueError(f"adapter file {path}: metadata '{key}' is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def check_base_weights(model: nn.Module, path: Union[str, Path], metadata: dict, strict: bool = True) -> None:
    """Compare the file's ``base_weights_digest`` with `model`'s (:func:`base_weights_digest`).

    A file without one (written before digests existed) loads with a warning: its names and shapes were
    still checked, and refusing it would strand every earlier run folder. A different digest raises, or
    with ``strict=False`` warns.

    Raises:
        ValueError: the base has the file's names and shapes but other weights (``strict=True``).
    """
    recorded = metadata.get("base_weights_digest")
    if recorded is None or metadata.get("base_weights_digest_scheme") != WEIGHTS_DIGEST:
        warnings.warn(f"adapter file {path} records no digest of its base weights (an older file): only the base's "
                      "module names and shapes were checked", stacklevel=3)
        return
    actual = base_weights_digest(model, json.loads(metadata.get("train_modules", "[]")))
    if recorded != actual:
        message = (f"adapter file {path} was made for a base with the same modules and shapes but other weights "
                   f"(base weight digest {recorded[:12]} in the file, {actual[:12]} here)")
        if strict:
            raise ValueError(f"{message}; load the base it was trained on (or strict=False / --force to load anyway)")
        warnings.warn(f"{message}; loaded anyway (strict=False)", stacklevel=3)


def check_tensor(path: Union[str, Path], key: str, tensor: torch.Tensor) -> None:
    """Refuse a weight that is not floating point or holds NaN/inf (it would load by a silent cast, or
    turn every prediction into NaN)."""
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"{path}: tensor '{key}' has dtype {tensor.dtype}, expected floating point weights")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{path}: tensor '{key}' holds {bad} NaN or infinite value(s) of {tensor.numel()}")


def load_adapter(model: nn.Module, path: Union[str, Path], name: Optional[str] = None, active: bool = True,
                 strict: bool = True) -> nn.Module:
    """Inject the adapter stored in ``path`` into ``model`` and load its weights (in place).

    ``name`` defaults to the name it was saved under. If the model already holds an adapter of that
    name (e.g. injected from a training config), its config must match the file's. ``strict=False``
    loads an adapter whose base had other weights (same names and shapes) with a warning.

    Raises:
        ValueError: the file was made for another base (the message names the first mismatching
            module, or says the weights differ), for another method or rank than the adapter already
            injected, or its tensors do not fit, are not floating point or are not finite. The model is
            left as it was.
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
    if not injected_here:
        merged = next((layer_name for layer_name, layer in adapted_layers(model) if layer.merged_adapter == name), None)
        if merged is not None:  # new tensors under a merged W would make unmerge() restore a wrong W0
            raise RuntimeError(f"adapter '{name}' is merged into '{merged}'; unmerge() before loading {path} into it")
        existing = next(layer.adapters[name].config for _, layer in adapted_layers(model) if name in layer.adapters)
        differing = [k for k, v in config.to_dict().items() if existing.to_dict()[k] != v and k not in ("dropout", "compute")]
        if differing:
            detail = ", ".join(f"{k}: file {config.to_dict()[k]!r} vs model {existing.to_dict()[k]!r}" for k in differing)
            raise ValueError(f"adapter file {path} does not match adapter '{name}' already on the model ({detail})")
    if not any(layer.merged_adapter is not None for _, layer in adapted_layers(model)):  # merged: W0 is not there
        check_base_weights(model, path, metadata, strict)
    if injected_here:
        inject(model, config, name=name, active=active)
    try:
        expected = adapter_state(model, name)
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or unexpected:
                raise ValueError(f"adapter file {path} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
            loaded = {key: handle.get_tensor(key) for key in expected}
        for key, tensor in loaded.items():
            if expected[key].dtype.is_floating_point:
                check_tensor(path, key, tensor)
            elif tensor.dtype != expected[key].dtype:  # an integer buffer (BatchNorm's num_batches_tracked)
                raise ValueError(f"adapter file {path}: '{key}' has dtype {tensor.dtype}, expected {expected[key].dtype}")
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
