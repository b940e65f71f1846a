"""Auxiliary losses as pure functions of a `Routing` (unweighted).

Load balancing at three scopes (`gatedmoe.MoE` picks one per layer with
``MoEConfig.load_balance_scope``; docs/training.md says which to use):

=============  ==============================  ==========================================
scope          function                        source
=============  ==============================  ==========================================
micro-batch    `load_balance_loss`             Switch Transformers (Fedus et al. 2021, eq. 4)
sequence       `sequence_balance_loss`         DeepSeek-V2 (2024, eq. 12-14), DeepSeek-V3
                                               (2024, eq. 17-20): complementary
                                               sequence-wise auxiliary loss
global batch   `global_batch_balance_loss`     Qiu et al. 2025, "Demons in the Detail" (Qwen):
                                               expert frequencies over the global batch
=============  ==============================  ==========================================

All three are ``E * sum_e f_e P_e`` with ``f_e`` the fraction of routed assignments that
went to expert e (a constant: no gradient) and ``P_e`` the mean router probability of e
(it carries the gradient); they differ in the set of tokens ``f`` and ``P`` are taken over.
Each equals 1 for a perfectly uniform router. An empty batch (T = 0) gives 0, never NaN.

``count="routed"`` (default) counts the assignments the gate chose, before any capacity
drop, as the Switch paper does (its ``f_i`` is the fraction of tokens *dispatched*, i.e.
routed by argmax, to expert i); ``count="kept"`` counts only those that survived the
capacity. Counting after the drop hides the imbalance exactly when it is worst: with 57 of
64 top-1 tokens on one of 8 experts and capacity 8, that expert's ``f`` is 57/64 = 0.89
routed but 8/15 = 0.53 kept.

Shape legend: T tokens, E experts, S sequences, L tokens per sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gatedmoe.routing import Routing

__all__ = [
    "COUNTS",
    "expert_fractions",
    "global_batch_balance_loss",
    "load_balance_loss",
    "router_z_loss",
    "sequence_balance_loss",
]

COUNTS = ("routed", "kept")


def _check_routing(routing: object) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a gatedmoe.Routing, got {type(routing).__name__}")


def _mean_rows(t: Tensor) -> Tensor:
    # The mean of no rows is NaN, which would poison the training loss: an empty batch gives
    # the (zero) sum instead, still attached to the graph.
    return t.mean(0) if t.shape[0] else t.sum(0)


def _counted(routing: Routing, count: str) -> Routing:
    _check_routing(routing)
    if count not in COUNTS:
        raise ValueError(f"count must be one of {COUNTS}, got {count!r}")
    return routing.routed if count == "routed" else routing


def _probs(routing: Routing, name: str) -> Tensor:
    _check_routing(routing)
    if routing.probs is None:
        raise ValueError(f"{name} needs routing.probs; this gate did not provide them")
    return routing.probs


def expert_fractions(routing: Routing, count: str = "routed") -> Tensor:
    """``f_E``: fraction of the routed assignments that went to each expert, ``[E]``.

    ``count`` is "routed" (before capacity drops, the Switch paper's) or "kept". Float32,
    no gradient; zeros for an empty routing.
    """
    counts_E = _counted(routing, count).counts
    return counts_E.float() / counts_E.sum().clamp_min(1)


def load_balance_loss(routing: Routing, count: str = "routed") -> Tensor:
    """Switch Transformers' load-balancing loss (Fedus et al. 2021, eq. 4), over the batch.

    ``E * sum_e f_e * P_e`` with ``f_e = counts_e / N`` (`expert_fractions`) and
    ``P_e = mean_t probs[t, e]``. For top-k this is DeepSeek's ``f_i = E / (K T) count_i``
    form with the same value. Needs ``routing.probs``.

    Examples
    --------
    >>> import torch
    >>> r = Routing.from_topk(torch.ones(4, 1), torch.tensor([[0], [0], [0], [1]]), 2,
    ...                       probs=torch.tensor([[0.5, 0.5]]).repeat(4, 1))
    >>> float(load_balance_loss(r))  # 2 * (3/4 * 1/2 + 1/4 * 1/2)
    1.0
    """
    P_E = _mean_rows(_probs(routing, "load_balance_loss"))
    f_E = expert_fractions(routing, count).to(P_E.dtype)
    return routing.n_experts * torch.sum(f_E * P_E)


def sequence_balance_loss(routing: Routing, seq_len: int, count: str = "routed") -> Tensor:
    """DeepSeek's sequence-wise balance loss, averaged over the sequences of the batch.

    DeepSeek-V3 (2024, eq. 17-20), as DeepSeek-V2's expert-level loss (eq. 12-14) taken per
    sequence: for each sequence s of L tokens,
    ``L_s = E * sum_e f_se P_se`` with ``f_se = count_se / N_s`` (``= E/(K L) count`` in the
    paper's top-K form, up to the factor E moved out) and
    ``P_se = mean_{t in s} s'_te``, ``s'_t = probs_t / sum_e probs_te`` (V3 normalises
    sigmoid affinities so they sum to 1; softmax probabilities are unchanged). Returns
    ``mean_s L_s``.

    Tokens are rows of ``routing`` in order, ``seq_len`` consecutive rows per sequence
    (``x [S, L, D]`` flattened), so ``routing.n_tokens`` must be a multiple of ``seq_len``.
    With one sequence it equals `load_balance_loss` for normalised probabilities.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    probs_TE = _probs(routing, "sequence_balance_loss")
    T, E = probs_TE.shape
    if T % seq_len:
        raise ValueError(f"routing has {T} tokens, not a multiple of seq_len={seq_len}")
    S = max(T // seq_len, 1)
    r = _counted(routing, count)
    counts_SE = torch.zeros(S * E, dtype=torch.float32, device=probs_TE.device)
    counts_SE = counts_SE.index_add_(0, (r.token // seq_len) * E + r.expert, torch.ones_like(r.token, dtype=torch.float32))
    counts_SE = counts_SE.view(S, E)
    f_SE = (counts_SE / counts_SE.sum(-1, keepdim=True).clamp_min(1)).to(probs_TE.dtype)
    norm_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(probs_TE.dtype).tiny)
    P_SE = norm_TE.reshape(S, -1, E).mean(1) if T else norm_TE.reshape(S, 0, E).sum(1)
    return E * (f_SE * P_SE).sum(-1).mean()


def global_batch_balance_loss(routing: Routing, counts_E: Tensor) -> Tensor:
    """Global-batch balance loss (Qiu et al. 2025, "Demons in the Detail: On Implementing
    Load Balancing Loss for Training Specialized Mixture-of-Expert Models", eq. 3-4).

    ``E * sum_e f_e * P_e`` where ``f_e = counts_E[e] / sum(counts_E)`` comes from the
    counts of the *global batch* (the caller sums them over the data- and expert-parallel
    ranks and over the micro-batches of the optimizer step so far; `gatedmoe.MoE` does with
    ``load_balance_scope="global_batch"``) and ``P_e = mean_t probs[t, e]`` from this
    micro-batch's tokens. With ``counts_E = routing.counts`` it is `load_balance_loss`.
    """
    P_E = _mean_rows(_probs(routing, "global_batch_balance_loss"))
    if counts_E.shape != P_E.shape:
        raise ValueError(f"counts_E must have shape [E]={tuple(P_E.shape)}, got {tuple(counts_E.shape)}")
    f_E = (counts_E.float() / counts_E.sum().clamp_min(1)).to(P_E.dtype)
    return routing.n_experts * torch.sum(f_E * P_E)


def router_z_loss(routing: Routing) -> Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): ``mean_t (logsumexp_e logits)^2``.

    Needs ``routing.logits`` (or ``routing.lse``, their logsumexp, which it uses when the
    gate left it). An empty batch (T = 0) gives 0, still attached to the graph.
    """
    _check_routing(routing)
    if routing.lse is not None:
        return _mean_rows(routing.lse.float().pow(2))
    if routing.logits is None:
        raise ValueError("router_z_loss needs routing.logits; this gate did not provide them")
    return _mean_rows(torch.logsumexp(routing.logits.float(), dim=-1).pow(2))
