"""The one registry of adapter methods: ``METHODS[name] -> Adapter subclass``.

Adding a method is one file (an :class:`~segadapt.adapters.base.Adapter` subclass) and one
``@register_method("name")`` line; ``segadapt/adapters/__init__.py`` imports the file.
"""

from __future__ import annotations

from typing import Callable

METHODS: dict[str, type] = {}


def register_method(*names: str) -> Callable[[type], type]:
    """Class decorator that makes an Adapter subclass available under one or more method names."""

    def add(cls: type) -> type:
        for name in names:
            if name in METHODS:
                raise ValueError(f"adapter method '{name}' is registered twice")
            METHODS[name] = cls
        return cls

    return add


def get_method(name: str) -> type:
    """The Adapter class for a method name; a clear error listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method '{name}'; valid methods: {', '.join(sorted(METHODS))}") from None
