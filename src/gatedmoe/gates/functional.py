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
    "group_limited_topk",
    "check_mask_value",
    "gumbel_noise",
    "annealed_temperature",
    "top_p_mask",
    "smooth_step",
    "binary_codes",
    "dselect_k_weights",
    "threshold_weights",
    "expert_choice",
]


def softmax_probs(logits_TE: Tensor, temperature: float = 1.0) -> Tensor:
    """Classical softmax gate: ``g_e(x) = exp(l_e / tau) / sum_j exp(l_j / tau)``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits_TE / temperature, dim=-1)


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
    mask_value: float = float("-inf"),
) -> tuple[Tensor, Tensor, Tensor]:
    """DeepSeek-V3 group-limited sigmoid top-k (node-limited routing), as in Hugging Face
    ``DeepseekV3TopkRouter``.

    ``s = sigmoid(l)``; selection scores ``c = s + b``; the E experts form ``n_group``
    contiguous groups of ``E / n_group``; a group's score is the sum of its two largest
    ``c``; the ``topk_group`` best groups are kept and every other expert's ``c`` is set
    to ``mask_value``; the k largest masked ``c`` are selected. ``mask_value`` is -inf
    (default: transformers >= 5.23, DeepSeek's inference code, torchtitan: only experts of
    kept groups are ever selected) or 0.0 (transformers 4.x and DeepSeek's remote code:
    an expert of a dropped group beats a kept expert whose ``c`` is negative); the two
    select differently only when a kept expert's ``c`` is negative. Weights are the *unbiased* ``s`` of the selected experts, divided by
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
    check_mask_value(mask_value)
    scores_TE = torch.sigmoid(logits_TE)
    with torch.no_grad():
        choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
        if n_group == 1:
            # One group: HF's group mask keeps every expert.
            experts_TK = torch.topk(choice_TE, k, dim=-1).indices
        else:
            experts_TK = _group_limited_select(choice_TE, k, n_group, topk_group, mask_value)
    weights_TK = scores_TE.gather(-1, experts_TK)
    if normalize:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    return weights_TK * scale, experts_TK, scores_TE


def check_mask_value(mask_value: float) -> float:
    """Validate the score of experts in dropped groups (0.0 or -inf); return it as a float."""
    if mask_value not in (0.0, float("-inf")):
        raise ValueError(f"mask_value must be 0.0 or -inf, got {mask_value}")
    return float(mask_value)


def _group_limited_select(choice_TE: Tensor, k: int, n_group: int, topk_group: int, mask_value: float) -> Tensor:
    """Experts ``[T, K]`` chosen by DeepSeek-V3's group-limited rule from scores ``c``."""
    T, E = choice_TE.shape
    group_size = E // n_group
    group_TG = choice_TE.view(T, n_group, group_size).topk(2, dim=-1).values.sum(-1)
    keep_groups_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_groups_TG.scatter_(1, torch.topk(group_TG, topk_group, dim=-1).indices, True)
    keep_TE = keep_groups_TG.unsqueeze(-1).expand(T, n_group, group_size).reshape(T, E)
    return torch.topk(choice_TE.masked_fill(~keep_TE, mask_value), k, dim=-1).indices


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel(0, 1) samples ``-log(-log U)`` shaped like ``like``."""
    u = torch.rand(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    tiny = torch.finfo(like.dtype).tiny
    neg_log_u = (-torch.log(u.clamp_min(tiny))).clamp_min(tiny)
    return -torch.log(neg_log_u)


def annealed_temperature(step: int, tau_start: float, tau_end: float, anneal_steps: int, schedule: str) -> float:
    """Temperature after ``step`` training steps.

    ``constant``: tau_start. ``linear``: ``tau_start + (tau_end - tau_start) * r``.
    ``exponential``: ``tau_start * (tau_end / tau_start) ** r``; ``r = min(step / anneal_steps, 1)``.
    """
    r = min(step / anneal_steps, 1.0) if anneal_steps > 0 else 1.0
    if schedule == "constant":
        return tau_start
    if schedule == "linear":
        return tau_start + (tau_end - tau_start) * r
    if schedule == "exponential":
        return tau_start * (tau_end / tau_start) ** r
    raise ValueError(f"schedule must be 'constant', 'linear' or 'exponential', got {schedule!r}")


def top_p_mask(probs_TE: Tensor, p: float, max_k: int | None = None) -> Tensor:
    """Boolean ``[T, E]``: each row's smallest set of largest probabilities summing to >= p.

    Expert j (in descending order) is kept iff the mass of the experts before it is < p,
    so the top-1 is always kept; ``max_k`` caps the set size.
    """
    sorted_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True)
    before_TE = torch.cumsum(sorted_TE, dim=-1) - sorted_TE
    keep_sorted = before_TE < p
    keep_sorted[:, 0] = True
    if max_k is not None:
        keep_sorted[:, max_k:] = False
    return torch.zeros_like(keep_sorted).scatter(-1, order_TE, keep_sorted)


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """Cubic smooth-step of Hazimeh et al. 2020/2021: 0 for ``t <= -gamma/2``, 1 for
    ``t >= gamma/2``, else ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2``."""
    mid = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), mid))


def binary_codes(n_experts: int, device: torch.device | str | None = None) -> Tensor:
    """``[E, m]`` bool, row e = binary digits of e (most significant first), m = ceil(log2 E)."""
    m = max(1, (n_experts - 1).bit_length())
    e = torch.arange(n_experts, device=device).unsqueeze(1)
    shifts = torch.arange(m - 1, -1, -1, device=device)
    return (e >> shifts) & 1 == 1


def dselect_k_weights(z_TKM: Tensor, alpha_TK: Tensor, n_experts: int, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """DSelect-k (Hazimeh et al. 2021, eq. 5-6).

    Selector i: ``r_i(e) = prod_j S(z_ij)^[bit_j(e)] (1 - S(z_ij))^[1 - bit_j(e)]`` with the
    smooth-step S; weights ``w_e = sum_i softmax(alpha)_i r_i(e)``.

    Returns ``(weights_TE, selectors_TKE)``.
    """
    codes_EM = binary_codes(n_experts, z_TKM.device)
    s_TK1M = smooth_step(z_TKM, gamma).unsqueeze(-2)
    factors_TKEM = torch.where(codes_EM, s_TK1M, 1 - s_TK1M)
    selectors_TKE = factors_TKEM.prod(-1)
    weights_TE = (torch.softmax(alpha_TK, dim=-1).unsqueeze(-1) * selectors_TKE).sum(-2)
    return weights_TE, selectors_TKE


def threshold_weights(probs_TE: Tensor, threshold_T1: Tensor) -> tuple[Tensor, Tensor]:
    """AdaMoLE gate (Liu & Luo 2024): keep ``p_e >= tau``; weight ``(p_e - tau)`` over its sum.

    Returns ``(weights_TE, mask_TE)``; a row with nothing kept gets zero weights.
    """
    adapted_TE = probs_TE - threshold_T1
    mask_TE = adapted_TE >= 0
    kept_TE = adapted_TE * mask_TE
    total_T1 = kept_TE.sum(-1, keepdim=True)
    total_T1 = torch.where(total_T1 == 0, torch.ones_like(total_T1), total_T1)
    return kept_TE / total_T1, mask_TE


def expert_choice(probs_TE: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its ``capacity`` tokens
    of highest ``probs[:, e]``. Returns ``(tokens_EC, weights_EC)``."""
    weights_EC, tokens_EC = torch.topk(probs_TE.t(), capacity, dim=-1)
    return tokens_EC, weights_EC
