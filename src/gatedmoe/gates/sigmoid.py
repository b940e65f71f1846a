"""DeepSeek-V3 sigmoid gate with auxiliary-loss-free bias balancing."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gatedmoe.gates.base import Gate, check_k
from gatedmoe.gates.functional import sigmoid_topk
from gatedmoe.gates.fused_topk import fused_topk, fused_topk_applies
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import boolean, real_in

__all__ = ["SigmoidGate"]


@register("sigmoid")
class SigmoidGate(Gate):
    """Sigmoid gate of DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report",
    eqs. 13-16) with the bias balancing of Wang et al. 2024.

    Formula: ``s_e = sigmoid(u . e_e)``; select the top k of ``s_e + b_e``; weight
    ``g_e = scale * s_e / sum_{j kept} s_j`` (``normalize=True``) or ``scale * s_e``.
    Default ``normalize`` is True for k > 1 and False for k = 1, as `TopKSoftmaxGate`'s
    ``renormalize`` (normalising a single expert would fix its weight at ``scale`` and cut
    the router's gradient from the task loss); an explicit value is used as given.
    With ``bias_update_rate > 0`` the selection bias b is updated after each training
    forward by ``b_e <- b_e + u * sign(mean(c) - c_e)`` (see `BiasBalancer`).
    ``Routing.probs`` holds ``s / sum_j s_j`` so the usual balance losses apply. On CUDA
    the route runs in the fused kernels of `gatedmoe.gates.fused_topk`.

    Sparse; selection not differentiable (weights are); balancing by bias, optionally
    by auxiliary losses too.

    Examples
    --------
    >>> import torch
    >>> g = SigmoidGate(8, 4, k=2, bias_update_rate=1e-3)
    >>> g(torch.randn(5, 8)).n_assignments
    10
    """

    token_choice = True

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        k: int = 2,
        normalize: bool | None = None,
        scale: float = 1.0,
        bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__(d_model, n_experts)
        self.k = check_k(k, n_experts)
        # The effective flag, read by the plain and the fused path alike.
        self.normalize = (k > 1) if normalize is None else boolean("normalize", normalize)
        self.scale = real_in("scale", scale, 0.0, lo_open=True)
        bias_update_rate = real_in("bias_update_rate", bias_update_rate, 0.0)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)
        if bias_update_rate > 0:
            self.attach_bias_balancer(bias_update_rate)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.router_logits(x_TD)
        if fused_topk_applies(logits_TE, self.k):
            routing = fused_topk(logits_TE, self.k, score="sigmoid", normalize=self.normalize,
                                 bias_E=self.selection_bias(), scale=self.scale)
            self.update_bias_balancer(routing.counts)
            return routing
        weights_TK, experts_TK, scores_TE = sigmoid_topk(
            logits_TE, self.k, self.selection_bias(), self.normalize, self.scale
        )
        routing = Routing.from_topk(
            weights_TK,
            experts_TK,
            self.n_experts,
            probs=scores_TE / scores_TE.sum(-1, keepdim=True),
            logits=logits_TE,
            trusted_ids=True,
        )
        self.update_bias_balancer(routing.counts)
        return routing
