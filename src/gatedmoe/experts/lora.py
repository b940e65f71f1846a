"""`ExpertLoRA`: per-expert low-rank adapters on an `ExpertBank`'s ``w_in`` and ``w_out``.

LoRA (Hu et al. 2021) on every expert of the bank: ``W_e -> W_e + s * B_e A_e`` with
``A_e [r, in]``, ``B_e [out, r]``, ``s = alpha / r``; ``B`` starts at zero so the adapted
bank starts as the base. The adapters are stacked along [E] like the experts, so the
grouped dispatch runs them as two more grouped products per weight
(``(x A_e^T) B_e^T``, never forming ``B_e A_e``) and no per-expert Python loop;
`ExpertBank.expert_forward` (the reference) adds ``s * B_e A_e`` to the weight.

Attach with `ExpertBank.add_lora` (which freezes the base weights by default), fold into the
base with `ExpertBank.merge_lora` and take out again with `ExpertBank.unmerge_lora`.

Shape legend: E experts, D model dim, H expert hidden (H' = 2H for GLU), R rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ExpertLoRA"]


class ExpertLoRA(nn.Module):
    """Low-rank adapters of E experts' ``w_in [E, H', D]`` and ``w_out [E, D, H]``.

    Parameters
    ----------
    n_experts, d_model, d_hidden_in, d_hidden : int
        E, D, H' (rows of ``w_in``) and H.
    rank : int
        R >= 1.
    alpha : float, optional
        Scale numerator, ``s = alpha / rank`` (default ``alpha = rank``: s = 1).

    Attributes
    ----------
    A_in ``[E, R, D]``, B_in ``[E, H', R]``, A_out ``[E, R, H]``, B_out ``[E, D, R]``;
    ``merged`` (bool): whether the products are currently folded into the bank's weights.
    """

    def __init__(self, n_experts: int, d_model: int, d_hidden_in: int, d_hidden: int, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a finite float > 0, got {alpha!r}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.A_in = nn.Parameter(torch.empty(n_experts, rank, d_model))
        self.B_in = nn.Parameter(torch.zeros(n_experts, d_hidden_in, rank))
        self.A_out = nn.Parameter(torch.empty(n_experts, rank, d_hidden))
        self.B_out = nn.Parameter(torch.zeros(n_experts, d_model, rank))
        # LoRA's init: A like nn.Linear (kaiming uniform, a = sqrt(5)), B zero.
        for A in (self.A_in, self.A_out):
            bound = 1 / math.sqrt(A.shape[-1])
            nn.init.uniform_(A, -bound, bound)
        self.merged = False

    def delta_in(self) -> Tensor:
        """``s * B_in A_in``, ``[E, H', D]`` (for merging and the reference)."""
        return self.scale * (self.B_in @ self.A_in)

    def delta_out(self) -> Tensor:
        """``s * B_out A_out``, ``[E, D, H]``."""
        return self.scale * (self.B_out @ self.A_out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"
