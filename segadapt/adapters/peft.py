"""segadapt adapters <-> PEFT's LoRA/DoRA format (``peft.PeftModel.save_pretrained``'s files).

:func:`to_peft` converts an adapter into PEFT's tensors and ``adapter_config.json`` values, with the plain
network they go on (:func:`peft_base`); :func:`segadapt.export.merged.export_peft` writes them. :func:`import_peft`
reads a PEFT adapter folder into a segadapt adapter. The methods PEFT has -- ``lora`` / ``conv_lora`` as LoRA,
``conv_dora`` as DoRA (``use_dora``) -- on ``nn.Linear`` and ``nn.Conv1d/2d/3d``. Layers PEFT cannot hold
(transposed convolutions: PEFT has no LoRA for them; dilated convolutions: its conv LoRA ignores dilation;
Conv3d with a 1 x 1 x k kernel, e.g. the 1x1x1 heads: PEFT's ``merge_and_unload`` fails on them) are merged
into the base instead, so that a default preset (which includes the UNets' ConvTranspose layers) converts.
Tensor layouts (key prefix ``base_model.model.<module>.``):

==================  =====================  ==========================================
segadapt            shape                  PEFT key, shape
==================  =====================  ==========================================
``lora_A``          (r, Cin k^d)           ``lora_A.weight`` (r, Cin, *k)
``lora_B``          (Cout, r)              ``lora_B.weight`` (Cout, r, 1, ..., 1)
DoRA ``magnitude``  (Cout,)                ``lora_magnitude_vector`` (1, Cout, 1, ..., 1); (Cout,) on Linear
==================  =====================  ==========================================

Scaling: PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) per module equals segadapt's ``alpha / r``;
per-module ranks and alphas go to ``rank_pattern`` / ``alpha_pattern`` keyed by the escaped module name.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from .config import AdapterConfig
from .dora import DoRA
from .io import trained_copies
from .model import active_adapter, adapted_layers, adapter_names, inject, merge_and_unload, remove_adapter, set_active_adapter

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_METHODS = {"lora": False, "conv_lora": False, "conv_dora": True}  # method -> use_dora
PEFT_PREFIX = "base_model.model."
PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<tensor>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
PEFT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def adapter_to_export(model: nn.Module, adapter: Optional[str]) -> str:
    """`adapter`, else the active adapter, else the only one."""
    names = adapter_names(model)
    name = adapter or active_adapter(model) or (names[0] if len(names) == 1 else None)
    layers = [layer for _, layer in adapted_layers(model) if name in layer.adapters]
    if not names:
        raise ValueError("the network has no adapter (a full / decoder / scratch run): use --merged, --bundle or --nnunet")
    if name is None or not layers:
        raise ValueError(f"the model has no adapter named {name!r} to export")
    return name


def peft_unsupported(base: nn.Module) -> Optional[str]:
    """Why PEFT's LoRA cannot hold this layer (None: it can)."""
    if not isinstance(base, PEFT_LAYERS):
        return (f"a {type(base).__name__}: PEFT's LoRA supports "
                f"{', '.join(t.__name__ for t in PEFT_LAYERS)} only")
    if not isinstance(base, nn.Linear) and (any(d != 1 for d in base.dilation) or base.padding_mode != "zeros"):
        return (f"dilation {base.dilation} / padding mode {base.padding_mode!r}: PEFT's conv LoRA assumes "
                "dilation 1 and zero padding")
    if isinstance(base, nn.Conv3d) and base.kernel_size[:2] == (1, 1):
        return (f"a Conv3d with kernel {base.kernel_size}: PEFT's merge_and_unload takes a weight with "
                "size()[2:4] == (1, 1) for a 1x1 Conv2d and fails on it")
    return None


def drop_alias_keys(module: nn.Module, incompatible: Any) -> None:
    """``load_state_dict`` post hook: a missing key that names, under a second name of a shared module
    (DynUNet holds its blocks twice, as ``skip_layers``), a tensor that was loaded under another name is not
    missing. PEFT maps checkpoint keys through first names only, so without this every PEFT adapter on a
    DynUNet -- one PEFT saved itself included -- loads with a warning about the second names."""
    state = module.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for key, tensor in state.items():
        names.setdefault(id(tensor), []).append(key)
    relative = {key: names[id(tensor)] for key, tensor in state.items()}  # key -> every key of its tensor
    missing = set(incompatible.missing_keys)
    for key in list(incompatible.missing_keys):
        ends = [k for k in relative if key == k or key.endswith("." + k)]
        if not ends:
            continue
        end = max(ends, key=len)
        prefix = key[: len(key) - len(end)]
        if any(prefix + other not in missing for other in relative[end] if other != end):
            incompatible.missing_keys.remove(key)


def _peft_layout(base: nn.Module, name: str) -> tuple[int, ...]:
    """Trailing singleton dims of PEFT's lora_B / magnitude for this layer; rejects what PEFT cannot run."""
    reason = peft_unsupported(base)
    if reason is not None:
        raise ValueError(f"module '{name}' is {reason}")
    return () if isinstance(base, nn.Linear) else (1,) * (base.weight.dim() - 2)


def _alpha(config: AdapterConfig, rank: int) -> float:
    return float(rank if config.alpha is None else config.alpha)


def peft_base(model: nn.Module, adapter: str, merged: Sequence[str]) -> nn.Module:
    """The plain network a PEFT adapter goes on: the base weights, with `adapter` merged into the layers
    named in `merged` (those PEFT cannot hold) and every other adapted layer back to its base layer.

    A PiSSA-started layer (segadapt: W = W0 + s (B A - B0 A0), B0 A0 its starting factors) gets the residual
    W0 - s B0 A0 as its base, on which PEFT's W = W_res + s B A is the same weight.
    """
    folded_in = copy.deepcopy(model)
    set_active_adapter(folded_in, adapter)
    merge_and_unload(folded_in)
    base = copy.deepcopy(model)
    for name in adapter_names(base):
        remove_adapter(base, name)
    with torch.no_grad():
        for module in merged:
            base.get_submodule(module).load_state_dict(folded_in.get_submodule(module).state_dict())
        for module, layer in adapted_layers(model):
            lora = layer.adapters[adapter] if adapter in layer.adapters else None
            lora = lora.direction if isinstance(lora, DoRA) else lora
            if module in merged or getattr(lora, "initial_A", None) is None:
                continue
            weight = layer.spec.canonical(base.get_submodule(module).weight)
            weight.sub_((lora.scaling * (lora.initial_B @ lora.initial_A)).reshape(weight.shape))
    return base.eval()


@dataclass
class PeftAdapter:
    """A segadapt adapter in PEFT's form: ``adapter_model.safetensors``'s tensors, ``adapter_config.json``'s
    values (``base_model_name_or_path`` for the writer to fill in), the plain network it goes on, and the
    adapted layers PEFT cannot hold ({module: why}), which that network has merged in."""

    name: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    base: nn.Module
    merged: dict[str, str]


def to_peft(model: nn.Module, adapter: Optional[str] = None) -> PeftAdapter:
    """`adapter` of `model` (default: the active or only one) in PEFT's LoRA/DoRA form (the model is untouched).

    Raises:
        ValueError: the method has no PEFT form (e.g. ``lora_c``, ``cp_lora``), or no adapted layer is one PEFT
            can hold.
    """
    name = adapter_to_export(model, adapter)
    layers = [(n, layer) for n, layer in adapted_layers(model) if name in layer.adapters]
    config = layers[0][1].adapters[name].config
    if config.method not in PEFT_METHODS:
        raise ValueError(f"method {config.method!r} has no PEFT form; PEFT export supports "
                         f"{', '.join(PEFT_METHODS)} (lora/conv_lora as LoRA, conv_dora as DoRA); "
                         "use the merged export instead")
    merged = {n: reason for n, layer in layers if (reason := peft_unsupported(layer.base_layer)) is not None}
    layers = [(n, layer) for n, layer in layers if n not in merged]
    if not layers:
        raise ValueError(f"no adapted layer of adapter {name!r} is one PEFT's LoRA can hold "
                         f"({'; '.join(f'{n} is {r}' for n, r in merged.items())}); use the merged export instead")
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for module, layer in layers:
        base, adapter_ = layer.base_layer, layer.adapters[name]
        ones, spec = _peft_layout(base, module), layer.spec
        lora = adapter_.direction if isinstance(adapter_, DoRA) else adapter_
        prefix = f"{PEFT_PREFIX}{module}."
        tensors[prefix + "lora_A.weight"] = lora.lora_A.reshape(adapter_.rank, spec.cin, *spec.kernel)
        tensors[prefix + "lora_B.weight"] = lora.lora_B.reshape(spec.cout, adapter_.rank, *ones)
        if isinstance(adapter_, DoRA):
            shape = (spec.cout,) if not ones else (1, spec.cout, *ones)
            tensors[prefix + "lora_magnitude_vector"] = adapter_.magnitude.reshape(shape)
        if adapter_.rank != config.rank:
            rank_pattern[re.escape(module)] = adapter_.rank
        if _alpha(config, adapter_.rank) != _alpha(config, config.rank):
            alpha_pattern[re.escape(module)] = _alpha(config, adapter_.rank)
    trained = trained_copies(model, name)  # modules trained in full: PEFT's modules_to_save, same key layout
    for module, copy_ in trained.items():
        tensors.update({f"{PEFT_PREFIX}{module}.{key}": value for key, value in copy_.state_dict().items()})
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": _alpha(config, config.rank),
        "target_modules": "(" + "|".join(re.escape(module) for module, _ in layers) + ")",  # re.fullmatch by PEFT
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": config.use_rslora,
        "use_dora": PEFT_METHODS[config.method],
        "lora_dropout": config.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": list(trained) or None,
    }
    return PeftAdapter(name, tensors, peft_config, peft_base(model, name, sorted(merged)), merged)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's lookup (``peft.utils.other.get_pattern_key``): the first key matching the end of the name."""
    return next((v for key, v in patterns.items() if re.match(rf"(.*\.)?({key})$", module)), default)


def import_peft(model: nn.Module, folder: str | os.PathLike, name: str = "default", active: bool = True) -> nn.Module:
    """Inject the LoRA/DoRA adapter of a PEFT adapter folder into `model` under `name` (in place).

    Raises:
        FileNotFoundError: the folder lacks ``adapter_config.json`` or ``adapter_model.safetensors``.
        ValueError: not a LoRA adapter, a feature segadapt has no counterpart for (biases, modules to save,
            per-module alphas not of the form alpha / r), or modules the model does not have.
    """
    folder = Path(folder)
    config_path, weights_path = folder / PEFT_CONFIG_FILE, folder / PEFT_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"not a PEFT adapter folder: {path} is missing")
    peft_config = json.loads(config_path.read_text(encoding="utf-8"))
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {peft_config.get('peft_type')!r}; only LORA adapters can be imported")
    unsupported = {k: peft_config.get(k) for k in ("bias", "modules_to_save", "fan_in_fan_out", "lora_bias")}
    if unsupported["bias"] not in (None, "none") or unsupported["modules_to_save"] or unsupported["fan_in_fan_out"] \
            or unsupported["lora_bias"]:
        raise ValueError(f"{config_path}: {unsupported} -- segadapt adapters have no trained biases or saved modules")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{weights_path}: tensor {key!r} is not a LoRA/DoRA tensor segadapt can import")
        tensors.setdefault(match["module"], {})[match["tensor"]] = tensor
    modules = sorted(tensors)
    for module in modules:
        try:
            _peft_layout(model.get_submodule(module), module)
        except AttributeError:
            raise ValueError(f"{weights_path}: module '{module}' does not exist in this {type(model).__name__}") from None

    use_dora, rslora = bool(peft_config.get("use_dora")), bool(peft_config.get("use_rslora"))
    ranks = {m: int(tensors[m]["lora_A.weight"].shape[0]) for m in modules}
    alphas = {m: float(_pattern_value(peft_config.get("alpha_pattern") or {}, m, peft_config.get("lora_alpha", 8))) for m in modules}
    if all(alphas[m] == ranks[m] for m in modules):
        alpha = None  # s = 1 on every layer
    elif len(set(alphas.values())) == 1:
        alpha = alphas[modules[0]]
    else:
        raise ValueError(f"{config_path}: per-module alphas {alphas} are not one alpha (s = alpha / r) nor alpha = r")
    rank = int(peft_config.get("r", ranks[modules[0]]))
    convs = any(not isinstance(model.get_submodule(m), nn.Linear) for m in modules)
    config = AdapterConfig(
        method="conv_dora" if use_dora else ("conv_lora" if convs else "lora"),
        rank=rank,
        alpha=alpha,
        targets="(" + "|".join(re.escape(m) for m in modules) + ")",
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
        dropout=float(peft_config.get("lora_dropout") or 0.0),
        use_rslora=rslora,
    )
    inject(model, config, name=name, active=active)
    with torch.no_grad():
        for module in modules:
            adapter = model.get_submodule(module).adapters[name]
            lora = adapter.direction if use_dora else adapter
            for ours, key in ((lora.lora_A, "lora_A.weight"), (lora.lora_B, "lora_B.weight")) + (
                    ((adapter.magnitude, "lora_magnitude_vector"),) if use_dora else ()):
                given = tensors[module].get(key)
                if given is None or given.numel() != ours.numel():
                    raise ValueError(f"{weights_path}: module '{module}': {key} is missing or has shape "
                                     f"{None if given is None else list(given.shape)} for {list(ours.shape)}")
                ours.copy_(given.reshape(ours.shape))
    return model
