"""Gate registry: users pick gates by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gatedmoe.gates.base import Gate

__all__ = ["register", "build", "names", "get"]

_GATES: dict[str, type[Gate]] = {}


def register(name: str) -> Callable[[type[Gate]], type[Gate]]:
    """Class decorator: make a `Gate` subclass buildable as ``build(name, ...)``."""

    def deco(cls: type[Gate]) -> type[Gate]:
        if name in _GATES:
            raise ValueError(f"gate {name!r} is already registered")
        _GATES[name] = cls
        cls.registry_name = name
        return cls

    return deco


def names() -> list[str]:
    """Names of all registered gates, sorted."""
    return sorted(_GATES)


def get(name: str) -> type[Gate]:
    """The gate class registered as ``name``; ValueError listing known names otherwise."""
    if name not in _GATES:
        raise ValueError(f"unknown gate {name!r}; known gates: {', '.join(names())}")
    return _GATES[name]


def build(name: str, **kwargs: Any) -> Gate:
    """Instantiate the gate registered as ``name`` with ``kwargs``.

    Examples
    --------
    >>> from gatedmoe import gates
    >>> g = gates.build("topk_softmax", d_model=16, n_experts=4, k=2)
    """
    return get(name)(**kwargs)
