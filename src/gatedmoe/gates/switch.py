"""Switch Transformer gate: top-1 softmax, capacity factor, input jitter."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.gates.base import Gate
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import real_in

__all__ = ["SwitchGate"]


@register("switch")
class SwitchGate(Gate):
    """Switch routing (Fedus, Zoph & Shazeer 2021, "Switch Transformers", sec. 2.1-2.2).

    Formula: in training the router input is jittered, ``x' = x * u``,
    ``u ~ Uniform(1 - eps, 1 + eps)`` elementwise (the paper's "input jitter", sec. 4 / app.);
    ``p = softmax(W x')``; each token goes to ``e* = argmax_e p_e`` with weight ``p_e*``
    (not renormalised, so the router gets a gradient). Each expert keeps at most
    ``C = ceil(capacity_factor * T / E)`` tokens, earlier tokens first; the rest are
    dropped (they pass through the residual unchanged).

    The dropped routing keeps the routing before the drop (``Routing.before_capacity``), so
    the layer's load-balancing loss (``E * sum_e f_e P_e``) counts the tokens routed to each
    expert before capacity, as the paper does (``load_balance_count="kept"`` counts after).

    Sparse (top-1), selection not differentiable, balancing by auxiliary loss (or a
    selection bias via `attach_bias_balancer`). ``k`` is fixed at 1.

    Parameters
    ----------
    capacity_factor : float or None
        Training capacity factor (default 1.25); None = no dropping.
    eval_capacity_factor : float or None
        Capacity factor in eval mode (default: same as ``capacity_factor``).
    jitter_eps : float
        eps of the multiplicative input jitter in training (default 0.01; 0 disables).

    Examples
    --------
    >>> import torch
    >>> g = SwitchGate(8, 4, capacity_factor=1.0)
    >>> r = g(torch.randn(16, 8))
    >>> int(r.counts.max()) <= 4
    True
    """

    uses_k = False
    token_choice = True

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = None,
        jitter_eps: float = 1e-2,
    ) -> None:
        super().__init__(d_model, n_experts)
        for name, v in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if v is not None:
                real_in(f"{name} (or None)", v, 0.0, lo_open=True)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor is None else eval_capacity_factor
        self.jitter_eps = real_in("jitter_eps", jitter_eps, 0.0, 1.0, hi_open=True)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def capacity(self, n_tokens: int) -> int | None:
        """``ceil(cf * T / E)`` for the current mode, or None without a capacity factor."""
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return None if cf is None else max(1, math.ceil(cf * n_tokens / self.n_experts))

    def forward(self, x_TD: Tensor) -> Routing:
        x = x_TD.float()
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits_TE = F.linear(x, self.weight.float())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        bias_E = self.selection_bias()
        select_TE = probs_TE if bias_E is None else probs_TE + bias_E
        experts_T1 = select_TE.argmax(-1, keepdim=True)
        routing = Routing.from_topk(probs_TE.gather(-1, experts_T1), experts_T1, self.n_experts, probs=probs_TE, logits=logits_TE)
        self.update_bias_balancer(routing.counts)
        capacity = self.capacity(x_TD.shape[0])
        if capacity is not None:
            routing = routing.drop_over_capacity(capacity, "position")
        return routing

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}, jitter_eps={self.jitter_eps}"
