"""Multi-Head MoE: each token is split into sub-tokens that are routed independently."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.layers.config import MoEConfig
from gatedmoe.layers.moe import MoE, _check_token_ids
from gatedmoe.validation import check_finite, check_input, positive_int

__all__ = ["MultiHeadMoE"]


class MultiHeadMoE(nn.Module):
    """Multi-Head Mixture-of-Experts (Wu, Huang, Wang & Wei 2024, "Multi-Head
    Mixture-of-Experts", sec. 3).

    Formula: ``x' = W_head x`` (``[D] -> [D]``), split into h sub-tokens of width D/h;
    each sub-token goes through an ordinary `gatedmoe.MoE` of width D/h (any gate), as if
    it were a token of its own; the outputs are concatenated back to width D and merged,
    ``y = W_merge concat(...)``. Routing several sub-tokens of one token to different
    experts raises expert activation and lets a token attend to several representation
    spaces.

    Parameters
    ----------
    d_model : int
        D, divisible by ``n_heads``.
    n_heads : int
        h.
    n_experts, d_hidden : int
        Experts of the inner MoE and their hidden width (MH-MoE shrinks it to keep FLOPs).
    **moe_kwargs
        The other `gatedmoe.MoEConfig` fields of the inner MoE (gate, k, gate_kwargs,
        capacity_factor, ...). They make ``self.config``, the inner layer's config (its
        ``d_model`` is the sub-token width D/h), and ``self.moe = MoE.from_config(self.config)``;
        `from_config` takes a config directly.

    ``aux_losses`` and ``last_routing`` live on ``self.moe`` (``aux_loss(model)`` finds
    them); ``token_ids`` are repeated for each sub-token. Inputs follow the contract of
    `gatedmoe.MoE` (any floating dtype, computed in: the projections are cast to it; NaN/inf
    checked on entry with the config's ``check_inputs``).

    Examples
    --------
    >>> import torch
    >>> m = MultiHeadMoE(16, n_heads=4, n_experts=4, d_hidden=8, k=2)
    >>> m(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    >>> m.moe.config.d_model
    4
    """

    def __init__(self, d_model: int, n_heads: int, n_experts: int, d_hidden: int, **moe_kwargs: Any) -> None:
        super().__init__()
        positive_int("d_model", d_model)
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"n_heads must be a positive int dividing d_model={d_model}, got {n_heads!r}")
        self.d_model, self.n_heads = d_model, n_heads
        self.head_proj = nn.Linear(d_model, d_model)
        self.merge_proj = nn.Linear(d_model, d_model)
        self.config = MoEConfig(d_model=d_model // n_heads, n_experts=n_experts, d_hidden=d_hidden, **moe_kwargs)
        self.moe = MoE.from_config(self.config)

    @classmethod
    def from_config(cls, config: MoEConfig, *, n_heads: int) -> MultiHeadMoE:
        """An MH-MoE of width ``n_heads * config.d_model`` whose inner layer is
        ``MoE.from_config(config)`` (``self.moe.config == config``)."""
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
        settings = config.to_dict()
        d_sub, n_experts, d_hidden = settings.pop("d_model"), settings.pop("n_experts"), settings.pop("d_hidden")
        return cls(n_heads * d_sub, n_heads, n_experts, d_hidden, **settings)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """``x [..., D] -> [..., D]``."""
        check_input(x, self.d_model, "MultiHeadMoE")
        if self.config.check_inputs:
            check_finite(x, "MultiHeadMoE")
        _check_token_ids(token_ids, x)
        sub = _linear_in(self.head_proj, x).reshape(*x.shape[:-1], self.n_heads, self.d_model // self.n_heads)
        ids = None if token_ids is None else token_ids.unsqueeze(-1).expand(*token_ids.shape, self.n_heads)
        out = self.moe(sub, token_ids=ids)
        return _linear_in(self.merge_proj, out.reshape(x.shape))


def _linear_in(linear: nn.Linear, x: Tensor) -> Tensor:
    """``linear(x)`` computed in ``x.dtype`` (the layer contract: inputs are computed in)."""
    bias = None if linear.bias is None else linear.bias.to(x.dtype)
    return F.linear(x, linear.weight.to(x.dtype), bias)
