"""Temperature softmax: the dense-to-sparse gate and its activation-before-temperature variant."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.gates.base import Gate, routing_from_dense
from gatedmoe.gates.functional import annealed_temperature, gumbel_noise
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import boolean, nonneg_int, one_of, real_in

__all__ = ["TemperatureSoftmaxGate", "GATE_ACTIVATIONS"]

GATE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "softplus": F.softplus,
}


@register("temperature_softmax")
class TemperatureSoftmaxGate(Gate):
    """Softmax with an annealed temperature: the dense-to-sparse gate (DTS-Gate; Nie et al.
    2021, "Dense-to-Sparse Gate for Mixture-of-Experts" / EvoMoE) and the activation
    dense-to-sparse gate of Nguyen et al. 2024, "Is Temperature Sample Efficient for
    Softmax Gaussian Mixture of Experts?".

    Formula: ``g = softmax((sigma(W x + b) + zeta) / tau)`` where ``sigma`` is the identity
    (DTS-Gate) or ``activation`` (tanh, sigmoid, ...: the activation is applied *before*
    the temperature), ``zeta ~ Gumbel(0, 1)`` in training when ``noise`` (DTS-Gate), and
    ``tau`` follows ``schedule`` from ``tau_start`` to ``tau_end`` over ``anneal_steps``
    training forwards (counted in the ``step`` buffer). Weights below ``threshold`` are
    dropped (the top-1 is always kept); with ``renormalize`` the kept weights are
    rescaled to sum to 1. As tau falls the gate turns from dense to sparse.

    Dense at threshold 0, sparse above it; fully differentiable weights; no balancing of
    its own (the layer's losses apply). ``k`` is not used.

    Examples
    --------
    >>> import torch
    >>> g = TemperatureSoftmaxGate(8, 4, threshold=0.0, noise=False)
    >>> g(torch.randn(3, 8)).n_assignments
    12
    """

    uses_k = False

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        tau_start: float = 2.0,
        tau_end: float = 0.3,
        anneal_steps: int = 10_000,
        schedule: str = "exponential",
        threshold: float = 0.0,
        renormalize: bool = False,
        noise: bool = True,
        activation: str | None = None,
    ) -> None:
        super().__init__(d_model, n_experts)
        for name, v in (("tau_start", tau_start), ("tau_end", tau_end)):
            real_in(name, v, 0.0, lo_open=True)
        nonneg_int("anneal_steps", anneal_steps)
        one_of("schedule", schedule, ("constant", "linear", "exponential"))
        if activation is not None and activation not in GATE_ACTIVATIONS:
            raise ValueError(f"activation must be None or one of {sorted(GATE_ACTIVATIONS)}, got {activation!r}")
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.anneal_steps, self.schedule = anneal_steps, schedule
        self.threshold = real_in("threshold", threshold, 0.0, 1.0, hi_open=True)
        self.renormalize = boolean("renormalize", renormalize)
        self.noise = boolean("noise", noise)
        self.activation = activation
        self.linear = nn.Linear(d_model, n_experts)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def temperature(self) -> float:
        """tau at the current ``step``."""
        return annealed_temperature(int(self.step), self.tau_start, self.tau_end, self.anneal_steps, self.schedule)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = F.linear(x_TD.float(), self.linear.weight.float(), self.linear.bias.float())
        h_TE = logits_TE if self.activation is None else GATE_ACTIVATIONS[self.activation](logits_TE)
        if self.training and self.noise:
            h_TE = h_TE + gumbel_noise(h_TE)
        probs_TE = torch.softmax(h_TE / self.temperature, dim=-1)
        if self.training and torch.is_grad_enabled():
            self.step += 1
        if self.threshold == 0:
            return routing_from_dense(probs_TE, probs=probs_TE, logits=logits_TE)
        keep_TE = probs_TE >= self.threshold
        keep_TE.scatter_(-1, probs_TE.argmax(-1, keepdim=True), True)
        weights_TE = probs_TE * keep_TE
        if self.renormalize:
            weights_TE = weights_TE / weights_TE.sum(-1, keepdim=True)
        return routing_from_dense(weights_TE, keep_TE, probs=probs_TE, logits=logits_TE)

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau_start}->{self.tau_end} ({self.schedule}, {self.anneal_steps} steps), "
            f"threshold={self.threshold}, activation={self.activation}"
        )
