"""The `Gate` base class: a module that maps tokens ``x_TD`` to a `Routing`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gatedmoe.routing import Routing

__all__ = ["Gate", "check_k"]


def check_k(k: int, n_experts: int) -> int:
    """Validate a top-k against the number of experts; return it."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n_experts:
        raise ValueError(f"k must satisfy 1 <= k <= n_experts={n_experts}, got k={k}")
    return k


class Gate(nn.Module):
    """Base of every gate.

    A gate owns its router parameters and returns a `Routing` from ``forward(x_TD)``.
    Router math runs in float32 whatever the input dtype. A gate with a loss of its own
    (e.g. noisy top-k's importance and load losses) leaves it, already weighted, in
    ``self.gate_losses`` after each forward; the MoE layer collects it.

    Subclasses set ``uses_k = False`` when they route densely or choose the number of
    experts themselves, so the layer does not pass ``k``.
    """

    uses_k: bool = True

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
        self.d_model = d_model
        self.n_experts = n_experts
        self.gate_losses: dict[str, Tensor] = {}

    def router_logits(self, x_TD: Tensor) -> Tensor:
        """``x W^T`` in float32 (the linear router of most gates), ``[T, E]``."""
        return torch.nn.functional.linear(x_TD.float(), self.weight.float())

    def forward(self, x_TD: Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError
