"""Hash routing: a fixed function of the token id picks the expert."""

from __future__ import annotations

import torch
from torch import Tensor

from gatedmoe.gates.base import Gate
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import nonneg_int

__all__ = ["HashGate", "hash_token_ids"]

# Knuth's multiplicative constant (2^32 / golden ratio); ids below 2^31 keep the product in int64.
_KNUTH = 2654435761


def hash_token_ids(token_ids: Tensor, n_experts: int) -> Tensor:
    """``((id * 2654435761) mod 2^32) mod E``: a fixed, parameter-free hash of token ids."""
    return (token_ids.long() * _KNUTH) % (1 << 32) % n_experts


@register("hash")
class HashGate(Gate):
    """Hash layer routing (Roller, Sukhbaatar, Szlam & Weston 2021, "Hash Layers For Large
    Sparse Models").

    Formula: ``y_t = f_{h(v_t)}(x_t)`` with weight 1, where ``v_t`` is the vocabulary id of
    token t and ``h`` is fixed before training. With ``vocab_size`` the hash is the
    paper's "random hash": a lookup table ``h(v) = pi(v) mod E`` for a random permutation
    ``pi`` seeded by ``seed`` (so every expert gets V/E ids, +-1); without it, a
    multiplicative hash ``((v * 2654435761) mod 2^32) mod E``.

    Needs ``token_ids`` (the MoE layer passes them: ``moe(x, token_ids=ids)``). Sparse
    (one expert), no learned parameters, no gradient into routing; balanced by
    construction over the vocabulary, not over a skewed token distribution. ``k`` is not
    used. ``Routing.probs`` and ``logits`` are None (no router distribution).

    Examples
    --------
    >>> import torch
    >>> g = HashGate(8, 4, vocab_size=100)
    >>> g(torch.randn(3, 8), token_ids=torch.tensor([5, 5, 7])).n_assignments
    3
    """

    uses_k = False
    uses_token_ids = True

    def __init__(self, d_model: int, n_experts: int, *, vocab_size: int | None = None, seed: int = 0) -> None:
        super().__init__(d_model, n_experts)
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"vocab_size must be None or a positive int, got {vocab_size!r}")
        nonneg_int("seed", seed)
        self.vocab_size = vocab_size
        if vocab_size is not None:
            perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
            self.register_buffer("table", perm % n_experts)
        else:
            self.table = None

    def expert_of(self, token_ids: Tensor) -> Tensor:
        """Expert id of each token id (same shape, int64)."""
        if self.table is not None:
            return self.table[token_ids.long()]
        return hash_token_ids(token_ids, self.n_experts)

    def forward(self, x_TD: Tensor, token_ids: Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ValueError("hash gate needs token_ids (pass token_ids=... to the MoE layer)")
        if not isinstance(token_ids, Tensor):
            raise TypeError(f"token_ids must be an integer torch.Tensor, got {type(token_ids).__name__}")
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        ids_T = token_ids.reshape(-1).to(x_TD.device)
        if ids_T.numel() != x_TD.shape[0]:
            raise ValueError(f"token_ids must hold one id per token (T={x_TD.shape[0]}), got {ids_T.numel()}")
        if ids_T.numel():
            lo, hi = int(ids_T.min()), int(ids_T.max())
            limit = self.vocab_size if self.vocab_size is not None else 1 << 31
            if lo < 0 or hi >= limit:
                raise ValueError(f"token_ids must lie in [0, {limit}), got {lo}..{hi}")
        experts_T1 = self.expert_of(ids_T).unsqueeze(1)
        weights_T1 = torch.ones(experts_T1.shape, dtype=torch.float32, device=x_TD.device)
        return Routing.from_topk(weights_T1, experts_T1, self.n_experts)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}"
