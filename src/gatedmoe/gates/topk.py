"""Top-k softmax gate, with the optional noisy top-k of Shazeer et al. 2017."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.gates.base import Gate, check_k
from gatedmoe.gates.functional import topk_softmax
from gatedmoe.gates.fused_topk import fused_topk, fused_topk_applies
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import boolean, real_in

__all__ = ["TopKSoftmaxGate", "cv_squared", "noisy_topk_load"]


def cv_squared(v_E: Tensor) -> Tensor:
    """Squared coefficient of variation ``Var(v) / Mean(v)^2`` (0 for fewer than 2 values)."""
    v = v_E.float()
    if v.numel() < 2:
        return v.new_zeros(())
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)


def noisy_topk_load(clean_TE: Tensor, noisy_TE: Tensor, noise_std_TE: Tensor, k: int) -> Tensor:
    """Smooth load estimator of Shazeer et al. 2017 (Appendix A), ``[E]``.

    ``P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i)``: the probability
    that expert i stays in the top k under a fresh draw of its own noise, all other noisy
    scores held fixed. The threshold is the k-th largest noisy score among the others: the
    (k+1)-th largest of H when i is in the top k, else the k-th. ``Load_i = sum_x P(x, i)``.
    With ``k == E`` there is no (k+1)-th score: every expert is always chosen, so
    ``P(x, i) = 1`` exactly, with zero gradient.
    """
    E = noisy_TE.shape[-1]
    top_vals = torch.topk(noisy_TE, min(k + 1, E), dim=-1).values
    kth = top_vals[:, k - 1 : k]
    kplus1 = top_vals[:, k : k + 1] if k < E else torch.full_like(kth, -float("inf"))
    in_top = noisy_TE >= kth
    threshold = torch.where(in_top, kplus1, kth)
    # A threshold of -inf (k == E) means always chosen. Phi(+inf) is 1, but its backward
    # is Phi'(inf) * d(inf) = 0 * inf = NaN, so such entries take a finite stand-in
    # threshold and the value 1 is put in by the where, whose backward sends them zeros.
    unbeatable = threshold == -float("inf")
    threshold = threshold.masked_fill(unbeatable, 0.0)
    normal = torch.distributions.Normal(0.0, 1.0)
    p_TE = normal.cdf((clean_TE - threshold) / noise_std_TE)
    return torch.where(unbeatable, torch.ones_like(p_TE), p_TE).sum(0)


@register("topk_softmax")
class TopKSoftmaxGate(Gate):
    """Softmax then top-k (Shazeer et al. 2017, "Outrageously Large Neural Networks";
    GShard; Mixtral).

    Formula: ``p = softmax(W x)``; keep the k largest ``p_e``; weight
    ``p_e / sum_{j in topk} p_j`` with ``renormalize`` (equal to softmax over the kept
    logits), else ``p_e``. Default ``renormalize`` is True for k > 1 and False for k = 1
    (renormalising a single expert would fix its weight at 1 and cut the router's gradient).

    With ``noisy=True`` (training only), Shazeer et al.'s noisy top-k:
    ``H(x)_i = (W x)_i + eps_i * softplus((W_noise x)_i)``, ``eps ~ N(0, 1)``; selection and
    softmax use H. Its losses are left in ``gate_losses``:
    ``importance = w_importance * CV(sum_x G(x))^2`` and
    ``load = w_load * CV(sum_x P(x, .))^2`` (see `noisy_topk_load`).

    Sparse, selection not differentiable (weights are), balancing by auxiliary losses, or
    without them by a selection bias on ``p`` (`Gate.attach_bias_balancer`). On CUDA the
    route runs in the fused kernels of `gatedmoe.gates.fused_topk` (same routing; noisy
    top-k in training excepted).

    Examples
    --------
    >>> import torch
    >>> g = TopKSoftmaxGate(8, 4, k=2)
    >>> g(torch.randn(5, 8)).counts.sum().item()
    10
    """

    token_choice = True

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        k: int = 2,
        renormalize: bool | None = None,
        noisy: bool = False,
        w_importance: float = 0.01,
        w_load: float = 0.01,
    ) -> None:
        super().__init__(d_model, n_experts)
        self.k = check_k(k, n_experts)
        self.renormalize = (k > 1) if renormalize is None else boolean("renormalize", renormalize)
        self.noisy = boolean("noisy", noisy)
        self.w_importance = real_in("w_importance", w_importance, 0.0)
        self.w_load = real_in("w_load", w_load, 0.0)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)
        if self.noisy:
            # Zero init: the noise starts at softplus(0) = 0.69 and is learned from there.
            self.noise_weight = nn.Parameter(torch.zeros(n_experts, d_model))

    def forward(self, x_TD: Tensor) -> Routing:
        clean_TE = self.router_logits(x_TD)
        self._set_transient("gate_losses", {})
        bias_E = self.selection_bias()
        if not (self.noisy and self.training):
            if fused_topk_applies(clean_TE, self.k):
                routing = fused_topk(clean_TE, self.k, normalize=self.renormalize, bias_E=bias_E)
            else:
                weights_TK, experts_TK, probs_TE = topk_softmax(clean_TE, self.k, self.renormalize, bias_E)
                routing = Routing.from_topk(weights_TK, experts_TK, self.n_experts, probs=probs_TE, logits=clean_TE,
                                             trusted_ids=True)
            self.update_bias_balancer(routing.counts)
            return routing
        noise_std_TE = F.softplus(F.linear(x_TD.float(), self.noise_weight.float())) + 1e-2
        noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
        weights_TK, experts_TK, probs_TE = topk_softmax(noisy_TE, self.k, self.renormalize, bias_E)
        gates_TE = torch.zeros_like(probs_TE).scatter(-1, experts_TK, weights_TK)
        load_E = noisy_topk_load(clean_TE, noisy_TE, noise_std_TE, self.k)
        self.gate_losses = {
            "importance": self.w_importance * cv_squared(gates_TE.sum(0)),
            "load": self.w_load * cv_squared(load_E),
        }
        routing = Routing.from_topk(weights_TK, experts_TK, self.n_experts, probs=probs_TE, logits=noisy_TE,
                                     trusted_ids=True)
        self.update_bias_balancer(routing.counts)
        return routing
