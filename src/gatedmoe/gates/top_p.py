"""Top-p (dynamic) routing: as many experts as it takes to reach probability mass p."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gatedmoe.gates.base import Gate, routing_from_dense
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import boolean, real_in

__all__ = ["TopPGate"]


@register("top_p")
class TopPGate(Gate):
    """Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing
    in MoE Models", eq. 2-5; the variable-expert idea of Li et al. 2023, "Adaptive Gating
    in Mixture-of-Experts based Language Models").

    Formula: ``P = softmax(W x)``; sort descending; keep the smallest prefix whose mass
    reaches p: ``t = argmin_k {sum_{j<=k} P_(j) >= p}``, experts ``(1)..(t)``; weight
    ``P_e`` (``renormalize`` divides by the kept mass). ``max_k`` optionally caps t.
    Dynamic loss (in ``gate_losses`` as ``dynamic_entropy``):
    ``w_entropy * mean_t (-sum_e P_e log P_e)``, which stops the router from flattening P
    to buy more experts.

    Sparse with a variable number of experts per token; selection not differentiable;
    balancing by the layer's auxiliary losses (or a selection bias on P, see
    `attach_bias_balancer`). ``k`` is not used.

    Examples
    --------
    >>> import torch
    >>> g = TopPGate(8, 4, p=0.5)
    >>> bool((g(torch.randn(6, 8)).experts_per_token() >= 1).all())
    True
    """

    uses_k = False
    token_choice = True

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        p: float = 0.4,
        max_k: int | None = None,
        renormalize: bool = False,
        w_entropy: float = 1e-4,
    ) -> None:
        super().__init__(d_model, n_experts)
        p = real_in("p", p, 0.0, 1.0, lo_open=True)
        if max_k is not None and (isinstance(max_k, bool) or not isinstance(max_k, int) or not 1 <= max_k <= n_experts):
            raise ValueError(f"max_k must be None or an int in [1, n_experts={n_experts}], got {max_k!r}")
        self.p, self.max_k = p, max_k
        self.renormalize = boolean("renormalize", renormalize)
        self.w_entropy = real_in("w_entropy", w_entropy, 0.0)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.router_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        bias_E = self.selection_bias()
        with torch.no_grad():
            # With a selection bias, the prefix is taken in the order of P + b, mass of P.
            select_TE = probs_TE if bias_E is None else probs_TE + bias_E
            order_TE = torch.argsort(select_TE, dim=-1, descending=True)
            sorted_TE = probs_TE.gather(-1, order_TE)
            keep_sorted = (torch.cumsum(sorted_TE, -1) - sorted_TE) < self.p
            keep_sorted[:, 0] = True
            if self.max_k is not None:
                keep_sorted[:, self.max_k :] = False
            mask_TE = torch.zeros_like(keep_sorted).scatter(-1, order_TE, keep_sorted)
        weights_TE = probs_TE * mask_TE
        if self.renormalize:
            weights_TE = weights_TE / weights_TE.sum(-1, keepdim=True)
        self._set_transient("gate_losses", {})
        if self.w_entropy:
            entropy_T = -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1)
            # The mean of an empty batch would be NaN: its (zero) sum instead.
            entropy = entropy_T.mean() if entropy_T.shape[0] else entropy_T.sum()
            self.gate_losses["dynamic_entropy"] = self.w_entropy * entropy
        routing = routing_from_dense(weights_TE, mask_TE, probs=probs_TE, logits=logits_TE)
        self.update_bias_balancer(routing.counts)
        return routing

    def extra_repr(self) -> str:
        return f"p={self.p}, max_k={self.max_k}, renormalize={self.renormalize}"
