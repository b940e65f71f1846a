"""Parameter counts of models with MoE layers: total, and active per token."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from gatedmoe.layers.moe import MoE

__all__ = ["count_params"]


def count_params(model: nn.Module, experts_per_token: Mapping[str, float] | None = None) -> tuple[int, int]:
    """``(total, active per token)`` parameter counts of ``model``.

    Active counts, in each `MoE` layer, the routed experts a token uses: ``k`` for gates
    that take k, all E for the others, unless ``experts_per_token`` maps the layer's
    module path (as `RoutingStats` names it) to a measured mean (expert choice, hash,
    top-p, capacity drops).

    Examples
    --------
    >>> from gatedmoe import MoE
    >>> count_params(MoE(4, n_experts=4, d_hidden=8, k=1), {"": 1.0})
    (400, 112)
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for name, m in model.named_modules():
        if not isinstance(m, MoE):
            continue
        per_expert = sum(p.numel() for p in m.experts.parameters()) / m.n_experts
        if experts_per_token is not None and name in experts_per_token:
            active = float(experts_per_token[name])
        else:
            active = m.k if m.gate.uses_k else m.n_experts
        inactive += per_expert * (m.n_experts - active)
    return total, total - round(inactive)
