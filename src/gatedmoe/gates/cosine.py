"""Cosine router of X-MoE: cosine similarity on a low-dimensional projection, learned temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.gates.base import Gate, check_k
from gatedmoe.gates.functional import topk_softmax
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import boolean, positive_int, real_in

__all__ = ["CosineGate"]


@register("cosine")
class CosineGate(Gate):
    """Cosine routing (Chi et al. 2022, "On the Representation Collapse of Sparse Mixture
    of Experts" (X-MoE), eq. 4-5).

    Formula: ``s_e = cos(P x, e_e) / tau = (P x) . e_e / (||P x|| ||e_e|| tau)`` with a
    projection ``P: D -> d_proj`` (low-dimensional, X-MoE uses 16), expert embeddings
    ``e_e`` in ``R^{d_proj}`` (orthogonal init, gain 0.32) and a learned temperature tau
    (stored as ``log(1/tau)``, clamped so tau >= 0.01 as in Tutel's cosine gate);
    then top-k softmax of s as `TopKSoftmaxGate` (renormalised for k > 1).

    Sparse, selection not differentiable (weights are), balancing by auxiliary losses or
    a selection bias (`attach_bias_balancer`).

    Examples
    --------
    >>> import torch
    >>> g = CosineGate(8, 4, k=1)
    >>> g(torch.randn(5, 8)).n_assignments
    5
    """

    token_choice = True

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        k: int = 2,
        d_proj: int = 16,
        init_temperature: float = 0.07,
        renormalize: bool | None = None,
    ) -> None:
        super().__init__(d_model, n_experts)
        self.k = check_k(k, n_experts)
        positive_int("d_proj", d_proj)
        init_temperature = real_in("init_temperature", init_temperature, 0.01)
        self.renormalize = (k > 1) if renormalize is None else boolean("renormalize", renormalize)
        self.proj = nn.Linear(d_model, d_proj, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(n_experts, d_proj))
        nn.init.orthogonal_(self.expert_embeddings, gain=0.32)
        self.log_inv_temperature = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def temperature(self) -> Tensor:
        """tau = 1 / exp(clamp(log_inv_temperature, max=log 100))."""
        return 1.0 / self.log_inv_temperature.clamp(max=math.log(100.0)).exp()

    def router_logits(self, x_TD: Tensor) -> Tensor:
        h_TP = F.normalize(F.linear(x_TD.float(), self.proj.weight.float()), dim=-1)
        emb_EP = F.normalize(self.expert_embeddings.float(), dim=-1)
        scale = self.log_inv_temperature.float().clamp(max=math.log(100.0)).exp()
        return (h_TP @ emb_EP.t()) * scale

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.router_logits(x_TD)
        weights_TK, experts_TK, probs_TE = topk_softmax(logits_TE, self.k, self.renormalize, self.selection_bias())
        routing = Routing.from_topk(weights_TK, experts_TK, self.n_experts, probs=probs_TE, logits=logits_TE,
                                     trusted_ids=True)
        self.update_bias_balancer(routing.counts)
        return routing

    def extra_repr(self) -> str:
        return f"k={self.k}, d_proj={self.proj.out_features}"
