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
    "group_limited_topk",
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
    logits_TE: Tensor, k: int, renormalize: bool = True, bias_E: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k softmax gate.

    ``p = softmax(l)``; keep the k largest; with ``renormalize`` the kept weights are
    ``p_e / sum_{j in topk} p_j`` (= softmax over the kept logits, Shazeer et al. 2017,
    Mixtral), otherwise the kept ``p_e`` as they are (GShard / Switch with k=1).
    With ``bias_E`` (auxiliary-loss-free balancing) experts are *selected* by
    ``p_e + b_e``; the weights still come from ``p`` alone.

    Returns ``(weights_TK, experts_TK, probs_TE)``.
    """
    probs_TE = torch.softmax(logits_TE, dim=-1)
    if bias_E is None:
        weights_TK, experts_TK = torch.topk(probs_TE, k, dim=-1)
    else:
        experts_TK = torch.topk(probs_TE + bias_E, k, dim=-1).indices
        weights_TK = probs_TE.gather(-1, experts_TK)
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


def group_limited_topk(
    logits_TE: Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    bias_E: Tensor | None = None,
    normalize: bool = True,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DeepSeek-V3 group-limited sigmoid top-k (node-limited routing), as in Hugging Face
    ``DeepseekV3TopkRouter``.

    ``s = sigmoid(l)``; selection scores ``c = s + b``; the E experts form ``n_group``
    contiguous groups of ``E / n_group``; a group's score is the sum of its two largest
    ``c``; the ``topk_group`` best groups are kept and every other expert's ``c`` is set
    to 0 (Hugging Face masks with 0, not -inf); the k largest masked ``c`` are selected.
    Weights are the *unbiased* ``s`` of the selected experts, divided by
    ``sum_kept s + 1e-20`` when ``normalize``, times ``scale`` (routed_scaling_factor).

    Returns ``(weights_TK, experts_TK, scores_TE)`` with ``scores_TE = s``.
    """
    T, E = logits_TE.shape
    if n_group < 1 or E % n_group:
        raise ValueError(f"n_group must be >= 1 and divide n_experts={E}, got {n_group}")
    group_size = E // n_group
    if n_group > 1 and group_size < 2:
        raise ValueError(f"each group needs >= 2 experts (group score = top-2 sum); got n_group={n_group} for E={E}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must satisfy 1 <= topk_group <= n_group={n_group}, got {topk_group}")
    if not 1 <= k <= topk_group * group_size:
        raise ValueError(f"k must satisfy 1 <= k <= topk_group * E / n_group = {topk_group * group_size}, got {k}")
    scores_TE = torch.sigmoid(logits_TE)
    with torch.no_grad():
        choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
        if n_group == 1:
            # One group: HF's group mask keeps every expert.
            experts_TK = torch.topk(choice_TE, k, dim=-1).indices
        else:
            experts_TK = _group_limited_select(choice_TE, k, n_group, topk_group)
    weights_TK = scores_TE.gather(-1, experts_TK)
    if normalize:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    return weights_TK * scale, experts_TK, scores_TE


def _group_limited_select(choice_TE: Tensor, k: int, n_group: int, topk_group: int) -> Tensor:
    """Experts ``[T, K]`` chosen by DeepSeek-V3's group-limited rule from scores ``c``."""
    T, E = choice_TE.shape
    group_size = E // n_group
    group_TG = choice_TE.view(T, n_group, group_size).topk(2, dim=-1).values.sum(-1)
    keep_groups_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_groups_TG.scatter_(1, torch.topk(group_TG, topk_group, dim=-1).indices, True)
    keep_TE = keep_groups_TG.unsqueeze(-1).expand(T, n_group, group_size).reshape(T, E)
    return torch.topk(choice_TE.masked_fill(~keep_TE, 0.0), k, dim=-1).indices
