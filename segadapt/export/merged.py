"""Plain-network files of an adapted network: the merged model, and the PEFT adapter folder whose base is one.

Merged model (:func:`export_merged`): the adapter folded into the base weights
(``segadapt.adapters.merge_and_unload``), saved as the plain network's state dict (safetensors; the
metadata names the architecture). It loads into the bare architecture with plain ``load_state_dict``,
no adapter code involved::

    net = MultiViewUNet(**model_kwargs)
    net.load_state_dict(safetensors.torch.load_file("merged.safetensors"))
    net = load_merged("merged.safetensors")       # the same, architecture rebuilt from the metadata

PEFT folder (:func:`export_peft`): ``adapter_config.json`` + ``adapter_model.safetensors`` as
``peft.PeftModel.save_pretrained`` writes them (the conversion: :mod:`segadapt.adapters.peft`), and
``base_model.safetensors``, a merged-format file of the plain network the adapter goes on (the layers PEFT
cannot hold merged into it; one warning lists them). Load with
``peft.PeftModel.from_pretrained(load_merged(folder / "base_model.safetensors"), folder)``; the network
:func:`load_merged` returns drops DynUNet's second module names (``skip_layers``) from the missing keys, so PEFT
loads it without warnings. A PEFT adapter folder back into segadapt: :func:`segadapt.adapters.peft.import_peft`.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from segadapt.adapters import adapter_names, merge_and_unload, set_active_adapter
from segadapt.adapters.peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, adapter_to_export, drop_alias_keys, to_peft
from segadapt.io import save_safetensors, write_json
from segadapt.models import build_model

MERGED_FORMAT = "segadapt-merged"
PEFT_BASE_FILE = "base_model.safetensors"
PEFT_FILES = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, PEFT_BASE_FILE)


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> Path:
    return save_safetensors(path, {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata)  # clone: DynUNet shares modules


def _architecture(architecture: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """The metadata entry :func:`load_merged` rebuilds the network from ({} without an architecture)."""
    if architecture is None:
        return {}
    return {"architecture": json.dumps({"model": architecture["model"],
                                        "model_kwargs": dict(architecture.get("model_kwargs") or {})})}


def export_merged(model: nn.Module, path: str | os.PathLike, adapter: Optional[str] = None,
                  architecture: Optional[Mapping[str, Any]] = None) -> Path:
    """Write `model` with `adapter` (default: the active or only one) merged in, as a plain state dict (atomically).

    The model itself is left untouched (a copy is merged). `architecture` ({'model': name,
    'model_kwargs': {...}} of :func:`segadapt.models.build_model`) goes into the metadata, for
    :func:`load_merged`.
    """
    plain = copy.deepcopy(model)
    if adapter is not None or adapter_names(model):  # else a full / decoder / scratch run's plain network
        set_active_adapter(plain, adapter_to_export(model, adapter))
        merge_and_unload(plain)
    return _save_safetensors(plain.state_dict(), Path(path), {"format": MERGED_FORMAT, **_architecture(architecture)})


def load_merged(path: str | os.PathLike) -> nn.Module:
    """The network of a merged export, rebuilt from its metadata and loaded strictly (eval mode)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != MERGED_FORMAT or "architecture" not in metadata:
        raise ValueError(f"{path} is not a merged segadapt export with its architecture in the metadata")
    architecture = json.loads(metadata["architecture"])
    net = build_model(architecture["model"], **architecture["model_kwargs"])
    net.load_state_dict(load_file(str(path)))
    net.register_load_state_dict_post_hook(drop_alias_keys)  # a PEFT adapter on it loads without alias warnings
    return net.eval()


def export_peft(model: nn.Module, folder: str | os.PathLike, adapter: Optional[str] = None,
                architecture: Optional[Mapping[str, Any]] = None, source: Optional[str] = None) -> Path:
    """Write `adapter` (default: the active or only one) as a PEFT LoRA/DoRA adapter folder, with the base it
    goes on; returns the folder.

    The folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's files) and
    ``base_model.safetensors``: the plain network's state dict (:func:`segadapt.adapters.peft.peft_base`; a merged
    export, so :func:`load_merged` rebuilds it when `architecture` is given). Adapted layers PEFT cannot hold
    (transposed convolutions, dilated convolutions) are merged into that base and named in one warning; the
    others are PEFT LoRA/DoRA layers. ``base_model_name_or_path`` is that base file; `source` (the run's
    base checkpoint) goes into its metadata. Usage::

        base = load_merged(folder / "base_model.safetensors")
        net = peft.PeftModel.from_pretrained(base, folder)

    Raises:
        ValueError: the method has no PEFT form (e.g. ``lora_c``, ``cp_lora``), or no adapted layer is one PEFT
            can hold.
    """
    converted = to_peft(model, adapter)
    folder = Path(folder)
    base_file = folder / PEFT_BASE_FILE
    metadata = {"format": MERGED_FORMAT, "merged_modules": json.dumps(sorted(converted.merged)),
                **_architecture(architecture), **({"source_checkpoint": str(source)} if source is not None else {})}
    _save_safetensors(converted.base.state_dict(), base_file, metadata)
    _save_safetensors(converted.tensors, folder / PEFT_WEIGHTS_FILE, {"format": "pt"})
    write_json(folder / PEFT_CONFIG_FILE, {**converted.config, "base_model_name_or_path": str(base_file.resolve())})
    if converted.merged:
        warnings.warn(f"{len(converted.merged)} adapted layer(s) PEFT cannot hold are merged into {base_file} instead "
                      f"of being PEFT layers: {', '.join(sorted(converted.merged))}", stacklevel=2)
    return folder
