"""Threshold gate of AdaMoLE: a learned per-token threshold decides how many experts fire."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.gates.base import Gate, routing_from_dense
from gatedmoe.gates.functional import threshold_weights
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import real_in

__all__ = ["ThresholdGate"]


@register("threshold")
class ThresholdGate(Gate):
    """Adaptive threshold gate (Liu & Luo 2024, "AdaMoLE: Fine-Tuning Large Language
    Models with Adaptive Mixture of Low-Rank Adaptation Experts", sec. 3).

    Formula: ``p = softmax(W x)``; a threshold network ``tau(x) = tau_max * sigmoid(v . x + c)``;
    expert e fires iff ``p_e >= tau(x)``, with weight
    ``(p_e - tau(x)) / sum_{j fired} (p_j - tau(x))``. The default ``tau_max = 1/E``
    guarantees the top expert fires (``max_e p_e >= 1/E > tau``). Both the gate and the
    threshold network receive gradients through the weights.

    Sparse with a variable number of experts per token; selection not differentiable;
    balancing by the layer's auxiliary losses. ``k`` is not used.

    Examples
    --------
    >>> import torch
    >>> g = ThresholdGate(8, 4)
    >>> bool((g(torch.randn(6, 8)).experts_per_token() >= 1).all())
    True
    """

    uses_k = False

    def __init__(self, d_model: int, n_experts: int, *, tau_max: float | None = None) -> None:
        super().__init__(d_model, n_experts)
        tau_max = 1.0 / n_experts if tau_max is None else tau_max
        self.tau_max = real_in("tau_max", tau_max, 0.0, 1.0, lo_open=True)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)
        self.threshold_fn = nn.Linear(d_model, 1)

    def threshold(self, x_TD: Tensor) -> Tensor:
        """tau(x), ``[T, 1]`` float32."""
        t = F.linear(x_TD.float(), self.threshold_fn.weight.float(), self.threshold_fn.bias.float())
        return self.tau_max * torch.sigmoid(t)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.router_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TE, mask_TE = threshold_weights(probs_TE, self.threshold(x_TD))
        return routing_from_dense(weights_TE, mask_TE, probs=probs_TE, logits=logits_TE)

    def extra_repr(self) -> str:
        return f"tau_max={self.tau_max}"
