"""Gate math as pure functions of router scores, shared by the deep gates and `stats`.

Everything here takes and returns float tensors ``[T, E]`` (or ``[T, K]`` for top-k
results) and computes in the dtype it is given: callers upcast to float32 first.
Shape legend: T tokens, E experts, K kept experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "softmax_probs",
    "topk_softmax",
    "sigmoid_topk",
    "keep_topk_mask",
]


def softmax_probs(logits_TE: Tensor, temperature: float = 1.0) -> Tensor:
    """Classical softmax gate: ``g_e(x) = exp(l_e / tau) / sum_j exp(l_j / tau)``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits_TE / temperature, dim=-1)


def keep_topk_mask(scores_TE: Tensor, k: int) -> Tensor:
    """Boolean ``[T, E]`` mask of each row's k largest scores (ties broken by index)."""
    idx_TK = torch.topk(scores_TE, k, dim=-1).indices
    return torch.zeros_like(scores_TE, dtype=torch.bool).scatter(-1, idx_TK, True)


def topk_softmax(
    logits_TE: Tensor, k: int, renormalize: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k softmax gate.

    ``p = softmax(l)``; keep the k largest; with ``renormalize`` the kept weights are
    ``p_e / sum_{j in topk} p_j`` (= softmax over the kept logits, Shazeer et al. 2017,
    Mixtral), otherwise the kept ``p_e`` as they are (GShard / Switch with k=1).

    Returns ``(weights_TK, experts_TK, probs_TE)``.
    """
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK, experts_TK = torch.topk(probs_TE, k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return weights_TK, experts_TK, probs_TE


def sigmoid_topk(
    logits_TE: Tensor,
    k: int,
    bias_E: Tensor | None = None,
    normalize: bool = True,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DeepSeek-V3 sigmoid gate.

    ``s_e = sigmoid(l_e)``; experts are *selected* by ``s_e + b_e`` (the bias only
    selects, it never weights); the weight of a kept expert is
    ``scale * s_e / sum_{j kept} s_j`` (or ``scale * s_e`` without ``normalize``).

    Returns ``(weights_TK, experts_TK, scores_TE)`` where ``scores_TE`` are the sigmoid
    scores ``s``.
    """
    scores_TE = torch.sigmoid(logits_TE)
    select_TE = scores_TE if bias_E is None else scores_TE + bias_E
    experts_TK = torch.topk(select_TE, k, dim=-1).indices
    weights_TK = scores_TE.gather(-1, experts_TK)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return weights_TK * scale, experts_TK, scores_TE
