"""Read this file first: a whole mixture-of-experts layer in plain PyTorch.

    y = sum_e g_e(x) * f_e(x)

Two functions live here.

* `reference_moe` is the full story in ~40 lines: router -> softmax -> top-k -> experts
  -> weighted combine -> auxiliary losses, with nothing hidden behind the library's types.
* `reference_dispatch` executes any `Routing` over an `ExpertBank` with a per-expert
  loop. It is the oracle every fast backend (`grouped.py`, `triton/`) is tested against:
  same signature, computed in float32 (float64 stays float64), no cleverness.

Neither is a user-facing backend: they are slow on purpose, and correct by inspection.

Shape legend: T tokens, D model dim, H expert hidden, E experts, K top-k,
N routed assignments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gatedmoe.experts.bank import ExpertBank
from gatedmoe.routing import Routing

__all__ = ["reference_dispatch", "reference_moe"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_dispatch(x_TD: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """``y_t = sum_{(t, e, w) in routing} w * f_e(x_t)`` by a loop over experts.

    Parameters
    ----------
    x_TD : Tensor ``[T, D]``
        Input rows; any float dtype (computed in float32, or float64 for float64 input).
    routing : Routing
        Assignments sorted by expert; ``routing.n_tokens == T``.
    experts : ExpertBank
        E experts with ``experts.d_model == D``.

    Returns
    -------
    Tensor ``[T, D]`` in ``x_TD.dtype``; rows of tokens without assignments are zero.
    """
    cdt = _compute_dtype(x_TD.dtype)
    x = x_TD.to(cdt)
    y = torch.zeros_like(x)
    ends = routing.offsets.tolist()
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            tok = routing.token[start:end]
            out = _expert_in_dtype(experts, e, x[tok], cdt)
            y = y.index_add(0, tok, out * routing.weight[start:end, None].to(cdt))
        start = end
    return y.to(x_TD.dtype)


def _expert_in_dtype(experts: ExpertBank, e: int, x_ND: Tensor, dtype: torch.dtype) -> Tensor:
    """Expert e's forward with its weights upcast to ``dtype`` (gradients flow through);
    unmerged LoRA adapters add ``s B_e A_e`` to each weight."""
    w_in, w_out = experts.w_in[e].to(dtype), experts.w_out[e].to(dtype)
    lora = experts.active_lora
    if lora is not None:
        w_in = w_in + lora.scale * (lora.B_in[e].to(dtype) @ lora.A_in[e].to(dtype))
        w_out = w_out + lora.scale * (lora.B_out[e].to(dtype) @ lora.A_out[e].to(dtype))
    h = x_ND @ w_in.T
    if experts.b_in is not None:
        h = h + experts.b_in[e].to(dtype)
    out = experts.act(h) @ w_out.T
    if experts.b_out is not None:
        out = out + experts.b_out[e].to(dtype)
    return out


def reference_moe(
    x_TD: Tensor,
    router_ED: Tensor,
    w_in_EHD: Tensor,
    w_out_EDH: Tensor,
    k: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A complete top-k softmax MoE with SwiGLU experts, written out in one function.

    Parameters
    ----------
    x_TD : ``[T, D]`` tokens.
    router_ED : ``[E, D]`` router weights.
    w_in_EHD : ``[E, 2H, D]`` gate and up projections, concatenated.
    w_out_EDH : ``[E, D, H]`` down projections.
    k : experts per token.

    Returns
    -------
    ``(y_TD, {"load_balance": ..., "router_z": ...})`` with the unweighted losses.
    """
    T, D = x_TD.shape
    E = router_ED.shape[0]
    # 1. Router: one score per expert, in float32 so softmax is not bf16-noisy.
    logits_TE = x_TD.float() @ router_ED.float().T
    probs_TE = torch.softmax(logits_TE, dim=-1)
    # 2. Keep the k best experts; renormalise their weights to sum to 1 (Mixtral).
    weights_TK, experts_TK = torch.topk(probs_TE, k, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    # 3. Each expert processes the tokens that chose it; outputs are weighted and summed.
    y_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
    for e in range(E):
        tok, slot = torch.nonzero(experts_TK == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = (x_TD[tok].float() @ w_in_EHD[e].float().T).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ w_out_EDH[e].float().T
        y_TD = y_TD.index_add(0, tok, out * weights_TK[tok, slot, None])
    # 4. Auxiliary losses. Switch Transformers' load balance: E * sum_e f_e * P_e, where
    #    f_e is the fraction of assignments that went to e and P_e the mean router
    #    probability of e; minimised (= 1) by a uniform split. ST-MoE's router z-loss
    #    keeps logits small: mean_t (logsumexp_e logits)^2.
    f_E = torch.bincount(experts_TK.reshape(-1), minlength=E).float() / (T * k)
    P_E = probs_TE.mean(0)
    losses = {
        "load_balance": E * (f_E * P_E).sum(),
        "router_z": torch.logsumexp(logits_TE, dim=-1).pow(2).mean(),
    }
    return y_TD.to(x_TD.dtype), losses
