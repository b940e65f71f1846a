"""Expert-choice routing: each expert picks its top-C tokens."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gatedmoe.gates.base import Gate
from gatedmoe.gates.functional import expert_choice
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import real_in

__all__ = ["ExpertChoiceGate"]


@register("expert_choice")
class ExpertChoiceGate(Gate):
    """Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
    Routing", eq. 1).

    Formula: ``S = softmax(X W^T)`` over experts, ``[T, E]``; expert e takes the
    ``C = ceil(capacity_factor * T / E)`` tokens of largest ``S[:, e]`` (``C`` capped at T),
    each with weight ``S[t, e]``. A token may get 0 or several experts.

    Perfect load balance by construction (every expert takes C tokens), sparse,
    selection not differentiable (weights are). Note that the choice looks at the whole
    batch: in causal language models a token's routing depends on later tokens. ``k`` is
    not used; ``capacity_factor`` (the paper's c, default 2) sets the average experts per
    token.

    Examples
    --------
    >>> import torch
    >>> g = ExpertChoiceGate(8, 4, capacity_factor=2.0)
    >>> g(torch.randn(6, 8)).counts.tolist()
    [3, 3, 3, 3]
    """

    uses_k = False

    def __init__(self, d_model: int, n_experts: int, *, capacity_factor: float = 2.0) -> None:
        super().__init__(d_model, n_experts)
        self.capacity_factor = real_in("capacity_factor", capacity_factor, 0.0, lo_open=True)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def capacity(self, n_tokens: int) -> int:
        """C = ``min(T, ceil(capacity_factor * T / E))`` (at least 1 when T > 0)."""
        return min(n_tokens, max(1, math.ceil(self.capacity_factor * n_tokens / self.n_experts)))

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.router_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        T, E = probs_TE.shape
        C = self.capacity(T)
        tokens_EC, weights_EC = expert_choice(probs_TE, C)
        experts_EC = torch.arange(E, device=x_TD.device).unsqueeze(1).expand(E, C)
        return Routing.from_assignments(
            tokens_EC.reshape(-1),
            experts_EC.reshape(-1),
            weights_EC.reshape(-1),
            n_experts=E,
            n_tokens=T,
            probs=probs_TE,
            logits=logits_TE,
        )

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}"
