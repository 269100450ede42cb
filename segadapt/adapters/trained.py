"""Modules trained in full beside the adapters (PEFT's ``modules_to_save``): a new mask head, a decoder.

``AdapterConfig.train_modules`` names them (same forms as ``targets``). :func:`segadapt.adapters.inject`
wraps each in a :class:`TrainedModule`: the base's module stays as ``original_module`` (frozen, never
changed), and every adapter that trains it gets its own copy in ``modules_to_save[<adapter>]``, as in
PEFT's ``ModulesToSaveWrapper`` (same state-dict layout: ``<module>.original_module.<tensor>``,
``<module>.modules_to_save.<adapter>.<tensor>``). So several adapters with their own heads sit on one base
(the fold ensembles of ``segadapt.inference``, :mod:`segadapt.adapters.fold`), ``active_adapter=None`` is still the base, and removing an
adapter gives the base's module back. Parameters and buffers (BatchNorm running statistics) of the copy
are the adapter's: saved in its file, restored by ``load_adapter``, kept by ``merge_and_unload``.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional

from torch import nn


class TrainedModule(nn.Module):
    """The base's module plus one trainable copy per adapter; ``forward`` runs the active adapter's copy
    (the original when the active adapter has none, or none is active).

    Attributes other than its own are read from the module it runs (``head.weight``, SAM's
    ``prompt_encoder.get_dense_pe()``), so code that uses the wrapped module keeps working.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None

    @property
    def active_module(self) -> nn.Module:
        if self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def add_copy(self, name: str) -> nn.Module:
        """A fresh copy of the original for adapter ``name`` (frozen until that adapter is made active)."""
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(False)
        self.modules_to_save[name] = module
        return module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of the wrapper itself
        except AttributeError:
            if name in ("original_module", "modules_to_save", "active_adapter") or name.startswith("__"):
                raise  # not set yet (inside __init__, copy or unpickling), or a protocol lookup
            return getattr(self.active_module, name)


def trained_modules(model: nn.Module) -> Iterator[tuple[str, TrainedModule]]:
    """(name, wrapper) for every :class:`TrainedModule` of the model."""
    for name, module in model.named_modules():
        if isinstance(module, TrainedModule):
            yield name, module


def use_trained_copies(model: nn.Module, name: Optional[str]) -> None:
    """Make every :class:`TrainedModule` run adapter ``name``'s copy (the original where it has none),
    leaving the adapted layers and all ``requires_grad`` flags as they are."""
    for _, wrapper in trained_modules(model):
        wrapper.active_adapter = name if name in wrapper.modules_to_save else None
