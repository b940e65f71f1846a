"""Mixture-of-Depths: a router picks which tokens a block processes; the rest skip it.

Shape legend: B sequences, T tokens, C tokens processed per sequence, D model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.routing import Routing
from gatedmoe.transient import TransientState
from gatedmoe.validation import boolean, check_finite, check_input, positive_int, real_in

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

    Parameters
    ----------
    block : nn.Module
        ``f``, called on the chosen tokens ``[B, C, D]`` in the input's dtype.
    d_model : int
        D.
    capacity : float
        Fraction of each sequence's tokens the block processes, in (0, 1] (default 0.125).
    check_inputs : bool
        Fail on NaN/inf in the input (default True), as `gatedmoe.MoE` does (see
        `gatedmoe.MoEConfig`).

    Inputs ``[B, T, D]`` or ``[T, D]`` follow the contract of `gatedmoe.MoE`: any floating
    dtype (the router runs in float32, the block sees ``x``'s dtype: a block whose weights
    have another dtype is refused up front with a TypeError, outside ``torch.autocast``);
    a batch with no tokens returns ``x`` unchanged without calling the block.

    Examples
    --------
    >>> import torch
    >>> mod = MixtureOfDepths(torch.nn.Linear(8, 8), d_model=8, capacity=0.5)
    >>> mod(torch.randn(2, 6, 8)).shape
    torch.Size([2, 6, 8])
    """

    _transient = {"last_routing": None}

    def __init__(self, block: nn.Module, d_model: int, *, capacity: float = 0.125, check_inputs: bool = True) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module mapping [B, C, D] to [B, C, D], got {type(block).__name__}")
        positive_int("d_model", d_model)
        self.block, self.d_model = block, d_model
        self.capacity = real_in("capacity", capacity, 0.0, 1.0, lo_open=True)
        self.check_inputs = boolean("check_inputs", check_inputs)
        self.router = nn.Linear(d_model, 1, bias=False)
        self.last_routing: Routing | None = None

    def n_selected(self, n_tokens: int) -> int:
        """C = ``ceil(capacity * T)``, at least 1 (0 for a sequence with no tokens)."""
        return max(1, math.ceil(self.capacity * n_tokens)) if n_tokens else 0

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D]`` (or ``[T, D]``) to the same shape."""
        check_input(x, self.d_model, "MixtureOfDepths", ndims=(2, 3), shape_text="[B, T, d_model] or [T, d_model]")
        self._check_block_dtype(x)
        if self.check_inputs:
            check_finite(x, "MixtureOfDepths")
        x_BTD = x.unsqueeze(0) if x.dim() == 2 else x
        B, T, D = x_BTD.shape
        C = self.n_selected(T)
        if B * C == 0:
            # No token to process: nothing to route, and a block need not accept 0 tokens.
            empty = torch.zeros(0, dtype=torch.long, device=x.device)
            self.last_routing = Routing.from_assignments(
                empty, empty, torch.zeros(0, device=x.device), n_experts=1, n_tokens=B * T
            )
            return x
        r_BT = F.linear(x_BTD.float(), self.router.weight.float()).squeeze(-1)
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

    def _check_block_dtype(self, x: Tensor) -> None:
        if torch.is_autocast_enabled(x.device.type):
            return
        dtypes = {p.dtype for p in self.block.parameters() if p.is_floating_point()}
        if dtypes and x.dtype not in dtypes:
            raise TypeError(
                f"MixtureOfDepths: x has dtype {x.dtype} but block's weights are {sorted(map(str, dtypes))}; "
                "the block gets x's dtype: cast x or the block (e.g. block.to(x.dtype))"
            )
