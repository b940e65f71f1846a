"""`HFMoEBlock`: gatedmoe's `MoE` behind the call convention of a Hugging Face MoE block,
and the few pieces Hugging Face models need that the core layer does not have.

Everything here imports torch and gatedmoe only; transformers is never imported, so the
converters work on whatever blocks the caller hands in.

Shape legend: T tokens, D model dim, H expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.gates.topk import TopKSoftmaxGate
from gatedmoe.layers.moe import MoE

__all__ = ["HFMoEBlock", "HFTopKSoftmaxGate", "router_tap"]


class HFTopKSoftmaxGate(TopKSoftmaxGate):
    """`TopKSoftmaxGate` whose logits are computed as Hugging Face routers compute them.

    Formula as `TopKSoftmaxGate` (Mixtral, Qwen-MoE, OLMoE; GPT-OSS's "top-k of the
    logits, then softmax over the kept ones" is the same routing with ``renormalize``):
    ``p = softmax(l)``, keep the k largest, weight ``p_e / sum_{j in topk} p_j`` with
    ``renormalize``. Only the logits differ: ``l = x W^T (+ b)`` is computed in the
    *input's* dtype and then upcast, as ``F.linear(hidden_states, weight)`` does in
    transformers, so in bf16 the same experts are chosen as by the original router.
    ``bias`` adds a router bias ``[E]`` (GPT-OSS).

    Examples
    --------
    >>> import torch
    >>> g = HFTopKSoftmaxGate(8, 4, k=2, renormalize=True, bias=True)
    >>> g(torch.randn(5, 8)).n_assignments
    10
    """

    def __init__(self, d_model: int, n_experts: int, *, k: int, renormalize: bool, bias: bool = False) -> None:
        super().__init__(d_model, n_experts, k=k, renormalize=renormalize)
        self.bias = nn.Parameter(torch.zeros(n_experts)) if bias else None

    def router_logits(self, x_TD: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x_TD.dtype)
        return F.linear(x_TD, self.weight.to(x_TD.dtype), b).float()


@functools.cache
def _tap_class(router_cls: type) -> type:
    """A parameter-free subclass of a Hugging Face router class whose forward returns the
    logits it is given. transformers records ``router_logits`` by hooking modules that are
    instances of the router class (``OutputRecorder``), so a tap keeps
    ``output_router_logits=True`` (and the model's auxiliary loss) working after a swap."""

    def __init__(self) -> None:
        nn.Module.__init__(self)

    def forward(self, router_logits: Tensor) -> Tensor:
        return router_logits

    return type(f"{router_cls.__name__}Tap", (router_cls,), {"__init__": __init__, "forward": forward})


def router_tap(router: nn.Module) -> nn.Module:
    """A `_tap_class` instance for the class of ``router`` (an HF router module)."""
    return _tap_class(type(router))()


class HFMoEBlock(nn.Module):
    """A Hugging Face MoE block made of gatedmoe parts, with the original's call convention.

    ``forward(hidden_states [B, S, D])`` returns ``[B, S, D]``, or
    ``(hidden_states, router_scores [B*S, K])`` when ``returns_router_scores`` (GPT-OSS).
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
        router_logits_dtype: str = "input",
        template: nn.Module | None = None,
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
        self.router_logits_dtype = router_logits_dtype
        # A meta-device copy of the original block: to_hf rebuilds from it without a `like`.
        # Kept outside the module tree so it is neither a submodule nor in the state dict.
        object.__setattr__(self, "_template", template)

    @property
    def template(self) -> nn.Module | None:
        """The original block's structure on the meta device (no weights), or None."""
        return self._template

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        y = self.moe(x)
        routing = self.moe.last_routing
        if self.router_tap is not None and routing.logits is not None:
            logits = routing.logits if self.router_logits_dtype == "float32" else routing.logits.to(x.dtype)
            self.router_tap(logits)
        if not self.returns_router_scores:
            return y
        # HF returns the kept weights of each token in descending order, [T, K].
        scores_TK = routing.combine_matrix().topk(self.moe.gate.k, dim=-1).values.to(x.dtype)
        return y, scores_TK

    def extra_repr(self) -> str:
        return f"family={self.family!r}, hf_class={self.hf_class!r}"
