"""Gumbel-softmax gate (GG MoE)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gatedmoe.gates.base import Gate, routing_from_dense
from gatedmoe.gates.functional import gumbel_noise
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import boolean, nonneg_int, real_in

__all__ = ["GumbelSoftmaxGate"]


@register("gumbel_softmax")
class GumbelSoftmaxGate(Gate):
    """Gumbel-softmax gate of GG MoE (Chernov 2025, "(GG) MoE vs. MLP on Tabular Data"),
    after Jang, Gu & Poole 2017 and Maddison et al. 2017.

    Formula (training): ``y = softmax((W x + b + zeta) / tau)``, ``zeta_e ~ Gumbel(0, 1)``.

    * ``hard=False`` (GG MoE): dense, every expert weighted by ``y_e``.
    * ``hard=True``: sparse top-1, ``e* = argmax_e y_e`` with the straight-through weight
      ``1 + y_e* - stopgrad(y_e*)`` (value 1, gradient of ``y_e*``). This is the
      straight-through estimator restricted to the chosen expert: the full estimator
      would also need ``f_e(x)`` of every unchosen expert, i.e. dense compute.

    Evaluation: with ``eval_samples = 0`` the noise is dropped, ``y = softmax((W x + b) / tau)``
    (argmax for ``hard``); with ``eval_samples = n > 0``, GG MoE's Monte Carlo gate
    averages n noisy samples of y (of the one-hot for ``hard``), dense.

    Soft: dense and differentiable; hard: sparse, straight-through. No balancing of its own.

    Examples
    --------
    >>> import torch
    >>> g = GumbelSoftmaxGate(8, 4, hard=True)
    >>> g(torch.randn(5, 8)).n_assignments
    5
    """

    uses_k = False

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        tau: float = 1.0,
        hard: bool = False,
        eval_samples: int = 0,
    ) -> None:
        super().__init__(d_model, n_experts)
        self.tau = real_in("tau", tau, 0.0, lo_open=True)
        self.hard = boolean("hard", hard)
        self.eval_samples = nonneg_int("eval_samples", eval_samples)
        self.linear = nn.Linear(d_model, n_experts)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = torch.nn.functional.linear(x_TD.float(), self.linear.weight.float(), self.linear.bias.float())
        clean_TE = torch.softmax(logits_TE / self.tau, dim=-1)
        if not self.training and self.eval_samples > 0:
            n = self.eval_samples
            noisy_NTE = logits_TE.unsqueeze(0) + gumbel_noise(logits_TE.unsqueeze(0).expand(n, *logits_TE.shape))
            y_NTE = torch.softmax(noisy_NTE / self.tau, dim=-1)
            if self.hard:
                y_NTE = torch.zeros_like(y_NTE).scatter(-1, y_NTE.argmax(-1, keepdim=True), 1.0)
            mean_TE = y_NTE.mean(0)
            return routing_from_dense(mean_TE, mean_TE > 0, probs=clean_TE, logits=logits_TE)
        h_TE = logits_TE + gumbel_noise(logits_TE) if self.training else logits_TE
        y_TE = torch.softmax(h_TE / self.tau, dim=-1)
        if not self.hard:
            return routing_from_dense(y_TE, probs=clean_TE, logits=logits_TE)
        experts_T1 = y_TE.argmax(-1, keepdim=True)
        y_T1 = y_TE.gather(-1, experts_T1)
        weights_T1 = 1.0 + (y_T1 - y_T1.detach())
        return Routing.from_topk(weights_T1, experts_T1, self.n_experts, probs=clean_TE, logits=logits_TE)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, hard={self.hard}, eval_samples={self.eval_samples}"
