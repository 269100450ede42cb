"""Safe loading of pretrained weights from local files, with a readable report of what did not match.

Files accepted by :func:`read_state_dict`:

- ``*.safetensors`` (``safetensors.torch.load_file``; no code can run);
- a plain ``torch.save``-d state dict (``.pt``/``.pth``/...);
- a Lightning checkpoint, or any dict holding the state dict under ``"state_dict"``, ``"model"`` or
  ``"network_weights"`` (nnU-Net's ``checkpoint_final.pth``).

Every floating tensor must be finite, and a tensor must be floating point where the model's is
(:func:`check_finite`, :func:`check_dtypes`): a NaN base or an integer copy would otherwise load
silently. Pickles are read with ``torch.load(..., weights_only=True)``: a file whose unpickling would build
arbitrary objects (and so could run code) is refused with :class:`UnsafeCheckpointError`.
:func:`load_pretrained` strips a common key prefix (Lightning's ``model.``, DDP's ``module.``,
``torch.compile``'s ``_orig_mod.``) found by matching keys against the model.
"""

from __future__ import annotations

import importlib
import pickle
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from torch import nn

MAX_LISTED = 20  # keys shown per category in a report; the dataclass keeps them all
# numpy scalars (nnU-Net's checkpoints log np.float64 values): rebuilding one makes a number from a dtype and
# bytes, nothing else, so torch.load(weights_only=True) may allow them (torch's documented allowlist).
NUMPY_SCALAR_GLOBALS = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType,
                        np.dtypes.Int64DType, np.dtypes.Int32DType]


class UnsafeCheckpointError(ValueError):
    """The file would need to unpickle arbitrary objects (possible code execution) and was not read."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model; the message shows ``report`` (a :class:`LoadReport`)."""

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: keys loaded, missing, unexpected and mis-shaped."""

    path: str
    prefix: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and nothing in the file was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        stripped = f" (key prefix {self.prefix!r} stripped)" if self.prefix else ""
        lines = [f"{self.path}: loaded {len(self.loaded)}/{total} model tensors{stripped}"]
        sections = [
            ("missing from the checkpoint", self.missing),
            ("unexpected in the checkpoint", self.unexpected),
            (
                "shape mismatch (checkpoint vs model)",
                [f"{key}: {tuple(c)} vs {tuple(m)}" for key, c, m in self.mismatched],
            ),
        ]
        for title, items in sections:
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {item}" for item in items[:MAX_LISTED]]
                if len(items) > MAX_LISTED:
                    lines.append(f"    ... and {len(items) - MAX_LISTED} more")
        return "\n".join(lines)


def _unsafe(path: Path, err: pickle.UnpicklingError) -> UnsafeCheckpointError:
    # torch's message starts with advice to retry with weights_only=False; keep only the offending global.
    detail = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), str(err))
    return UnsafeCheckpointError(
        f"refused to load {path}: it contains pickled objects that torch.load(weights_only=True) does "
        f"not allow, and unpickling them could run arbitrary code. If the file comes from a source you "
        f"trust, re-save its state dict as .safetensors ({detail})"
    )


def _one_line(error: BaseException) -> str:
    """The telling line of a library's error: torch's 'Unsupported ...' line under its weights_only advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
    return f"{type(error).__name__}: {detail}"[:300] if detail else type(error).__name__


def torch_load_weights(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU (numpy scalars allowlisted), with one-line errors
    naming the file.

    Raises:
        UnsafeCheckpointError: the file pickles a global that weights_only does not allow (:func:`_unsafe`).
        ValueError: the file is not a complete torch.save file (truncated, empty, a plain pickle).
    """
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise _unsafe(Path(path), err) from None
        error: Exception = err
    except Exception as err:  # torch raises RuntimeError, OSError, EOFError... for a truncated or foreign file
        error = err
    raise ValueError(f"{path}: not a readable torch checkpoint (truncated, or not written by torch.save): "
                     f"{_one_line(error)}") from None


READ_CACHE_SIZE = 2  # state dicts kept in memory (the base of a sweep, read once for all its runs)
_read_cache: OrderedDict[tuple[str, int, int], dict[str, torch.Tensor]] = OrderedDict()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (name -> tensor) from a safetensors file, a state-dict pickle or a Lightning checkpoint.

    The last :data:`READ_CACHE_SIZE` files read stay in memory, keyed by path, size and modification time (a
    replaced file is read again); each call returns a new dict of the same tensors, which loading copies."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _read_cache:
        _read_cache[key] = _read_state_dict(path)
        while len(_read_cache) > READ_CACHE_SIZE:
            _read_cache.popitem(last=False)
    _read_cache.move_to_end(key)
    return dict(_read_cache[key])


def clear_read_cache() -> None:
    """Forget the state dicts :func:`read_state_dict` keeps in memory."""
    _read_cache.clear()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as err:  # safetensors' own error type: a header that does not describe the bytes
            raise ValueError(f"{path}: not a readable safetensors file: {_one_line(err)}") from None
    obj = torch_load_weights(path)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "network_weights"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path} is not a state dict: entries {not_tensors[:5]} are not tensors")
    return dict(obj)


def check_finite(path: str | Path, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse a state dict with a NaN or infinite value in any floating tensor (naming the file and tensor)."""
    for key, tensor in state.items():
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: tensor '{key}' holds {bad} NaN or infinite value(s) of {tensor.numel()}")


def check_dtypes(path: str | Path, state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> None:
    """Refuse a tensor that is not floating point where the model's is (it would load by a silent cast);
    integer buffers such as BatchNorm's ``num_batches_tracked`` stay integer on both sides."""
    for key, tensor in state.items():
        if key in target and target[key].dtype.is_floating_point and not tensor.dtype.is_floating_point:
            raise ValueError(f"{path}: tensor '{key}' has dtype {tensor.dtype}; the model's is {target[key].dtype} "
                             "(expected floating point weights)")


def _detect_prefix(keys: list[str], model_keys: set[str]) -> str:
    """The key prefix whose removal matches most checkpoint keys to model keys ('' on a tie)."""
    votes: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                votes[".".join(parts[:i]) + "." if i else ""] += 1
    if not votes:
        return ""
    best = max(votes.values())
    return min((p for p, n in votes.items() if n == best), key=len)


def load_pretrained(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load weights from a local file into ``model`` and report what did not match.

    Args:
        model: the plain model (load before ``segadapt.adapters.inject``).
        path: ``.safetensors``, a state-dict pickle, or a Lightning checkpoint (see :func:`read_state_dict`).
        strict: raise :class:`CheckpointMismatchError` (message = the report) on any missing, unexpected
            or mis-shaped key. Non-strict loads the tensors that fit and returns the report.

    A file that shares no tensor with the model (another architecture) is refused even when not strict.
    """
    state = read_state_dict(path)
    check_finite(path, state)
    return load_state(model, state, path, strict)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, strict: bool = True) -> LoadReport:
    """:func:`load_pretrained` of a state dict already read (and checked) from ``path``."""
    target = model.state_dict()
    prefix = _detect_prefix(list(state), set(target))
    report = LoadReport(path=str(path), prefix=prefix)
    usable: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name not in target:
            report.unexpected.append(key)
        elif tensor.shape != target[name].shape:
            report.mismatched.append((name, tuple(tensor.shape), tuple(target[name].shape)))
        else:
            usable[name] = tensor
    check_dtypes(path, usable, target)
    report.loaded = [k for k in target if k in usable]
    mismatched = {name for name, _, _ in report.mismatched}
    report.missing = [k for k in target if k not in usable and k not in mismatched]
    if not usable:
        reason = "no tensor matches"
    elif strict and not report.ok:
        reason = "strict=True"
    else:
        model.load_state_dict(usable, strict=False)
        return report
    raise CheckpointMismatchError(f"checkpoint does not fit {type(model).__name__} ({reason}):\n{report}", report)


def resample_positions(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM-style position tables of ``state`` resampled to the shapes of ``target`` (a model's state dict)
    where they differ (another ``img_size``), as SAMed does; every other tensor as is:

    - ``*pos_embed`` (1, H, W, C), absolute: bicubic over the (H, W) grid
      (``F.interpolate(..., mode="bicubic", align_corners=False)``);
    - ``*rel_pos_h`` / ``*rel_pos_w`` (2S - 1, C), relative: linear along the length. Only the global-attention
      blocks' tables follow the input size (S = img_size / patch); windowed blocks' are (2 window - 1, C) at
      any size and keep theirs.
    """
    out = dict(state)
    for key, tensor in state.items():
        want = target.get(key)
        if want is None or want.shape == tensor.shape or not tensor.dtype.is_floating_point:
            continue
        if key.endswith("pos_embed") and tensor.ndim == 4 and want.ndim == 4 and tensor.shape[-1] == want.shape[-1]:
            grid = F.interpolate(tensor.permute(0, 3, 1, 2).float(), size=tuple(want.shape[1:3]), mode="bicubic",
                                 align_corners=False)
            out[key] = grid.permute(0, 2, 3, 1).to(tensor.dtype).contiguous()
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and tensor.ndim == 2 and tensor.shape[1] == want.shape[1]:
            line = F.interpolate(tensor.T[None].float(), size=want.shape[0], mode="linear", align_corners=False)
            out[key] = line[0].T.to(tensor.dtype).contiguous()
    return out


def _within(key: str, roots: list[str]) -> bool:
    return any(key == root or key.startswith(root + ".") for root in roots)


def load_base(model: nn.Module, path: str | Path, heads: list[str],
              state: Mapping[str, torch.Tensor] | None = None) -> tuple[list[str], str]:
    """Load a base checkpoint into ``model`` strictly, except in the ``heads`` modules (those whose shapes
    follow the number of classes, :func:`segadapt.models.presets.head_modules`): a target with another
    class count than the base keeps the freshly built head where the base's tensors do not fit (new
    tensors, or another shape), and loads the rest.

    Args:
        state: the file's state dict when already read (and checked); otherwise read from ``path``.

    Returns:
        (the head modules that got new tensors, the first differing tensor's shapes in words; ``""`` when none).

    Raises:
        CheckpointMismatchError: anything outside ``heads`` does not fit (the strict report).
    """
    if state is None:
        state = read_state_dict(path)
        check_finite(path, state)
    try:
        load_state(model, state, path)
        return [], ""
    except CheckpointMismatchError as error:
        report = error.report
        if report is None or not report.loaded:
            raise
        unexpected = [k[len(report.prefix):] if k.startswith(report.prefix) else k for k in report.unexpected]
        differing = [name for name, _, _ in report.mismatched] + report.missing + unexpected
        if not all(_within(key, heads) for key in differing):
            raise
    load_state(model, state, path, strict=False)
    new = [head for head in heads if any(_within(key, [head]) for key in differing)]
    detail = next((f"{name}: {list(c)} in {Path(path).name}, {list(m)} here" for name, c, m in report.mismatched),
                  f"{len(report.missing)} tensors missing, {len(report.unexpected)} unexpected in {Path(path).name}")
    return new, detail


def create_timm_encoder(name: str, weights_file: str | Path | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with pretrained weights from a local file instead of the hub.

    The file is read by :func:`read_state_dict` (an unsafe pickle raises :class:`UnsafeCheckpointError`);
    timm's loader then applies the architecture's checkpoint filter (SAM key remapping; ViT
    position-embedding resampling to ``img_size``), followed by :func:`resample_positions` (timm's SAM filter
    resamples neither SAM's (1, H, W, C) position embedding nor its relative position tables, so a SAM file
    would load only at 1024), drops a classifier the model does not have, and
    adapts the patch embedding to ``in_chans`` (channels summed for 1). Any encoder tensor left missing or
    file tensor left unused raises :class:`CheckpointMismatchError` with the report (timm alone would
    only log it).
    """
    encoder = timm.create_model(name, pretrained=False, **kwargs)
    if weights_file is None:
        return encoder
    state = read_state_dict(weights_file)
    check_finite(weights_file, state)
    check_dtypes(weights_file, state, encoder.state_dict())  # keys timm's filter remaps are cast by timm
    # timm keeps each architecture's checkpoint filter beside its model entrypoint.
    module = importlib.import_module(timm.models.model_entrypoint(name).__module__)
    report = LoadReport(path=str(weights_file))
    timm_filter = getattr(module, "checkpoint_filter_fn", None)

    def filter_fn(state_dict: dict, model: nn.Module) -> dict:
        remapped = state_dict if timm_filter is None else timm_filter(state_dict, model)
        return resample_positions(remapped, model.state_dict())

    def record(_module: nn.Module, keys) -> None:
        report.missing, report.unexpected = list(keys.missing_keys), list(keys.unexpected_keys)

    handle = encoder.register_load_state_dict_post_hook(record)
    try:
        timm.models.load_pretrained(
            encoder,
            pretrained_cfg=dict(encoder.pretrained_cfg, state_dict=state, source=None),
            num_classes=getattr(encoder, "num_classes", 0),
            in_chans=kwargs.get("in_chans", 3),
            filter_fn=filter_fn,
        )
    except RuntimeError as err:  # torch's size-mismatch message, or a filter that could not remap
        raise CheckpointMismatchError(f"timm weights {weights_file} do not fit {name}:\n{err}") from None
    finally:
        handle.remove()
    report.loaded = [k for k in encoder.state_dict() if k not in report.missing]
    if not report.ok:
        raise CheckpointMismatchError(f"timm weights do not fit {name}:\n{report}", report)
    return encoder
