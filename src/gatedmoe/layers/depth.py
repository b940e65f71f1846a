"""Mixture-of-Depths: a router picks which tokens a block processes; the rest skip it.

Shape legend: B sequences, T tokens, C tokens processed per sequence, D model dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gatedmoe.routing import Routing
from gatedmoe.transient import TransientState

__all__ = ["MixtureOfDepths"]


class MixtureOfDepths(TransientState, nn.Module):
    """Mixture-of-Depths (Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating
    compute in transformer-based language models", sec. 3).

    Formula: router weight ``r_t = w . x_t``; per sequence, the ``C = ceil(capacity * T)``
    tokens with the largest ``r_t`` are processed (expert-choice over one "expert", the
    block), kept in their original order: ``x'_t = x_t + r_t * f(X~)_t``; every other
    token skips the block, ``x'_t = x_t``. Multiplying by ``r_t`` puts the router on the
    gradient path. ``f`` is ``block``, any module mapping ``[B, C, D] -> [B, C, D]`` that
    returns the *update* (no residual of its own), e.g. an attention + MLP body or a
    `gatedmoe.MoE`.

    The top-C choice looks at the whole sequence, so it is not causal; the paper trains an
    auxiliary predictor for autoregressive sampling, which this layer leaves out.
    ``last_routing`` records the choice as a `Routing` over one expert (tokens are the
    B*T flattened positions, weights ``r``).

    Examples
    --------
    >>> import torch
    >>> mod = MixtureOfDepths(torch.nn.Linear(8, 8), d_model=8, capacity=0.5)
    >>> mod(torch.randn(2, 6, 8)).shape
    torch.Size([2, 6, 8])
    """

    _transient = {"last_routing": None}

    def __init__(self, block: nn.Module, d_model: int, *, capacity: float = 0.125) -> None:
        super().__init__()
        if not 0 < capacity <= 1:
            raise ValueError(f"capacity must be in (0, 1], got {capacity}")
        self.block, self.d_model, self.capacity = block, d_model, float(capacity)
        self.router = nn.Linear(d_model, 1, bias=False)
        self.last_routing: Routing | None = None

    def n_selected(self, n_tokens: int) -> int:
        """C = ``ceil(capacity * T)``, at least 1."""
        return max(1, math.ceil(self.capacity * n_tokens))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D]`` (or ``[T, D]``) to the same shape."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [B, T, d_model={self.d_model}] or [T, d_model], got {tuple(x.shape)}")
        x_BTD = x.unsqueeze(0) if x.dim() == 2 else x
        B, T, D = x_BTD.shape
        C = self.n_selected(T)
        r_BT = self.router(x_BTD).squeeze(-1)
        idx_BC = torch.topk(r_BT.detach(), C, dim=-1).indices.sort(dim=-1).values
        sel_BCD = x_BTD.gather(1, idx_BC.unsqueeze(-1).expand(B, C, D))
        r_BC = r_BT.gather(1, idx_BC)
        upd_BCD = self.block(sel_BCD) * r_BC.unsqueeze(-1).to(x.dtype)
        y_BTD = x_BTD.scatter_add(1, idx_BC.unsqueeze(-1).expand(B, C, D), upd_BCD)
        flat = (idx_BC + T * torch.arange(B, device=x.device).unsqueeze(1)).reshape(-1)
        self.last_routing = Routing.from_assignments(
            flat, torch.zeros_like(flat), r_BC.reshape(-1), n_experts=1, n_tokens=B * T
        )
        return y_BTD.squeeze(0) if x.dim() == 2 else y_BTD
