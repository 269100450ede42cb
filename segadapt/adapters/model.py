"""Model-level operations: inject adapters by module name, choose the active one, merge, summarise."""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .base import AdaptedLayer
from .config import AdapterConfig, name_matches
from .layers import SUPPORTED_LAYERS, spec_of
from .registry import get_method
from .trained import TrainedModule, trained_modules, use_trained_copies


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(name, layer) for every :class:`AdaptedLayer` in the model."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters injected into the model, sorted."""
    return sorted({name for _, layer in adapted_layers(model) for name in layer.adapters})


def active_adapter(model: nn.Module) -> Optional[str]:
    """Name of the active adapter (``None`` if there is none)."""
    return next((layer.active_adapter for _, layer in adapted_layers(model)), None)


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Leaf modules (and already adapted layers) by their user-visible name."""
    inside_adapted: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside_adapted):
            continue
        if isinstance(module, TrainedModule):  # trained in full: nothing inside is adapted
            inside_adapted.append(name)
        elif isinstance(module, AdaptedLayer):
            inside_adapted.append(name)
            yield name, module
        elif not any(True for _ in module.children()):
            yield name, module


def _within(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _path_around(model: nn.Module, name: str, module: nn.Module) -> Optional[str]:
    """A name under which a module inside ``module`` is reachable without passing through ``module`` itself, or
    None. ``module`` held in several slots is fine (:func:`_swap` wraps it in every one: DynUNet's
    ``deep_supervision_heads.0`` is also ``skip_layers.next_layer.super_head``), but a container whose children are
    also held elsewhere is not: a wrapper on the container would leave the other path running the base's modules."""
    inside = {id(m) for m in module.modules()}
    for alias, other in model.named_modules(remove_duplicate=False):
        if id(other) not in inside or not alias:
            continue
        parts = alias.split(".")
        if not any(model.get_submodule(".".join(parts[:j])) is module for j in range(1, len(parts) + 1)):
            return alias
    return None


# normalisation layers whose affine parameters ``AdapterConfig.norms`` trains
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # _NormBase: BatchNorm*d, InstanceNorm*d


def _is_norm(module: nn.Module) -> bool:
    module = module.original_module if isinstance(module, TrainedModule) else module
    return isinstance(module, NORM_LAYERS) and any(True for _ in module.parameters(recurse=False))


def norm_layers(model: nn.Module, outside: Optional[list[str]] = None) -> list[str]:
    """Names of the normalisation layers of `model` with affine parameters (an existing :class:`TrainedModule`
    around one by its own name), but those inside a module of `outside` (already trained in full)."""
    outside = outside or []
    wrappers = [name for name, _ in trained_modules(model)]
    return [name for name, module in model.named_modules()
            if name and _is_norm(module) and not any(_within(name, kept) for kept in outside)
            and not any(_within(name, w) and name != w for w in wrappers)]


def resolve_train_modules(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules ``config.train_modules`` selects (the outermost of nested matches; an existing
    :class:`TrainedModule` by its own name), then with ``config.norms`` the normalisation layers outside them
    (:func:`norm_layers`); ``ValueError`` when a pattern matches nothing or a module without parameters, or
    ``norms`` finds no normalisation layer with affine parameters."""
    names = _matched_train_modules(model, config)
    if config.norms:
        norms = norm_layers(model, outside=names)
        if not norms and not any(_is_norm(m) for n in names for m in model.get_submodule(n).modules()):
            raise ValueError(f"norms: {type(model).__name__} has no normalisation layer with affine parameters "
                             "(BatchNorm, InstanceNorm(affine=True), GroupNorm, LayerNorm) to train")
        names += norms
    return names


def _matched_train_modules(model: nn.Module, config: AdapterConfig) -> list[str]:
    if not config.train_modules:
        return []
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or any(_within(name, kept) for kept in names):
            continue
        if any(_within(name, wrapper) and name != wrapper for wrapper, _ in trained_modules(model)):
            continue  # inside a wrapper: original_module / modules_to_save are not user-visible names
        if name_matches(name, config.train_modules):
            inner = next((w for w, _ in trained_modules(module) if w), None)
            if inner is not None:
                raise ValueError(f"train_modules: module '{name}' holds '{name}.{inner}', which another adapter "
                                 "trains in full; train the same module (or one inside it) instead")
            if not any(True for _ in module.parameters()):
                raise ValueError(f"train_modules: module '{name}' has no parameters to train")
            outside = _path_around(model, name, module)
            if outside is not None:  # a wrapper in `name`'s slot would leave that path running the base's module
                raise ValueError(f"train_modules: module '{name}' (or a module inside it) is also held as '{outside}' "
                                 "(a shared module); train the module that holds both paths, or none")
            names.append(name)
    if not names:
        raise ValueError(f"train_modules {config.train_modules!r} match no module of {type(model).__name__}")
    return names


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _swap(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put ``replacements[id(old)]`` in every slot of ``model`` that holds ``old``, in one pass: a module
    registered under two names (nnU-Net's convs are ``conv`` and ``all_modules.0``) would otherwise keep
    running the old one on the path the forward takes, and an adapter there would silently do nothing."""
    for parent in list(model.modules()):
        for child, module in list(parent.named_children()):
            if id(module) in replacements:
                setattr(parent, child, replacements[id(module)])


def inject(model: nn.Module, config: Union[AdapterConfig, dict], name: str = "default", active: bool = True) -> nn.Module:
    """Inject one named adapter into every module that ``config.targets`` selects, in place.

    Adapters attach to weights: selected modules without parameters (Identity, Dropout, activations)
        are skipped; a selected module with weights of an unsupported type is an error. Every base
    parameter is frozen. The modules ``config.train_modules`` selects are wrapped in a
    :class:`~segadapt.adapters.trained.TrainedModule` and this adapter gets its own trainable copy of
    each; they may not hold, or lie inside, an adapted layer. Only the active adapter is trainable: with ``active=True`` the new one
    (the others are frozen), with ``active=False`` the new one is frozen and the active one is
    left as it was. Several adapters may sit on one model under different names. All adapters are
    built before the model is touched, so a bad config leaves the model unchanged.

    Raises:
        ValueError: unknown method, bad rank, targets matching nothing, a grouped conv, or ``name``
            already injected.
        TypeError: a targeted module of an unsupported type.
        RuntimeError: ``active=True`` while an adapter is merged.
    """
    config = AdapterConfig.from_dict(config) if isinstance(config, dict) else config
    method = get_method(config.method)
    if not name or "." in name:
        raise ValueError(f"adapter name must be non-empty and contain no '.', got {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"an adapter named '{name}' is already injected; remove_adapter() it or use another name")
    merged = next(((n, layer.merged_adapter) for n, layer in adapted_layers(model) if layer.merged_adapter), None)
    if active and merged is not None:
        raise RuntimeError(f"module '{merged[0]}' has adapter '{merged[1]}' merged; unmerge() before injecting an active adapter")

    candidates = list(_candidate_modules(model))
    selected = [
        (module_name, module)
        for module_name, module in candidates
        if name_matches(module_name, config.targets)
        and not (config.exclude and name_matches(module_name, config.exclude))
        and any(True for _ in module.parameters())
    ]
    if not selected:
        layers = [n for n, m in candidates if isinstance(m, (*SUPPORTED_LAYERS, AdaptedLayer))]
        examples = ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")
        raise ValueError(f"targets {config.targets!r} (exclude {config.exclude!r}) match no module; adaptable modules include: {examples}")

    train_names = resolve_train_modules(model, config)
    adapted = [n for n, _ in adapted_layers(model)] + [n for n, _ in selected]
    for train_name in train_names:
        clash = next((n for n in adapted if _within(n, train_name) or _within(train_name, n)), None)
        if clash is not None:
            raise ValueError(f"module '{clash}' would be both adapted (targets) and trained in full (train_modules "
                             f"'{train_name}'); take it out of one of them (e.g. exclude it from the targets, or "
                             f"train_modules=[])")

    built = []
    for module_name, module in selected:
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        spec = spec_of(base, module_name)
        rank = config.rank_for(module_name)
        if config.cap_rank:
            rank = min(rank, method.rank_cap(spec, config))
        try:
            adapter = method(base, spec, config, rank)
        except ValueError as error:
            raise ValueError(f"module '{module_name}': {error}") from None
        adapter.config = config
        built.append((module_name, module, base, spec, adapter))
    capped = [n for n, _, _, _, a in built if a.rank < config.rank_for(n)]
    if capped:
        where = "every adapted layer" if len(capped) == len(built) else f"{len(capped)} of {len(built)} layers"
        warnings.warn(f"cap_rank: the rank of {where} was capped at what the layer can take ({capped[0]}: "
                      f"{config.rank_for(capped[0])} -> {next(a.rank for n, _, _, _, a in built if n == capped[0])})")

    # Freeze the base only: the adapters already injected keep their trainability (that of the
    # active one), and the new one is trainable only if it becomes the active one.
    adapter_params = {id(p) for _, layer in adapted_layers(model) for p in layer.adapters.parameters()}
    adapter_params |= {id(p) for _, wrapper in trained_modules(model) for p in wrapper.modules_to_save.parameters()}
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(False)
    previous = active_adapter(model)
    wrapped: dict[int, nn.Module] = {}
    for module_name, module, base, spec, adapter in built:
        if not isinstance(module, AdaptedLayer):
            module = wrapped[id(base)] = AdaptedLayer(base, spec)
            module.active_adapter = previous
        adapter.requires_grad_(False)
        module.adapters[name] = adapter
    _swap(model, wrapped)
    for train_name in train_names:
        wrapper = model.get_submodule(train_name)
        if not isinstance(wrapper, TrainedModule):  # in every slot that holds it (nnU-Net: norm, all_modules.2)
            original, wrapper = wrapper, TrainedModule(wrapper)
            _swap(model, {id(original): wrapper})
        wrapper.add_copy(name)
    use_trained_copies(model, previous)
    if active:
        set_active_adapter(model, name)
    return model


def truncate(model: nn.Module, rank: int, name: Optional[str] = None) -> nn.Module:
    """Keep the first ``rank`` components of one adapter (default: the active one) in every layer, in
    place: each becomes the rank-``min(rank, its rank)`` adapter with the same leading factors and
    s = alpha / rank. Meant for adapters trained with ``nested_ranks`` (DyLoRA), whose leading
    components work on their own; the saved config records the new ranks.

    Raises:
        ValueError: rank < 1, no such adapter, a method without nested ranks, or a merged adapter.
    """
    name = name or active_adapter(model)
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r} to truncate; injected adapters: {adapter_names(model)}")
    if int(rank) != rank or rank < 1:
        raise ValueError(f"truncate rank must be a positive integer, got {rank!r}")
    layers = [(n, layer) for n, layer in adapted_layers(model) if name in layer.adapters]
    merged = next((n for n, layer in layers if layer.merged_adapter == name), None)
    if merged is not None:
        raise ValueError(f"adapter '{name}' is merged into '{merged}'; unmerge() before truncating")
    config = layers[0][1].adapters[name].config
    if not layers[0][1].adapters[name].supports_nested_ranks:
        raise ValueError(f"method '{config.method}' has no nested ranks to truncate")
    new_config = replace(config, rank=min(config.rank, rank), rank_pattern={k: min(v, rank) for k, v in config.rank_pattern.items()})
    for _, layer in layers:
        adapter = layer.adapters[name]
        if adapter.rank > rank:
            adapter.truncate_(rank)
        adapter.config = new_config
        if hasattr(adapter, "direction"):
            adapter.direction.config = new_config
    return model


def set_active_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Make ``name`` the adapter every adapted layer applies (``None``: base only). Only the active
    adapter's parameters are trainable."""
    layers = list(adapted_layers(model))
    if name is not None and not any(name in layer.adapters for _, layer in layers):
        raise ValueError(f"no adapter named '{name}'; injected adapters: {adapter_names(model)}")
    for layer_name, layer in layers:
        if layer.merged_adapter is not None and layer.merged_adapter != name:
            raise RuntimeError(f"module '{layer_name}' has adapter '{layer.merged_adapter}' merged; unmerge() first")
        layer.active_adapter = name
        for adapter_name, adapter in layer.adapters.items():
            adapter.requires_grad_(adapter_name == name)
    for _, wrapper in trained_modules(model):
        for adapter_name, copy in wrapper.modules_to_save.items():
            copy.requires_grad_(adapter_name == name)
    use_trained_copies(model, name)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete one adapter; layers left without adapters become their base layer again."""
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named '{name}'; injected adapters: {adapter_names(model)}")
    unwrapped: dict[int, nn.Module] = {}
    for layer_name, layer in list(adapted_layers(model)):
        if layer.merged_adapter == name:
            raise RuntimeError(f"adapter '{name}' is merged into '{layer_name}'; unmerge() first")
        if name in layer.adapters:
            del layer.adapters[name]
            if layer.active_adapter == name:
                layer.active_adapter = None
        if not layer.adapters:
            unwrapped[id(layer)] = layer.base_layer
    _swap(model, unwrapped)
    for _, wrapper in list(trained_modules(model)):
        if name in wrapper.modules_to_save:
            del wrapper.modules_to_save[name]
            if wrapper.active_adapter == name:
                wrapper.active_adapter = None
        if not len(wrapper.modules_to_save):
            _swap(model, {id(wrapper): wrapper.original_module})


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights, in place (forward then costs nothing extra)."""
    for _, layer in adapted_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the base weights, in place."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and replace every adapted layer by its plain base layer and every trained
    module by the active adapter's copy (in place); the result holds only the base module types and loads
    into the bare architecture."""
    merge(model)
    _swap(model, {id(layer): layer.base_layer for _, layer in adapted_layers(model)})
    _swap(model, {id(wrapper): wrapper.active_module for _, wrapper in trained_modules(model)})
    return model


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the active adapters' regularisers (e.g. TLoRA's ||T - I||^2); 0 if none has one."""
    terms = []
    for _, layer in adapted_layers(model):
        if layer.active_adapter in layer.adapters and layer.merged_adapter is None:
            term = layer.adapters[layer.active_adapter].regularization()
            if term is not None:
                terms.append(term)
    return torch.stack([t.float() for t in terms]).sum() if terms else torch.zeros(())


def summary_rows(model: nn.Module, name: Optional[str] = None) -> list[dict]:
    """One dict per adapted layer: module, method, rank, trainable parameters, % of the base layer; then
    one per module trained in full beside the adapters (method ``"trained"``, rank 0, 100 %)."""
    name = name or active_adapter(model)
    rows = []
    for layer_name, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        params = sum(p.numel() for p in adapter.parameters())
        base = sum(p.numel() for p in layer.base_layer.parameters())
        rows.append(
            {
                "module": layer_name,
                "type": type(layer.base_layer).__name__,
                "method": adapter.config.method,
                "rank": adapter.rank,
                "params": params,
                "base_params": base,
                "percent": 100.0 * params / max(base, 1),
            }
        )
    for module_name, wrapper in trained_modules(model):
        if name in wrapper.modules_to_save:
            params = sum(p.numel() for p in wrapper.modules_to_save[name].parameters())
            rows.append({"module": module_name, "type": type(wrapper.original_module).__name__, "method": "trained",
                         "rank": 0, "params": params, "base_params": params, "percent": 100.0})
    return rows


def capped_ranks(model: nn.Module, name: Optional[str] = None) -> dict[str, list[int]]:
    """{layer: [rank asked, rank used]} of the layers whose rank ``cap_rank`` lowered to what the layer can take
    (adapter `name`, default the active one); {} when none was capped."""
    name = name or active_adapter(model)
    return {layer_name: [layer.adapters[name].config.rank_for(layer_name), layer.adapters[name].rank]
            for layer_name, layer in adapted_layers(model)
            if name in layer.adapters and layer.adapters[name].rank < layer.adapters[name].config.rank_for(layer_name)}


def summary(model: nn.Module, name: Optional[str] = None) -> str:
    """A markdown table: module, method, rank, trainable parameters and % of the base, plus totals."""
    rows = summary_rows(model, name)
    lines = ["| module | layer | method | rank | params | % of layer |", "|---|---|---|---|---|---|"]
    for row in rows:
        rank = "full" if row["method"] == "trained" else row["rank"]
        lines.append(
            f"| {row['module']} | {row['type']} | {row['method']} | {rank} | {row['params']:,} | {row['percent']:.2f} |"
        )
    adapter_params = sum(row["params"] for row in rows)
    adapter_ids = {id(p) for _, layer in adapted_layers(model) for p in layer.adapters.parameters()}
    adapter_ids |= {id(p) for _, wrapper in trained_modules(model) for p in wrapper.modules_to_save.parameters()}
    base_params = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)
    lines.append(
        f"| **total** ({len(rows)} modules) | | | | {adapter_params:,} | {100.0 * adapter_params / max(base_params, 1):.3f} of {base_params:,} base |"
    )
    return "\n".join(lines)
