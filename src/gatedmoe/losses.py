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
    Needs ``routing.probs``.
    """
    if routing.probs is None:
        raise ValueError("load_balance_loss needs routing.probs; this gate did not provide them")
    n = max(routing.n_assignments, 1)
    f_E = routing.counts.to(routing.probs.dtype) / n
    P_E = routing.probs.mean(0)
    return routing.n_experts * torch.sum(f_E * P_E)


def router_z_loss(routing: Routing) -> Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): ``mean_t (logsumexp_e logits)^2``.

    Needs ``routing.logits``.
    """
    if routing.logits is None:
        raise ValueError("router_z_loss needs routing.logits; this gate did not provide them")
    return torch.logsumexp(routing.logits.float(), dim=-1).pow(2).mean()
