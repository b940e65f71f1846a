"""Expert activations: plain ones and the GLU family (Shazeer 2020, "GLU Variants
Improve Transformer").

A GLU activation takes the first layer's output ``h = [a | b]`` of width 2H and returns
``act(a) * b`` of width H; a plain activation maps width H to H.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Activation", "get_activation", "activation_names"]


@dataclass(frozen=True)
class Activation:
    """An elementwise function and whether it is used in GLU form."""

    name: str
    fn: Callable[[Tensor], Tensor]
    glu: bool

    def __call__(self, h: Tensor) -> Tensor:
        """Apply to the first layer's output ``h [N, H]`` (``[N, 2H]`` for GLU)."""
        if not self.glu:
            return self.fn(h)
        a, b = h.chunk(2, dim=-1)
        return self.fn(a) * b


def _identity(x: Tensor) -> Tensor:
    return x


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation("relu", torch.relu, glu=False),
        Activation("gelu", _gelu_tanh, glu=False),
        Activation("silu", F.silu, glu=False),
        Activation("swiglu", F.silu, glu=True),
        Activation("geglu", _gelu_tanh, glu=True),
        Activation("reglu", torch.relu, glu=True),
        Activation("bilinear", _identity, glu=True),
    ]
}


def activation_names() -> list[str]:
    """Known activation names."""
    return sorted(_ACTIVATIONS)


def get_activation(name: str) -> Activation:
    """The activation called ``name``; ValueError listing the known ones otherwise."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known activations: {', '.join(activation_names())}")
    return _ACTIVATIONS[name]
