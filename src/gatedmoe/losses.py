"""Auxiliary losses as pure functions of a `Routing` (unweighted)."""

from __future__ import annotations

import torch
from torch import Tensor

from gatedmoe.routing import Routing

__all__ = ["load_balance_loss", "router_z_loss"]


def load_balance_loss(routing: Routing) -> Tensor:
    """Switch Transformers' load-balancing loss (Fedus et al. 2021, eq. 4).

    ``E * sum_e f_e * P_e`` where ``f_e = counts_e / N`` is the fraction of assignments sent
    to expert e (a constant: no gradient) and ``P_e = mean_t probs[t, e]`` the mean router
    probability (carries the gradient). Equals 1 for a perfectly uniform router.
    Needs ``routing.probs``. An empty batch (T = 0) gives 0, still attached to the graph.
    """
    _check_routing(routing)
    if routing.probs is None:
        raise ValueError("load_balance_loss needs routing.probs; this gate did not provide them")
    n = max(routing.n_assignments, 1)
    f_E = routing.counts.to(routing.probs.dtype) / n
    # The mean of no rows is NaN, which would poison the training loss: the (zero) sum instead.
    P_E = routing.probs.mean(0) if routing.probs.shape[0] else routing.probs.sum(0)
    return routing.n_experts * torch.sum(f_E * P_E)


def router_z_loss(routing: Routing) -> Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): ``mean_t (logsumexp_e logits)^2``.

    Needs ``routing.logits``. An empty batch (T = 0) gives 0, still attached to the graph.
    """
    _check_routing(routing)
    if routing.logits is None:
        raise ValueError("router_z_loss needs routing.logits; this gate did not provide them")
    z_T = torch.logsumexp(routing.logits.float(), dim=-1).pow(2)
    return z_T.mean() if z_T.shape[0] else z_T.sum()


def _check_routing(routing: object) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a gatedmoe.Routing, got {type(routing).__name__}")
