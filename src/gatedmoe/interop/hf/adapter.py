"""`HFMoEBlock`: gatedmoe's `MoE` behind the call convention of a Hugging Face MoE block,
and the few pieces Hugging Face models need that the core layer does not have.

Everything here imports torch and gatedmoe only; transformers is never imported, so the
converters work on whatever blocks the caller hands in.

Shape legend: T tokens, D model dim, H expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from gatedmoe.dispatch import get_backend
from gatedmoe.gates.base import Gate
from gatedmoe.gates.fused_topk import fused_topk, fused_topk_applies
from gatedmoe.gates.sigmoid import SigmoidGate
from gatedmoe.gates.topk import TopKSoftmaxGate
from gatedmoe.layers.moe import MoE
from gatedmoe.routing import Routing
from gatedmoe.validation import boolean

__all__ = [
    "HFMoEBlock",
    "HFTopKSoftmaxGate",
    "HFSigmoidTopKGate",
    "HFRouterGate",
    "HFSwitchRouterGate",
    "HFLpNormRouterGate",
    "HFJetMoeRouterGate",
    "HFSharedGammaRouterGate",
    "HFProductKeyGate",
    "HFStatefulRouterGate",
    "HFOutputBias",
    "HFRoutedScaleMoE",
    "HFProjectedExpertsMoE",
    "HFSharedExperts",
    "router_tap",
]


class HFTopKSoftmaxGate(TopKSoftmaxGate):
    """`TopKSoftmaxGate` computed as Hugging Face's softmax top-k routers compute it, down to
    the dtypes and the order of operations, so a converted bf16 model is bit-identical.

    Formula as `TopKSoftmaxGate` (Mixtral, Qwen-MoE, OLMoE): ``p = softmax(l)``, keep the
    k largest, weight ``p_e / sum_{j in topk} p_j`` with ``renormalize``. The logits
    ``l = x W^T (+ b)`` are computed in the *input's* dtype, as ``F.linear(hidden_states,
    weight)`` in transformers, so in bf16 the same experts are chosen.

    With ``softmax_over="all"`` on CUDA (float32 logits within `fused_topk_applies`'s limits,
    not while torch.compile traces), softmax, top-k, renormalisation and the sort by expert run
    in the fused kernels of `gatedmoe.gates.fused_topk`, the library gate's path (one routing
    kernel and the counting sort instead of torch's softmax, top-k, renormalisation and
    `Routing.from_topk`'s sort): the same experts, exact ties included (the kernels give a
    tie to the lowest expert id, as CUDA's `torch.topk` does), weights in the same dtype;
    weights and ``probs`` (and ``lse``, which only this path fills) agree with torch's to
    float32 rounding, not bit for bit, so a bf16 model's outputs can differ from
    transformers' in the last bit. ``fused=False`` keeps
    torch's ops on CUDA too, bit-identical to transformers there as well.

    Parameters
    ----------
    d_model, n_experts, k, renormalize
        As `TopKSoftmaxGate`.
    bias : bool
        A router bias ``[E]`` (GPT-OSS).
    softmax_over : {"all", "topk"}
        "all" (default): softmax of all logits in float32, then top-k (Mixtral, Qwen,
        OLMoE). "topk": top-k of the logits, then softmax of the kept ones in the logits'
        dtype (GPT-OSS's ``GptOssTopKRouter``; the same routing as "all" with renormalize).
        "topk" always takes torch's ops: the fused kernels select on float32 softmax scores
        and weigh in float32, not on and in the logits' dtype.
    weights_dtype : {"float32", "input"}
        Dtype the original router returns its weights in: float32 (Mixtral) or the input's
        (Qwen-MoE, OLMoE: ``.to(router_logits.dtype)``); the weights are rounded to it.
    fused : bool
        Route in the fused kernels where they apply (default True), see above.

    Examples
    --------
    >>> import torch
    >>> g = HFTopKSoftmaxGate(8, 4, k=2, renormalize=True, bias=True)
    >>> g(torch.randn(5, 8)).n_assignments
    10
    """

    # A gate pickled before ``fused`` existed routes as it did then: in torch's ops.
    fused: bool = False

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        k: int,
        renormalize: bool,
        bias: bool = False,
        softmax_over: str = "all",
        weights_dtype: str = "float32",
        fused: bool = True,
    ) -> None:
        super().__init__(d_model, n_experts, k=k, renormalize=renormalize)
        if softmax_over not in ("all", "topk"):
            raise ValueError(f"softmax_over must be 'all' or 'topk', got {softmax_over!r}")
        if weights_dtype not in ("float32", "input"):
            raise ValueError(f"weights_dtype must be 'float32' or 'input', got {weights_dtype!r}")
        if softmax_over == "topk" and not self.renormalize:
            raise ValueError("softmax_over='topk' is the renormalised routing; pass renormalize=True")
        self.softmax_over, self.weights_dtype = softmax_over, weights_dtype
        self.fused = boolean("fused", fused)
        self.bias = nn.Parameter(torch.zeros(n_experts)) if bias else None

    def _logits_in_input_dtype(self, x_TD: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x_TD.dtype)
        return F.linear(x_TD, self.weight.to(x_TD.dtype), b)

    def router_logits(self, x_TD: Tensor) -> Tensor:
        return self._logits_in_input_dtype(x_TD).float()

    def forward(self, x_TD: Tensor) -> Routing:
        if self.noisy or self.balancer is not None:
            return super().forward(x_TD)
        logits = self._logits_in_input_dtype(x_TD)
        logits_TE = logits.float()
        self._set_transient("gate_losses", {})
        if self.fused and self.softmax_over == "all" and fused_topk_applies(logits_TE, self.k):
            # The router bias is in the logits already: no selection bias.
            # Rounded as the kernels store them (rounding commutes with the sort's
            # permutation): the plain path's weights, without a cast's launch.
            weight_dtype = x_TD.dtype if self.weights_dtype == "input" else torch.float32
            return fused_topk(logits_TE, self.k, normalize=self.renormalize, weight_dtype=weight_dtype)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.softmax_over == "topk":
            top_TK, experts_TK = torch.topk(logits, self.k, dim=-1)
            weights_TK = torch.softmax(top_TK, dim=-1, dtype=top_TK.dtype)
        else:
            weights_TK, experts_TK = torch.topk(probs_TE, self.k, dim=-1)
            if self.renormalize:
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        if self.weights_dtype == "input":
            weights_TK = weights_TK.to(x_TD.dtype)
        return Routing.from_topk(weights_TK, experts_TK, self.n_experts, probs=probs_TE, logits=logits_TE,
                                 trusted_ids=True)

    def extra_repr(self) -> str:
        fused = "" if self.fused else ", fused=False"
        return f"k={self.k}, softmax_over={self.softmax_over!r}, weights_dtype={self.weights_dtype!r}{fused}"


class HFSigmoidTopKGate(SigmoidGate):
    """`SigmoidGate` without normalisation, computed as Llama 4's ``Llama4Router`` computes it
    (Meta 2025, transformers ``models/llama4/modeling_llama4.py``).

    Formula: logits ``l = x W^T`` in the input's dtype; keep the k largest logits; weight
    ``g_e = sigmoid(l_e)`` computed in float32 and rounded to the input's dtype (the other
    experts get ``sigmoid(-inf) = 0``). The same routing as ``SigmoidGate(normalize=False,
    scale=1)``; the dtypes follow the original so a bf16 model picks and weighs alike.

    Examples
    --------
    >>> import torch
    >>> HFSigmoidTopKGate(8, 4, k=1)(torch.randn(5, 8)).n_assignments
    5
    """

    def __init__(self, d_model: int, n_experts: int, *, k: int) -> None:
        super().__init__(d_model, n_experts, k=k, normalize=False)

    def forward(self, x_TD: Tensor) -> Routing:
        if self.balancer is not None:
            return super().forward(x_TD)
        logits = F.linear(x_TD, self.weight.to(x_TD.dtype))
        top_TK, experts_TK = torch.topk(logits, self.k, dim=-1)
        weights_TK = torch.sigmoid(top_TK.float()).to(logits.dtype)
        logits_TE = logits.float()
        scores_TE = torch.sigmoid(logits_TE)
        self._set_transient("gate_losses", {})
        return Routing.from_topk(
            weights_TK, experts_TK, self.n_experts, probs=scores_TE / scores_TE.sum(-1, keepdim=True), logits=logits_TE,
            trusted_ids=True,
        )


class HFRouterGate(Gate):
    """A gate that runs a Hugging Face router module as it is: its ``forward`` returns
    ``(router_logits, weights [T, K], experts [T, K])`` (the ``*TopKRouter`` convention of
    transformers >= 5), which become a `Routing` unchanged (weights keep the router's dtype).

    Used for the families whose routing rule gatedmoe takes from transformers rather than
    from its gate zoo (sigmoid, group-limited, SparseMixer, expert-bias and capacity-free
    variants): selection and weights are the original's by construction, bit for bit, and
    transformers' ``output_router_logits`` hooks keep seeing an instance of the router
    class. ``router_args`` are names of attributes of the *block* passed to the router
    after the hidden states (e.g. LFM2-MoE's ``expert_bias``); their tensors live here as
    buffers (or parameters) of the same name. ``batched_input`` hands the router the tokens
    as ``[1, T, D]`` (routers that unpack a ``[B, S, D]`` input). ``token_ids``: the router
    also takes the input token ids ``[T]``, last (DeepSeek-V4's hash routers, whose
    ``tid2eid`` table picks the experts); the layer passes them (``uses_token_ids``).

    Examples
    --------
    >>> import torch
    >>> class Top1(torch.nn.Module):
    ...     weight = torch.nn.Parameter(torch.randn(4, 8))
    ...     def forward(self, x):
    ...         l = x @ self.weight.T
    ...         w, i = l.softmax(-1).topk(1)
    ...         return l, w, i
    >>> HFRouterGate(Top1(), d_model=8, n_experts=4, k=1)(torch.randn(5, 8)).n_assignments
    5
    """

    registry_name = "hf_router"
    token_choice = True

    def __init__(
        self,
        router: nn.Module,
        *,
        d_model: int,
        n_experts: int,
        k: int,
        router_args: dict | None = None,
        batched_input: bool = False,
        token_ids: bool = False,
    ) -> None:
        super().__init__(d_model, n_experts)
        self.router = router
        self.k = int(k)
        self.uses_token_ids = bool(token_ids)
        # Routers that unpack ``[B, S, D]`` get the tokens as one sequence ``[1, T, D]``.
        self.batched_input = bool(batched_input)
        self.router_args = tuple(router_args or {})
        for name, t in (router_args or {}).items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            else:
                self.register_buffer(name, t)

    def attach_bias_balancer(self, update_rate: float = 1e-3) -> Gate:
        raise ValueError("HFRouterGate runs the original router; it takes no selection bias of gatedmoe")

    def forward(self, x_TD: Tensor, token_ids: Tensor | None = None) -> Routing:
        args = [getattr(self, n) for n in self.router_args]
        if self.uses_token_ids:
            if token_ids is None:
                raise ValueError(f"{type(self.router).__name__} routes by token id: pass the input ids")
            args.append(token_ids)
        logits_TE, weights_TK, experts_TK = self.router(x_TD.unsqueeze(0) if self.batched_input else x_TD, *args)
        return Routing.from_topk(weights_TK, experts_TK, self.n_experts, logits=logits_TE.reshape(-1, logits_TE.shape[-1]))

    def extra_repr(self) -> str:
        return f"k={self.k}, router_args={self.router_args}, token_ids={self.uses_token_ids}"


class HFSwitchRouterGate(HFRouterGate):
    """Switch Transformers' top-1 router with per-sequence expert capacity, run as it is
    (Fedus, Zoph & Shazeer 2021, "Switch Transformers", arXiv:2101.03961; transformers
    ``models/switch_transformers/modeling_switch_transformers.py``,
    ``SwitchTransformersTop1Router``).

    Formula (per sequence b of S tokens, router in ``router_dtype``, float32 by default):
    ``p_t = softmax(x_t W^T (+ b))``, ``e_t = argmax_e p_t``; token t is kept iff
    ``#{s <= t in b : e_s = e_t} <= expert_capacity`` (earlier tokens first, capacity an
    integer per expert *and per sequence*, not gatedmoe's ``ceil(capacity_factor T K / E)``
    over the whole batch); a kept token's weight is ``max_e p_t`` in the input's dtype
    (not renormalised); a dropped token gets no expert (its block output is 0). Runs the
    router module itself on ``[B, S, D]``, so choices, weights, jitter and dtypes are the
    original's and transformers' ``router_logits`` recording still sees the router.
    ``seq_len`` (set by `HFMoEBlock` for each call) splits the ``T`` tokens into sequences;
    None routes them as one sequence.

    Examples
    --------
    >>> import torch
    >>> class Top1(torch.nn.Module):
    ...     expert_capacity = 1
    ...     weight = torch.nn.Parameter(torch.zeros(2, 4))
    ...     def forward(self, x):
    ...         logits = x @ self.weight.T
    ...         p = logits.softmax(-1)
    ...         one_hot = torch.nn.functional.one_hot(p.argmax(-1), 2)
    ...         keep = one_hot.cumsum(-2) <= self.expert_capacity
    ...         return one_hot * keep, p.max(-1).values.unsqueeze(-1), logits
    >>> r = HFSwitchRouterGate(Top1(), d_model=4, n_experts=2)(torch.randn(3, 4))
    >>> r.n_assignments, r.n_dropped  # all three tokens pick expert 0, one slot
    (1, 2)
    """

    def __init__(self, router: nn.Module, *, d_model: int, n_experts: int) -> None:
        super().__init__(router, d_model=d_model, n_experts=n_experts, k=1)
        self.seq_len: int | None = None

    def forward(self, x_TD: Tensor) -> Routing:
        T, D = x_TD.shape
        S = T if self.seq_len is None else int(self.seq_len)
        mask_BSE, probs_BS1, logits_BSE = self.router(x_TD.reshape(-1, S, D))
        mask_TE = mask_BSE.reshape(T, self.n_experts)
        # One-hot rows, all-zero where the token overflowed its expert's capacity.
        token_N = mask_TE.any(-1).nonzero().squeeze(-1)
        expert_N = mask_TE[token_N].argmax(-1)
        routing = Routing.from_assignments(
            token_N, expert_N, probs_BS1.reshape(T)[token_N], n_experts=self.n_experts, n_tokens=T,
            logits=logits_BSE.reshape(T, self.n_experts),
        )
        return dataclasses.replace(routing, n_dropped=T - token_N.numel())

    def extra_repr(self) -> str:
        return f"k=1, expert_capacity={getattr(self.router, 'expert_capacity', None)}, seq_len={self.seq_len}"


class HFLpNormRouterGate(HFRouterGate):
    """DBRX's routing: a logits-only router module run as it is, then softmax top-k with the
    kept weights divided by their Lp norm (Databricks 2024, DBRX; transformers
    ``models/dbrx/modeling_dbrx.py``, ``DbrxRouter`` and ``DbrxFFN.route_tokens_to_experts``,
    setting ``moe_normalize_expert_weights``).

    Formula: ``l = router(x)`` (``x W^T`` in the input's dtype, with the router's own
    training jitter); ``p = softmax(l)`` in the logits' dtype; keep the k largest ``p_e``;
    weight ``g_e = p_e / ||p_topk||_p`` with ``p = norm_p`` (``torch.norm``; p = 1 is the
    usual renormalisation for positive weights; p = None keeps ``p_e`` as they are). The
    weights stay in the logits' dtype, as in the original.

    Examples
    --------
    >>> import torch
    >>> g = HFLpNormRouterGate(torch.nn.Linear(8, 4, bias=False), d_model=8, n_experts=4, k=2, norm_p=2.0)
    >>> torch.allclose(g(torch.randn(5, 8)).combine_matrix().norm(dim=-1), torch.ones(5))
    True
    """

    def __init__(self, router: nn.Module, *, d_model: int, n_experts: int, k: int, norm_p: float | None) -> None:
        super().__init__(router, d_model=d_model, n_experts=n_experts, k=k)
        if norm_p is not None and not float(norm_p) > 0:
            raise ValueError(f"norm_p must be None or > 0, got {norm_p!r}")
        self.norm_p = None if norm_p is None else float(norm_p)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.router(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=1, dtype=logits_TE.dtype)
        weights_TK, experts_TK = torch.topk(probs_TE, self.k, dim=-1)
        if self.norm_p is not None:
            weights_TK = weights_TK / torch.norm(weights_TK, p=self.norm_p, dim=-1, keepdim=True)
        return Routing.from_topk(weights_TK, experts_TK, self.n_experts, logits=logits_TE)

    def extra_repr(self) -> str:
        return f"k={self.k}, norm_p={self.norm_p}"


class HFJetMoeRouterGate(HFRouterGate):
    """JetMoE's router run as it is (Shen et al. 2024, "JetMoE", arXiv:2404.07413;
    transformers ``models/jetmoe/modeling_jetmoe.py``, ``JetMoeTopKGating``).

    Formula: ``l = float32(x W^T)`` (the product in the input's dtype); keep the k largest
    ``l_e``; weights ``softmax`` over the kept logits in float32, cast to the input's dtype.
    The router returns its choices sorted by expert (``batch_index``, ``batch_gates``,
    ``expert_size``), which become a `Routing` as they are; keeping the module keeps
    transformers' ``router_logits`` recording (``OutputRecorder(JetMoeTopKGating, index=4)``).

    Examples
    --------
    >>> import torch
    >>> class Top2(torch.nn.Module):
    ...     def forward(self, x):
    ...         logits = torch.tensor([[1.0, 0.0, 2.0]]).expand(x.shape[0], 3)
    ...         top, idx = logits.topk(2, dim=1)
    ...         order = idx.flatten().sort(0).indices
    ...         sizes = torch.zeros(3, dtype=torch.long).scatter_add(0, idx.flatten(), torch.ones(idx.numel(), dtype=torch.long))
    ...         return order, order // 2, top.softmax(1).flatten()[order], sizes.tolist(), logits
    >>> HFJetMoeRouterGate(Top2(), d_model=4, n_experts=3, k=2)(torch.randn(5, 4)).counts.tolist()
    [5, 0, 5]
    """

    def forward(self, x_TD: Tensor) -> Routing:
        _, token_N, weight_N, expert_size, logits_TE = self.router(x_TD)
        sizes_E = torch.as_tensor(expert_size, device=x_TD.device)
        expert_N = torch.repeat_interleave(torch.arange(self.n_experts, device=x_TD.device), sizes_E)
        return Routing.from_assignments(token_N, expert_N, weight_N, n_experts=self.n_experts, n_tokens=x_TD.shape[0], logits=logits_TE)


class HFStatefulRouterGate(HFRouterGate):
    """A router that takes state from the previous MoE layer and returns state for the next,
    run as it is (Zyphra's ZAYA1; transformers ``models/zaya/modeling_zaya.py``,
    ``ZayaRouter``: ``router(x [B, S, D], router_states) -> (logits, weights, experts,
    next_states)``; an extra router class routes a token to no expert, returned as expert 0
    with weight 0, which adds nothing).

    `HFMoEBlock` sets ``state_in`` and ``batch_shape`` (``(B, S)``) for one call and reads
    ``state_out`` after it; the tokens reach the router as ``[B, S, D]``.

    Examples
    --------
    >>> import torch
    >>> class Router(torch.nn.Module):
    ...     def forward(self, x, router_states=None):
    ...         T = x.shape[0] * x.shape[1]
    ...         return torch.zeros(T, 3), torch.ones(T, 1), torch.zeros(T, 1, dtype=torch.long), x[..., :2]
    >>> g = HFStatefulRouterGate(Router(), d_model=4, n_experts=3, k=1)
    >>> g.batch_shape = (1, 5)
    >>> g(torch.randn(5, 4)).counts.tolist(), tuple(g.state_out.shape)
    ([5, 0, 0], (1, 5, 2))
    """

    def __init__(self, router: nn.Module, *, d_model: int, n_experts: int, k: int) -> None:
        super().__init__(router, d_model=d_model, n_experts=n_experts, k=k)
        self.state_in: Tensor | None = None
        self.state_out: Tensor | None = None
        self.batch_shape: tuple[int, ...] | None = None

    def forward(self, x_TD: Tensor) -> Routing:
        shape = self.batch_shape or (1, x_TD.shape[0])
        logits_TE, weights_TK, experts_TK, self.state_out = self.router(
            x_TD.reshape(*shape, x_TD.shape[-1]), router_states=self.state_in
        )
        return Routing.from_topk(weights_TK, experts_TK, self.n_experts, logits=logits_TE[:, : self.n_experts])


class HFProductKeyGate(Gate):
    """Doge's product-key routing over ``E = n_keys^2`` experts (He 2024, "Mixture of A
    Million Experts", arXiv:2407.04153, product keys after Lample et al. 2019; transformers
    ``models/doge/modeling_doge.py``, ``DogeCDMoE``), computed as the original computes it.

    Formula: ``l = x W^T`` (``router_gate``, ``[T, 2 n_keys]``) is *viewed* as ``[2, T,
    n_keys]`` (as in transformers, this mixes the halves of neighbouring tokens' logits: the
    batch's tokens in order, so the same view here gives the same routing); the top
    ``n_keys`` of each half give candidate experts ``i_x n_keys + i_y`` with scores ``s_x +
    s_y``; the k best candidates are kept with weights ``softmax(s)`` (renormalised again
    with ``normalize``, a no-op). The viewed logits are kept in ``last_router_logits`` for
    the block's return value and transformers' ``router_logits`` recording.

    Examples
    --------
    >>> import torch
    >>> g = HFProductKeyGate(torch.nn.Linear(8, 4, bias=False), d_model=8, n_experts=4, k=2, normalize=False)
    >>> g(torch.randn(6, 8)).n_assignments, tuple(g.last_router_logits.shape)
    (12, (2, 6, 2))
    """

    registry_name = "hf_product_key"
    # No [T, E] score to bias: no selection bias can be attached.
    token_choice = False
    _transient = {**Gate._transient, "last_router_logits": None}

    def __init__(self, router_gate: nn.Module, *, d_model: int, n_experts: int, k: int, normalize: bool) -> None:
        super().__init__(d_model, n_experts)
        self.router_gate = router_gate
        self.n_keys = int(router_gate.weight.shape[0]) // 2
        if self.n_keys**2 != n_experts:
            raise ValueError(f"product keys: n_experts={n_experts} is not n_keys^2 with n_keys={self.n_keys}")
        self.k, self.normalize = int(k), bool(normalize)
        self.last_router_logits: Tensor | None = None

    def forward(self, x_TD: Tensor) -> Routing:
        T = x_TD.shape[0]
        logits = self.router_gate(x_TD).view(2, T, -1)
        (scores_x, scores_y), (idx_x, idx_y) = logits.topk(self.n_keys, dim=-1)
        all_scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).reshape(T, -1)
        all_idx = (idx_x.unsqueeze(-1) * self.n_keys + idx_y.unsqueeze(-2)).reshape(T, -1)
        scores_TK, pos_TK = all_scores.topk(self.k, dim=-1)
        experts_TK = all_idx.gather(-1, pos_TK)
        weights_TK = torch.softmax(scores_TK, dim=-1)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        self.last_router_logits = logits
        return Routing.from_topk(weights_TK, experts_TK, self.n_experts)

    def extra_repr(self) -> str:
        return f"n_keys={self.n_keys}, k={self.k}, normalize={self.normalize}"


class HFSharedGammaRouterGate(HFRouterGate):
    """Inkling's router run as it is, its shared experts routed to every token with the
    weights it computes for them (Thinking Machines 2026, Inkling; transformers
    ``models/inkling/modeling_inkling.py``, ``InklingTopkRouter`` and ``InklingSharedExperts``).

    Formula: logits ``l = x W^T`` over ``E`` routed and ``S`` shared experts, in float32;
    the k routed experts of largest ``sigmoid(l_e) + b_e`` (selection bias ``b``); weights
    over those k and the S shared experts together,
    ``g = softmax(logsigmoid(l_kept)) * route_scale * global_scale``, in the input's dtype.
    The router returns ``(routed logits, g_routed [T, k], experts [T, k], g_shared [T, S])``;
    here the shared experts are experts ``E .. E+S-1`` of the bank, chosen by every token
    with weight ``g_shared`` (``k + S`` experts per token: ``self.k``). The original
    multiplies ``g_shared`` into the shared experts' hidden activations before
    ``down_proj``, gatedmoe into their outputs: the same function, rounded differently.

    Examples
    --------
    >>> import torch
    >>> class Router(torch.nn.Module):
    ...     def forward(self, x):
    ...         T = x.shape[0]
    ...         return torch.zeros(T, 3), torch.full((T, 1), 0.5), torch.zeros(T, 1, dtype=torch.long), torch.full((T, 1), 0.5)
    >>> HFSharedGammaRouterGate(Router(), d_model=4, n_routed=3, n_shared=1, k=1)(torch.randn(2, 4)).counts.tolist()
    [2, 0, 0, 2]
    """

    def __init__(self, router: nn.Module, *, d_model: int, n_routed: int, n_shared: int, k: int) -> None:
        super().__init__(router, d_model=d_model, n_experts=n_routed + n_shared, k=k + n_shared)
        self.n_routed, self.n_shared = int(n_routed), int(n_shared)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE, weights_TK, experts_TK, gammas_TS = self.router(x_TD)
        T = x_TD.shape[0]
        shared_TS = torch.arange(self.n_routed, self.n_experts, device=x_TD.device).expand(T, self.n_shared)
        return Routing.from_topk(
            torch.cat([weights_TK, gammas_TS], -1), torch.cat([experts_TK, shared_TS], -1), self.n_experts
        )

    def extra_repr(self) -> str:
        return f"n_routed={self.n_routed}, n_shared={self.n_shared}, k={self.k}"


class HFRoutedScaleMoE(MoE):
    """`MoE` whose routed output is multiplied by a constant before the shared experts are
    added: ``y = s * sum_k g_k f_k(x) + shared(x)``, as the blocks of Laguna, Step-3.7-Flash
    and Beam compute it (``hidden_states * self.routed_scaling_factor`` after their experts,
    in the activations' dtype, so a bf16 block rounds as the original does). Routers that
    scale their weights instead (DeepSeek-V3's) need no such layer.

    ``routed_scale`` (float, keyword of the constructor and of ``from_config``) is ``s``;
    only the `dispatch` seam differs from `MoE`.

    Examples
    --------
    >>> import torch
    >>> layer = HFRoutedScaleMoE(8, 4, 16, routed_scale=2.5)
    >>> layer(torch.randn(3, 8)).shape
    torch.Size([3, 8])
    """

    def __init__(self, d_model: int, n_experts: int, d_hidden: int, *, routed_scale: float, **settings) -> None:
        super().__init__(d_model, n_experts, d_hidden, **settings)
        self.routed_scale = float(routed_scale)

    def dispatch(self, x_TD: Tensor, routing: Routing) -> Tensor:
        return super().dispatch(x_TD, routing) * self.routed_scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, routed_scale={self.routed_scale}"


class HFProjectedExpertsMoE(MoE):
    """`MoE` whose experts work at a width of their own between two projections, each
    expert's output normalised before it is weighted (Meta 2026, Muse-Spark; transformers
    ``models/muse_spark/modeling_muse_spark.py``, ``MuseSparkMoE`` and ``MuseSparkExperts``
    with ``has_post_expert_norm``).

    Formula: the gate routes on ``x [T, D]``; ``z = pre_norm(pre_proj(x))`` ``[T, M]``;
    ``y = post_proj(sum_k g_k post_norm(f_k(z)))`` with ``f_k`` the bank's experts at width
    ``M`` (``ExpertBank.d_model == M``). The norm after each expert is why this is not an
    `MoE` with projections around it: the `dispatch` seam runs the experts with unit weights
    (one row per assignment, as `gatedmoe.layers.InputScaledMoE`), normalises each row,
    weighs and sums them in float32 and rounds once. ``pre_proj``, ``pre_norm``,
    ``post_norm`` and ``post_proj`` are modules (keywords of the constructor and of
    ``from_config``).

    Examples
    --------
    >>> import torch
    >>> layer = HFProjectedExpertsMoE(
    ...     8, 4, 16, pre_proj=torch.nn.Linear(8, 6), pre_norm=torch.nn.LayerNorm(6),
    ...     post_norm=torch.nn.LayerNorm(6), post_proj=torch.nn.Linear(6, 8))
    >>> layer.experts.d_model, layer(torch.randn(3, 8)).shape
    (6, torch.Size([3, 8]))
    """

    def __init__(
        self, d_model: int, n_experts: int, d_hidden: int, *, pre_proj: nn.Module, pre_norm: nn.Module,
        post_norm: nn.Module, post_proj: nn.Module, **settings,
    ) -> None:  # fmt: skip
        # Read by `_bank_size` while MoE.__init__ builds the parts.
        self._d_bank = int(pre_proj.weight.shape[0])
        super().__init__(d_model, n_experts, d_hidden, **settings)
        self.pre_proj, self.pre_norm, self.post_norm, self.post_proj = pre_proj, pre_norm, post_norm, post_proj

    def _bank_size(self, config) -> tuple[int, int]:
        return config.n_experts, self._d_bank

    def dispatch(self, x_TD: Tensor, routing: Routing) -> Tensor:
        z_TM = self.pre_norm(self.pre_proj(x_TD))
        dtype = z_TM.dtype
        per_row = routing.per_assignment(dtype)
        backend = get_backend(self.backend, x_TD.device)
        o_NM = self.post_norm(backend(z_TM.index_select(0, routing.token), per_row, self.experts, options=self.backend_options))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        y_TM = torch.zeros(z_TM.shape, dtype=acc, device=x_TD.device)
        y_TM = y_TM.index_add(0, routing.token, o_NM.to(acc) * routing.weight.to(acc).unsqueeze(-1))
        return self.post_proj(y_TM.to(dtype))


class HFOutputBias(nn.Module):
    """A bias ``[D]`` added to a block's output after the experts are combined (JetMoE's
    ``JetMoeMoE.bias``), held as `MoE.shared`: ``y = sum_k g_k f_k(x) + b``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.bias


class HFSharedExperts(nn.Module):
    """A Hugging Face shared-expert MLP as `MoE.shared`, optionally scaled per token by
    ``sigmoid(gate(x))`` (Qwen3-Next / Qwen3.5-MoE's gated shared expert)."""

    def __init__(self, mlp: nn.Module, gate: nn.Module | None = None) -> None:
        super().__init__()
        self.mlp, self.gate = mlp, gate

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(x)
        return out if self.gate is None else torch.sigmoid(self.gate(x)) * out


def _tap_init(self: nn.Module) -> None:
    nn.Module.__init__(self)


def _tap_forward(self: nn.Module, router_logits: Tensor) -> Tensor:
    return router_logits


def _tap_reduce(self: nn.Module) -> tuple:
    # The tap class is made at run time, so pickle cannot find it by name: a pickled tap
    # (torch.save of a whole patched model, copy.deepcopy) is rebuilt from the router class,
    # which it can find, then given its state as any module is.
    return _new_tap, (type(self).__bases__[0],), self.__getstate__()


def _new_tap(router_cls: type) -> nn.Module:
    return _tap_class(router_cls)()


@functools.cache
def _tap_class(router_cls: type) -> type:
    """A parameter-free subclass of a Hugging Face router class whose forward returns the
    logits it is given. transformers records ``router_logits`` by hooking modules that are
    instances of the router class (``OutputRecorder``), so a tap keeps
    ``output_router_logits=True`` (and the model's auxiliary loss) working after a swap."""
    return type(
        f"{router_cls.__name__}Tap", (router_cls,), {"__init__": _tap_init, "forward": _tap_forward, "__reduce__": _tap_reduce}
    )


def _tap_observed(tap: nn.Module) -> bool:
    """Whether calling ``tap`` can have an effect. A `_tap_class` forward returns its input,
    so without hooks (its own or the global module hooks: torch's own test for calling
    ``forward`` directly) the call, and the cast of the logits for it, are skipped.
    transformers installs its recorder hooks, on every recordable module at once, the first
    time any recorded output (``output_router_logits``, but also ``output_hidden_states`` or
    ``output_attentions``) is asked for, and leaves them: until then, as in plain
    ``generate()``, nothing reads the tap; after, every call runs it."""
    if type(tap).forward is not _tap_forward or "forward" in tap.__dict__:
        # A subclass, or a forward replaced on the instance (transformers'
        # `model_addition_debugger_context`, accelerate's hooks): the call is observed.
        return True
    m = _torch_module
    return bool(
        tap._forward_hooks or tap._forward_pre_hooks or tap._backward_hooks or tap._backward_pre_hooks
        or m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )


def router_tap(router: nn.Module) -> nn.Module:
    """A `_tap_class` instance for the class of ``router`` (an HF router module)."""
    return _tap_class(type(router))()


class HFMoEBlock(nn.Module):
    """A Hugging Face MoE block made of gatedmoe parts, with the original's call convention.

    ``forward(hidden_states [B, S, D])`` returns ``[B, S, D]``, or
    ``(hidden_states, router_scores [B*S, K])`` when ``returns_router_scores`` (GPT-OSS), or
    ``(hidden_states [B*S, D], router_logits [B*S, E])`` when ``returns_router_logits``
    (Llama 4, in the input's dtype), or ``(hidden_states [B, S, D], the gate's
    last_router_logits)`` when ``returns_gate_logits`` (Doge), or, with ``flat_io``, takes
    any input holding whole rows of D and returns ``(hidden_states.flatten(),
    router_logits.flatten())`` (Ernie-4.5-VL's per-modality blocks, handed masked,
    flattened tokens).
    Built by `gatedmoe.interop.hf.from_hf`; turned back into the original class by
    `gatedmoe.interop.hf.to_hf`.

    Attributes
    ----------
    moe : MoE
        Gate, routed experts and shared experts (ungated `SharedExperts` for DeepSeek-V3,
        `GatedSharedExperts` for Qwen2-MoE). Its last routing is ``moe.last_routing``.
        Auxiliary-loss weights are 0: Hugging Face models compute their own auxiliary
        loss from the router logits.
    router_tap : nn.Module or None
        Passes the router logits through an instance of the original router class, so
        transformers' ``output_router_logits=True`` still sees them.
    family, hf_class : str
        Which converter built it, and the class name of the original block.
    jitter_noise : float
        Mixtral's ``router_jitter_noise``: in training, the input is multiplied by
        ``U(1 - jitter, 1 + jitter)`` noise before routing and the experts.
    router_logits_dtype : "input" or "float32"
        Dtype of the logits handed to the tap, as the original router returns them.
    expert_dropout : float
        Dropout inside each original expert (Switch Transformers' ``dropout_rate``); gatedmoe's
        experts have none, so a training forward raises RuntimeError while it is > 0.
    kept : nn.ParameterDict or None
        Tensors of the original block that its forward never reads, kept for `to_hf` and
        checkpoints (LongCat-Flash's ``gate_up_proj`` rows of its zero-computation experts).
    post_norm : nn.Module or None
        A norm applied to the block's output, routed plus shared experts (A.X-K1's
        ``post_mlp_layernorm``), the original module.
    """

    def __init__(
        self,
        moe: MoE,
        *,
        family: str,
        hf_class: str,
        router_tap: nn.Module | None = None,
        jitter_noise: float = 0.0,
        returns_router_scores: bool = False,
        returns_router_logits: bool = False,
        returns_gate_logits: bool = False,
        flat_io: bool = False,
        router_logits_dtype: str = "input",
        template: nn.Module | None = None,
        expert_dropout: float = 0.0,
        kept: dict[str, Tensor] | None = None,
        post_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if router_logits_dtype not in ("input", "float32"):
            raise ValueError(f"router_logits_dtype must be 'input' or 'float32', got {router_logits_dtype!r}")
        if not jitter_noise >= 0:
            raise ValueError(f"jitter_noise must be >= 0, got {jitter_noise}")
        self.moe = moe
        self.router_tap = router_tap
        self.family, self.hf_class = family, hf_class
        self.jitter_noise = float(jitter_noise)
        self.returns_router_scores = bool(returns_router_scores)
        self.returns_router_logits = bool(returns_router_logits)
        self.returns_gate_logits = bool(returns_gate_logits)
        self.flat_io = bool(flat_io)
        self.router_logits_dtype = router_logits_dtype
        # Dropout inside each expert (Switch Transformers' DenseActDense): gatedmoe's experts
        # have none, so the block refuses to train while it is > 0 (eval is exact).
        self.expert_dropout = float(expert_dropout)
        self.kept = None if not kept else nn.ParameterDict(kept)
        self.post_norm = post_norm
        # A meta-device copy of the original block: to_hf rebuilds from it without a `like`.
        # Kept outside the module tree so it is neither a submodule nor in the state dict.
        object.__setattr__(self, "_template", template)

    @property
    def template(self) -> nn.Module | None:
        """The original block's structure on the meta device (no weights), or None."""
        return self._template

    def forward(
        self, hidden_states: Tensor, prev_router_hidden_states: Tensor | None = None, *, input_ids: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``input_ids`` reach a gate that routes by token id (DeepSeek-V4's hash layers,
        whose decoder layers pass them to every MoE block); other gates ignore them.
        ``prev_router_hidden_states``: the state of a stateful router (`HFStatefulRouterGate`,
        ZAYA1), which then returns ``(hidden_states, next router states)``."""
        x = hidden_states
        if self.training and self.expert_dropout > 0:
            raise RuntimeError(
                f"{self.hf_class} applies dropout (p={self.expert_dropout}) inside each expert, which "
                "gatedmoe's experts do not: train with dropout_rate=0 or run the converted block in eval mode"
            )
        gate = self.moe.gate
        per_sequence = isinstance(gate, HFSwitchRouterGate)
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        if per_sequence:
            # Capacity is counted per sequence: the gate splits the tokens into sequences
            # for this call only (a later direct `moe(x)` routes its tokens as one sequence).
            gate.seq_len = x.shape[-2] if x.dim() >= 3 else None
        stateful = isinstance(gate, HFStatefulRouterGate)
        if prev_router_hidden_states is not None and not stateful:
            raise TypeError(f"{self.hf_class} takes no router state (its router is not stateful)")
        if stateful:
            # State in, batch shape and state out for this call only.
            gate.state_in, gate.batch_shape = prev_router_hidden_states, tuple(x.shape[:-1])
        token_ids = input_ids if gate.uses_token_ids else None
        if self.flat_io:
            x = x.reshape(-1, self.moe.d_model)
        try:
            y = self.moe(x, token_ids=token_ids)
        finally:
            if per_sequence:
                gate.seq_len = None
            if stateful:
                gate.state_in = gate.batch_shape = None
        if self.post_norm is not None:
            y = self.post_norm(y)
        if stateful:
            state, gate.state_out = gate.state_out, None
            return y, state
        routing = self.moe.last_routing
        if self.flat_io:
            return y.flatten(), routing.logits.flatten()
        if self.returns_gate_logits:
            # The gate's own logits, as the block returns them (Doge's [2, T, n_keys] view).
            logits, gate.last_router_logits = gate.last_router_logits, None
            if self.router_tap is not None:
                self.router_tap(logits)
            return y, logits
        if self.router_tap is not None and routing.logits is not None and _tap_observed(self.router_tap):
            logits = routing.logits if self.router_logits_dtype == "float32" else routing.logits.to(x.dtype)
            self.router_tap(logits)
        if self.returns_router_logits:
            return y.reshape(-1, y.shape[-1]), routing.logits.to(x.dtype)
        if not self.returns_router_scores:
            return y
        # HF returns the kept weights of each token in descending order, [T, K].
        scores_TK = routing.combine_matrix().topk(self.moe.gate.k, dim=-1).values.to(x.dtype)
        return y, scores_TK

    def extra_repr(self) -> str:
        return f"family={self.family!r}, hf_class={self.hf_class!r}"
