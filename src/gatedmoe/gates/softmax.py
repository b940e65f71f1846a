"""Dense softmax gate: the classical mixture of experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gatedmoe.gates.base import Gate
from gatedmoe.gates.functional import softmax_probs
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import real_in

__all__ = ["SoftmaxGate"]


@register("softmax")
class SoftmaxGate(Gate):
    """Dense softmax gate (Jacobs, Jordan, Nowlan & Hinton 1991, "Adaptive Mixtures of
    Local Experts").

    Formula: ``g_e(x) = exp(w_e . x / tau) / sum_j exp(w_j . x / tau)``; every token goes
    to every expert with weight ``g_e(x)`` (N = T * E assignments). Dense, fully
    differentiable, no balancing. ``k`` is not used.

    Parameters
    ----------
    d_model, n_experts : int
        Input width D and number of experts E.
    temperature : float
        tau > 0 (default 1).

    Examples
    --------
    >>> import torch
    >>> g = SoftmaxGate(8, 3)
    >>> g(torch.randn(5, 8)).n_assignments
    15
    """

    uses_k = False

    def __init__(self, d_model: int, n_experts: int, *, temperature: float = 1.0) -> None:
        super().__init__(d_model, n_experts)
        self.temperature = real_in("temperature", temperature, 0.0, lo_open=True)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.router_logits(x_TD)
        probs_TE = softmax_probs(logits_TE, self.temperature)
        T, E = probs_TE.shape
        experts_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        return Routing.from_topk(probs_TE, experts_TE, E, probs=probs_TE, logits=logits_TE)
