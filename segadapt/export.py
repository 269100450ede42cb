"""Export adapted networks: a merged plain model, and LoRA/DoRA adapters in PEFT's on-disk format.

Merged model (:func:`export_merged`): the adapter folded into the base weights
(``segadapt.adapters.merge_and_unload``), saved as the plain network's state dict (safetensors; the
metadata names the architecture). It loads into the bare architecture with plain ``load_state_dict``,
no adapter code involved::

    net = MultiViewUNet(**model_kwargs)
    net.load_state_dict(safetensors.torch.load_file("merged.safetensors"))
    net = load_merged("merged.safetensors")       # the same, architecture rebuilt from the metadata

PEFT format (:func:`export_peft`, :func:`import_peft`): ``adapter_config.json`` +
``adapter_model.safetensors`` as ``peft.PeftModel.save_pretrained`` writes them, for the methods PEFT has
-- ``lora`` / ``conv_lora`` as LoRA, ``conv_dora`` as DoRA (``use_dora``) -- on ``nn.Linear`` and
``nn.Conv1d/2d/3d``. Layers PEFT cannot hold (transposed convolutions: PEFT has no LoRA for them; dilated
convolutions: its conv LoRA ignores dilation; Conv3d with a 1 x 1 x k kernel, e.g. the 1x1x1 heads: PEFT's
``merge_and_unload`` fails on them) are merged into the exported base ``base_model.safetensors`` (one warning
lists them), so that a default preset (which includes the UNets' ConvTranspose layers) exports.
Load with ``peft.PeftModel.from_pretrained(load_merged(folder / "base_model.safetensors"), folder)``; the
network :func:`load_merged` returns drops DynUNet's second module names (``skip_layers``) from the missing keys,
so PEFT loads it without warnings. Tensor
layouts (key prefix ``base_model.model.<module>.``):

==================  =====================  ==========================================
segadapt            shape                  PEFT key, shape
==================  =====================  ==========================================
``lora_A``          (r, Cin k^d)           ``lora_A.weight`` (r, Cin, *k)
``lora_B``          (Cout, r)              ``lora_B.weight`` (Cout, r, 1, ..., 1)
DoRA ``magnitude``  (Cout,)                ``lora_magnitude_vector`` (1, Cout, 1, ..., 1); (Cout,) on Linear
==================  =====================  ==========================================

Scaling: PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) per module equals segadapt's ``alpha / r``;
per-module ranks and alphas go to ``rank_pattern`` / ``alpha_pattern`` keyed by the escaped module name.

MONAI bundle: :func:`segadapt.bundle.export_bundle`.

Command line: ``segadapt export RUN_DIR [--merged FILE] [--peft FOLDER] [--bundle FOLDER] [--nnunet FOLDER] [--force]``
(or ``python -m segadapt.export``); outputs that are folders / files / not writable, an output file that exists
(without ``--force``), one that is a file of the run or one it reads (:func:`segadapt.export_common.run_files`:
config.yaml, the weights, plan, fingerprint, the base checkpoint, dataset.json; ``--force`` or not), and a broken
``config.yaml``, exit 2 with one line before any work. A full / decoder / scratch run exports its
``model.safetensors`` network. nnU-Net trained-model folder: :func:`segadapt.export_nnunet.export_nnunet`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from segadapt.adapters import (AdapterConfig, active_adapter, adapted_layers, adapter_names, inject, merge_and_unload,
                               remove_adapter, set_active_adapter)
from segadapt.adapters.dora import DoRA
from segadapt.adapters.io import trained_copies
from segadapt.bundle import BUNDLE_FILES, export_bundle, inference_config
from segadapt.io import check_output_file, check_output_folder, save_safetensors, write_json
from segadapt.export_common import check_targets, load_run_for_export, read_export_config
from segadapt.export_nnunet import export_nnunet, nnunet_targets
from segadapt.models import build_model
from segadapt.parsers import export_parser

MERGED_FORMAT = "segadapt-merged"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_BASE_FILE = "base_model.safetensors"
PEFT_METHODS = {"lora": False, "conv_lora": False, "conv_dora": True}  # method -> use_dora
PEFT_PREFIX = "base_model.model."
PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<tensor>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
PEFT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PEFT_FILES = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, PEFT_BASE_FILE)


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> Path:
    return save_safetensors(path, {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata)  # clone: DynUNet shares modules


def _adapter_name(model: nn.Module, adapter: Optional[str]) -> str:
    """`adapter`, else the active adapter, else the only one."""
    names = adapter_names(model)
    name = adapter or active_adapter(model) or (names[0] if len(names) == 1 else None)
    layers = [layer for _, layer in adapted_layers(model) if name in layer.adapters]
    if not names:
        raise ValueError("the network has no adapter (a full / decoder / scratch run): use --merged, --bundle or --nnunet")
    if name is None or not layers:
        raise ValueError(f"the model has no adapter named {name!r} to export")
    return name


# ---- merged plain model -------------------------------------------------------------------------
def export_merged(model: nn.Module, path: str | os.PathLike, adapter: Optional[str] = None,
                  architecture: Optional[Mapping[str, Any]] = None) -> Path:
    """Write `model` with `adapter` (default: the active or only one) merged in, as a plain state dict (atomically).

    The model itself is left untouched (a copy is merged). `architecture` ({'model': name,
    'model_kwargs': {...}} of :func:`segadapt.models.build_model`) goes into the metadata, for
    :func:`load_merged`.
    """
    plain = copy.deepcopy(model)
    if adapter is not None or adapter_names(model):  # else a full / decoder / scratch run's plain network
        set_active_adapter(plain, _adapter_name(model, adapter))
        merge_and_unload(plain)
    metadata = {"format": MERGED_FORMAT}
    if architecture is not None:
        metadata["architecture"] = json.dumps({"model": architecture["model"],
                                               "model_kwargs": dict(architecture.get("model_kwargs") or {})})
    return _save_safetensors(plain.state_dict(), Path(path), metadata)


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
    net.register_load_state_dict_post_hook(_drop_alias_keys)  # a PEFT adapter on it loads without alias warnings
    return net.eval()


# ---- PEFT on-disk format ------------------------------------------------------------------------
def _peft_unsupported(base: nn.Module) -> Optional[str]:
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


def _drop_alias_keys(module: nn.Module, incompatible: Any) -> None:
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
    reason = _peft_unsupported(base)
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


def export_peft(model: nn.Module, folder: str | os.PathLike, adapter: Optional[str] = None,
                architecture: Optional[Mapping[str, Any]] = None, source: Optional[str] = None) -> Path:
    """Write `adapter` (default: the active or only one) as a PEFT LoRA/DoRA adapter folder, with the base it
    goes on; returns the folder.

    The folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's files) and
    ``base_model.safetensors``: the plain network's state dict (:func:`peft_base`; a merged export, so
    :func:`load_merged` rebuilds it when `architecture` is given). Adapted layers PEFT cannot hold
    (transposed convolutions, dilated convolutions) are merged into that base and named in one warning; the
    others are PEFT LoRA/DoRA layers. ``base_model_name_or_path`` is that base file; `source` (the run's
    base checkpoint) goes into its metadata. Usage::

        base = load_merged(folder / "base_model.safetensors")
        net = peft.PeftModel.from_pretrained(base, folder)

    Raises:
        ValueError: the method has no PEFT form (e.g. ``lora_c``, ``cp_lora``), or no adapted layer is one PEFT
            can hold.
    """
    name = _adapter_name(model, adapter)
    layers = [(n, layer) for n, layer in adapted_layers(model) if name in layer.adapters]
    config = layers[0][1].adapters[name].config
    if config.method not in PEFT_METHODS:
        raise ValueError(f"method {config.method!r} has no PEFT form; PEFT export supports "
                         f"{', '.join(PEFT_METHODS)} (lora/conv_lora as LoRA, conv_dora as DoRA); "
                         "use the merged export instead")
    merged = {n: reason for n, layer in layers if (reason := _peft_unsupported(layer.base_layer)) is not None}
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
    folder = Path(folder)
    base_file = folder / PEFT_BASE_FILE
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base_file.resolve()),
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
    metadata = {"format": MERGED_FORMAT, "merged_modules": json.dumps(sorted(merged))}
    if architecture is not None:
        metadata["architecture"] = json.dumps({"model": architecture["model"],
                                               "model_kwargs": dict(architecture.get("model_kwargs") or {})})
    if source is not None:
        metadata["source_checkpoint"] = str(source)
    _save_safetensors(peft_base(model, name, sorted(merged)).state_dict(), base_file, metadata)
    _save_safetensors(tensors, folder / PEFT_WEIGHTS_FILE, {"format": "pt"})
    write_json(folder / PEFT_CONFIG_FILE, peft_config)
    if merged:
        warnings.warn(f"{len(merged)} adapted layer(s) PEFT cannot hold are merged into {base_file} instead of "
                      f"being PEFT layers: {', '.join(sorted(merged))}", stacklevel=2)
    return folder


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


# ---- command line -------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = export_parser()  # in segadapt.parsers: `segadapt export --help` imports no torch
    args = parser.parse_args(argv)
    if not (args.merged or args.peft or args.bundle or args.nnunet):
        parser.error("give --merged FILE, --peft FOLDER, --bundle FOLDER and/or --nnunet FOLDER")
    try:  # every output is checked before any work, so a bad one leaves nothing half done
        config = read_export_config(args.run_dir)
        targets = [check_output_file(args.merged, "--merged file")] if args.merged else []
        if args.peft:
            targets += [check_output_folder(args.peft, "--peft folder") / f for f in PEFT_FILES]
        if args.bundle:
            targets += [check_output_folder(args.bundle, "--bundle folder") / f for f in BUNDLE_FILES]
            inference_config(config)  # no roi_size, a network the bundle cannot build: refused here
        if args.nnunet:
            targets += nnunet_targets(config, check_output_folder(args.nnunet, "--nnunet folder"))
        check_targets(args.run_dir, config, targets, force=args.force)
        if args.peft or args.merged:
            net, config = load_run_for_export(args.run_dir, strict=not args.force)
        if args.peft:  # first: its checks (method, layer types) all come before it writes
            folder = export_peft(net, args.peft, architecture=config["module"],
                                 source=config["module"].get("base_checkpoint"))
            print(f"PEFT adapter: {folder}")
        if args.merged:
            print(f"merged model: {export_merged(net, args.merged, architecture=config['module'])}")
        if args.bundle:
            print(f"MONAI bundle: {export_bundle(args.run_dir, args.bundle, strict=not args.force, force=args.force)}")
        if args.nnunet:
            print(f"nnU-Net trained-model folder: {export_nnunet(args.run_dir, args.nnunet, overwrite=args.force)}")
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"segadapt export: error: {error}\n")


if __name__ == "__main__":
    main()
