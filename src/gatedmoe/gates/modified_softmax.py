"""Modified softmax gate: softmax over a linear gate applied to a transformed input M(x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.gates.base import Gate, routing_from_dense
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import one_of

__all__ = ["ModifiedSoftmaxGate"]

_TRANSFORMS = ("tanh", "l2norm", "layernorm", "learned")


@register("modified_softmax")
class ModifiedSoftmaxGate(Gate):
    """Modified softmax gating (Nguyen, Akbarian, Nguyen & Ho 2024, "A General Theory for
    Softmax Gating Multinomial Logistic Mixture of Experts", sec. 4).

    Formula: ``g_e(x) = softmax_e(beta_e . M(x) + beta_0e)`` where the input is first
    transformed by ``M``: ``"tanh"`` ``M(x) = tanh(x)`` (elementwise, bounded),
    ``"l2norm"`` ``M(x) = x / ||x||``, ``"layernorm"`` ``M(x) = (x - mean x) / std x`` (no
    affine), or ``"learned"`` ``M(x) = tanh(A x + c)`` with a trainable ``A [D, D]``.
    The paper shows that such M (when M is not a polynomial map of a linear one) restores
    fast parameter-estimation rates that the plain softmax gate loses with linear experts.

    Dense by default (every expert, ``k=None``); with ``k`` the top-k of g are kept and
    renormalised (for k > 1). Differentiable; no balancing of its own.

    Examples
    --------
    >>> import torch
    >>> g = ModifiedSoftmaxGate(8, 3, transform="tanh")
    >>> g(torch.randn(5, 8)).n_assignments
    15
    """

    uses_k = False

    def __init__(self, d_model: int, n_experts: int, *, transform: str = "tanh", k: int | None = None) -> None:
        super().__init__(d_model, n_experts)
        one_of("transform", transform, _TRANSFORMS)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_experts):
            raise ValueError(f"k must be None or an int in [1, n_experts={n_experts}], got {k!r}")
        self.transform, self.k = transform, k
        self.linear = nn.Linear(d_model, n_experts)
        self.input_map = nn.Linear(d_model, d_model) if transform == "learned" else None

    def transformed(self, x_TD: Tensor) -> Tensor:
        """M(x) in float32, ``[T, D]``."""
        x = x_TD.float()
        if self.transform == "tanh":
            return torch.tanh(x)
        if self.transform == "l2norm":
            return F.normalize(x, dim=-1)
        if self.transform == "layernorm":
            return F.layer_norm(x, (x.shape[-1],))
        return torch.tanh(F.linear(x, self.input_map.weight.float(), self.input_map.bias.float()))

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = F.linear(self.transformed(x_TD), self.linear.weight.float(), self.linear.bias.float())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.k is None:
            return routing_from_dense(probs_TE, probs=probs_TE, logits=logits_TE)
        weights_TK, experts_TK = torch.topk(probs_TE, self.k, dim=-1)
        if self.k > 1:
            # Renormalising a single expert would fix its weight at 1 and cut the gradient.
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return Routing.from_topk(weights_TK, experts_TK, self.n_experts, probs=probs_TE, logits=logits_TE)

    def extra_repr(self) -> str:
        return f"transform={self.transform!r}, k={self.k}"
