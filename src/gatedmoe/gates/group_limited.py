"""DeepSeek-V3 group-limited (node-limited) sigmoid routing with a routed scaling factor."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gatedmoe.gates.balancing import BiasBalancer
from gatedmoe.gates.base import Gate, check_k
from gatedmoe.gates.functional import check_mask_value, group_limited_topk
from gatedmoe.gates.fused_topk import fused_topk, fused_topk_applies
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import boolean, real_in

__all__ = ["GroupLimitedGate"]


@register("group_limited")
class GroupLimitedGate(Gate):
    """Group-limited top-k of DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3 Technical
    Report", sec. 2.1.2 and 2.3; DeepSeek-V2 sec. 2.2.3 "device-limited routing"), with the
    semantics of Hugging Face ``DeepseekV3TopkRouter``.

    Formula, for logits ``l = W x`` (float32):

    * ``s_e = sigmoid(l_e)``, selection score ``c_e = s_e + b_e`` (``b`` is the
      ``e_score_correction_bias``, a buffer updated without gradients);
    * experts form ``n_group`` contiguous groups; group score = sum of the group's two
      largest ``c_e``; keep the ``topk_group`` best groups, set ``c_e = mask_value``
      elsewhere;
    * select the k largest ``c_e``; weight ``g_e = rsf * s_e / (sum_{j kept} s_j + 1e-20)``
      with ``normalize`` (HF ``norm_topk_prob``), else ``rsf * s_e``; ``rsf`` is
      ``routed_scaling_factor``.

    ``Routing.probs`` holds ``s / sum_j s_j`` so the usual balance losses apply. On CUDA
    the route runs in the fused kernels of `gatedmoe.gates.fused_topk` (the normaliser there
    is ``max(sum, 1e-20)``, equal to ``sum + 1e-20`` in float32 unless the kept scores sum
    below 1e-13; the weights agree with torch's ops to float32 rounding, not bit for bit),
    unless ``fused=False``.
    Sparse; selection not differentiable (weights are); balancing by the bias (updated
    when ``bias_update_rate > 0``, Wang et al. 2024), optionally auxiliary losses too.

    Parameters
    ----------
    d_model, n_experts : int
        D and E; ``n_group`` must divide E.
    k : int
        Experts per token (HF ``num_experts_per_tok``), ``k <= topk_group * E / n_group``.
    n_group, topk_group : int
        Number of groups and groups kept per token (default 1 and 1: plain sigmoid top-k).
    normalize : bool, optional
        HF ``norm_topk_prob``. Default (None): True for k > 1, False for k = 1, as
        `TopKSoftmaxGate`'s ``renormalize`` (normalising a single expert would fix its
        weight at ``routed_scaling_factor`` and cut the router's gradient from the task
        loss); an explicit value is used as given (the HF converter passes the model's).
    routed_scaling_factor : float
        Multiplies the kept weights (default 1.0; DeepSeek-V3 uses 2.5).
    mask_value : float
        Selection score of the experts outside the kept groups: -inf (default; transformers
        >= 5.23, DeepSeek's inference code, torchtitan) or 0.0 (transformers 4.x and
        DeepSeek's remote code). The two differ only when a kept expert's ``s_e + b_e`` is
        negative.
    bias_update_rate : float
        Step of the sign update of the selection bias (default 0: the bias is kept fixed,
        e.g. as loaded from a checkpoint).
    fused : bool
        Route in the fused kernels where they apply (default True); False keeps torch's ops,
        bit-identical to Hugging Face's router (`patch_model(..., backend="grouped")`).

    The bias lives in ``balancer.bias`` (also readable as ``e_score_correction_bias``).

    Examples
    --------
    >>> import torch
    >>> g = GroupLimitedGate(8, 8, k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    >>> g(torch.randn(5, 8)).n_assignments
    10
    """

    token_choice = True
    # A gate pickled before ``fused`` existed routes as it did then.
    fused: bool = True

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        k: int = 2,
        n_group: int = 1,
        topk_group: int = 1,
        normalize: bool | None = None,
        routed_scaling_factor: float = 1.0,
        mask_value: float = float("-inf"),
        bias_update_rate: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__(d_model, n_experts)
        self.k = check_k(k, n_experts)
        self.fused = boolean("fused", fused)
        for name, v in (("n_group", n_group), ("topk_group", topk_group)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if n_group < 1 or n_experts % n_group:
            raise ValueError(f"n_group must be >= 1 and divide n_experts={n_experts}, got {n_group}")
        if n_group > 1 and n_experts // n_group < 2:
            raise ValueError(f"n_group={n_group} leaves fewer than 2 experts per group (E={n_experts})")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must satisfy 1 <= topk_group <= n_group={n_group}, got {topk_group}")
        if k > topk_group * (n_experts // n_group):
            raise ValueError(
                f"k={k} exceeds the experts in the kept groups, topk_group * E / n_group = "
                f"{topk_group * (n_experts // n_group)}"
            )
        self.n_group, self.topk_group = n_group, topk_group
        # The effective flag, read by the plain and the fused path alike.
        self.normalize = (k > 1) if normalize is None else boolean("normalize", normalize)
        self.routed_scaling_factor = real_in("routed_scaling_factor", routed_scaling_factor, 0.0, lo_open=True)
        self.mask_value = check_mask_value(mask_value)
        bias_update_rate = real_in("bias_update_rate", bias_update_rate, 0.0)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)
        # Always present (HF checkpoints carry e_score_correction_bias); updated only if rate > 0.
        self.balancer = BiasBalancer(n_experts, bias_update_rate)

    @property
    def e_score_correction_bias(self) -> Tensor:
        """The selection bias ``[E]`` under its Hugging Face name."""
        return self.balancer.bias

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.router_logits(x_TD)
        if self.fused and fused_topk_applies(logits_TE, self.k, self.n_group):
            routing = fused_topk(
                logits_TE, self.k, score="sigmoid", normalize=self.normalize, bias_E=self.balancer.bias,
                scale=self.routed_scaling_factor, n_group=self.n_group, topk_group=self.topk_group,
                mask_value=self.mask_value,
            )
            if self.balancer.update_rate > 0:
                self.update_bias_balancer(routing.counts)
            return routing
        weights_TK, experts_TK, scores_TE = group_limited_topk(
            logits_TE,
            self.k,
            self.n_group,
            self.topk_group,
            self.balancer.bias,
            self.normalize,
            self.routed_scaling_factor,
            self.mask_value,
        )
        routing = Routing.from_topk(
            weights_TK,
            experts_TK,
            self.n_experts,
            probs=scores_TE / scores_TE.sum(-1, keepdim=True),
            logits=logits_TE,
            trusted_ids=True,
        )
        if self.balancer.update_rate > 0:
            self.update_bias_balancer(routing.counts)
        return routing

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, n_group={self.n_group}, topk_group={self.topk_group}, "
            f"normalize={self.normalize}, routed_scaling_factor={self.routed_scaling_factor}, "
            f"mask_value={self.mask_value}" + ("" if self.fused else ", fused=False")
        )
