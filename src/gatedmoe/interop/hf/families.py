"""Converters between Hugging Face MoE blocks and `HFMoEBlock`, one pair per model family,
and the registry mapping HF block class names to them.

Supported layout: transformers >= 5.20 (verified on 5.20 and 5.23; 5.0 routes DeepSeek-V3
in the block, not the router, and records probabilities as router logits), where experts are fused 3-D parameters
(``experts.gate_up_proj``, ``experts.down_proj``) and routers are ``*TopKRouter`` modules
returning ``(router_logits, weights, indices)``.

Shape legend: T tokens, D model dim, H expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from gatedmoe.experts.activations import (
    Activation,
    ClampedSwiGLU,
    Float32SwiGLU,
    LimitedSwiGLU,
    SoftcappedSwiGLU,
)
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.gates.group_limited import GroupLimitedGate
from gatedmoe.gates.sigmoid import SigmoidGate
from gatedmoe.gates.topk import TopKSoftmaxGate
from gatedmoe.interop.hf.adapter import (
    HFJetMoeRouterGate,
    HFLpNormRouterGate,
    HFMoEBlock,
    HFOutputBias,
    HFProductKeyGate,
    HFProjectedExpertsMoE,
    HFRoutedScaleMoE,
    HFRouterGate,
    HFSharedExperts,
    HFSharedGammaRouterGate,
    HFSigmoidTopKGate,
    HFStatefulRouterGate,
    HFSwitchRouterGate,
    HFTopKSoftmaxGate,
    router_tap,
)
from gatedmoe.layers.config import MoEConfig
from gatedmoe.layers.input_scaled import InputScaledMoE
from gatedmoe.layers.moe import GatedSharedExperts, MoE, SharedExperts
from gatedmoe.layers.zero_compute import ZeroComputeMoE

M = TypeVar("M", bound=nn.Module)

__all__ = ["Family", "Layout", "FAMILIES", "GENERIC", "family_of", "meta_copy"]

# transformers activation classes -> the GLU activation of gatedmoe with the same math.
_GLU_OF_HF_ACT = {
    "SiLUActivation": "swiglu",
    "SiLU": "swiglu",
    "ReLU": "reglu",
    "GELUTanh": "geglu",
    "PytorchGELUTanh": "geglu",
    "silu": "swiglu",
    "relu": "reglu",
}


@dataclass(frozen=True)
class Family:
    """How to convert the MoE blocks of one model family.

    ``config(block) -> MoEConfig`` reads the layer's settings off the block (the one place
    a family lists them); ``parts(block, config) -> (MoE, adapter keywords)`` builds the
    gate, experts and shared experts from the block's weights (copied) and passes them to
    `MoE.from_config`; ``write(adapter, block)`` replaces ``block``'s parameters in place
    with the adapter's, after checking that the two compute the same function.
    """

    name: str
    config: Callable[[nn.Module], MoEConfig]
    parts: Callable[[nn.Module, MoEConfig], tuple[MoE, dict[str, Any]]]
    write: Callable[[HFMoEBlock, nn.Module], None]

    def read(self, block: nn.Module, backend: str, check_inputs: bool) -> HFMoEBlock:
        """`HFMoEBlock` computing what ``block`` computes (weights copied)."""
        config = self.config(block).replace(backend=backend, check_inputs=check_inputs)
        moe, adapter_kw = self.parts(block, config)
        adapter = HFMoEBlock(
            moe,
            family=self.name,
            hf_class=type(block).__name__,
            template=meta_copy(block),
            **adapter_kw,
        )
        _check_materialized(adapter, f"from_hf({type(block).__name__})")
        return adapter.train(block.training)


# --------------------------------------------------------------------------- helpers
def _get(module: nn.Module, path: str):
    """``module.a.b`` for ``path="a.b"``; TypeError naming what is missing."""
    obj = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise TypeError(
                f"{type(module).__name__} has no {path!r}: gatedmoe converts the fused-expert "
                "layout of transformers >= 5.20 (experts.gate_up_proj / experts.down_proj)"
            )
        obj = getattr(obj, part)
    return obj


def _attr(module: nn.Module, *names: str):
    """The first attribute of ``module`` among ``names`` (names differ across versions)."""
    for n in names:
        if hasattr(module, n):
            return getattr(module, n)
    raise TypeError(
        f"{type(module).__name__} has none of the attributes {names}; gatedmoe converts the "
        "blocks of transformers >= 5.20"
    )


def _param(t: Tensor) -> nn.Parameter:
    """A contiguous copy of ``t`` as a Parameter, keeping its requires_grad."""
    return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format), requires_grad=t.requires_grad)


def _set_param(module: nn.Module, name: str, t: Tensor) -> None:
    setattr(module, name, _param(t))


def _built(build: Callable[[], M], **weights: Tensor) -> M:
    """The part ``build()`` makes, built on the meta device and given copies of ``weights``
    (``name=tensor``, dotted names reach submodules; shapes must match). Every parameter
    must be among ``weights``: `_check_materialized` catches one that is not."""
    with torch.device("meta"):
        part = build()
    for name, t in weights.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = part.get_submodule(owner_name) if owner_name else part
        old = getattr(owner, leaf)
        if old is not None and tuple(old.shape) != tuple(t.shape):
            raise TypeError(f"{type(part).__name__}.{name}: expected shape {tuple(old.shape)}, the block has {tuple(t.shape)}")
        if isinstance(old, nn.Parameter):
            _set_param(owner, leaf, t)
        else:  # a buffer
            setattr(owner, leaf, t.detach().clone())
    return part


def _glu_name(act_fn: nn.Module) -> str:
    # A module (ACT2FN's classes) or a plain function (e.g. F.silu).
    name = act_fn.__name__ if type(act_fn).__name__ == "function" else type(act_fn).__name__
    if name not in _GLU_OF_HF_ACT:
        raise ValueError(
            f"unsupported expert activation {name}; gatedmoe converts {sorted(_GLU_OF_HF_ACT)}"
        )
    return _GLU_OF_HF_ACT[name]


def _check_same(what: str, ours, theirs) -> None:
    if ours != theirs:
        raise ValueError(f"to_hf: {what} differs: gatedmoe has {ours!r}, the Hugging Face block has {theirs!r}")


def _check_shape(what: str, ours: Tensor, theirs: Tensor) -> None:
    _check_same(f"shape of {what}", tuple(ours.shape), tuple(theirs.shape))


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on the meta device
    (structure and Python attributes only; no weight is copied)."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _layer_config(**settings: Any) -> MoEConfig:
    """The `MoEConfig` of a converted block. Auxiliary-loss weights are 0: Hugging Face
    models compute their own auxiliary loss from the router logits."""
    return MoEConfig(load_balance_weight=0.0, router_z_weight=0.0, **settings)


def _check_materialized(module: nn.Module, what: str) -> None:
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_meta:
            raise RuntimeError(f"{what}: {name} was not converted (still on the meta device)")


# ------------------------------------------------- fused GLU experts (all but GPT-OSS)
def _fused_experts(config: MoEConfig, experts: nn.Module, act: nn.Module | None = None) -> ExpertBank:
    # HF: gate, up = linear(x, gate_up_proj[e]).chunk(2): gate rows first, as gatedmoe's GLU.
    # ``act``: a built activation with constants of its own (else config.activation by name).
    return _built(
        lambda: ExpertBank(config.n_experts, config.d_model, config.d_hidden, act or config.activation, config.bias),
        w_in=_get(experts, "gate_up_proj"),
        w_out=_get(experts, "down_proj"),
    )


def _act_key(act) -> str:
    """What identifies an activation's function: its name, and its constants (repr)."""
    return act.name if isinstance(act, Activation) else repr(act)


def _plain_experts(config: MoEConfig, experts: nn.Module) -> ExpertBank:
    # HF: down(act(linear(x, up_proj[e]))): up_proj [E, H, D] is w_in, down_proj [E, D, H] w_out.
    return _built(
        lambda: ExpertBank(config.n_experts, config.d_model, config.d_hidden, config.activation),
        w_in=_get(experts, "up_proj"),
        w_out=_get(experts, "down_proj"),
    )


def _transposed_experts(config: MoEConfig, experts: nn.Module, act=None) -> ExpertBank:
    # HF: (x @ gate_up_proj[e] (+ gate_up_proj_bias[e])).chunk(2) with gate_up_proj [E, D, 2H]
    # ([gate | up] concatenated), down_proj [E, H, D] (+ down_proj_bias [E, D]).
    gate_up, down = _get(experts, "gate_up_proj"), _get(experts, "down_proj")
    biases = {"b_in": experts.gate_up_proj_bias, "b_out": experts.down_proj_bias} if config.bias else {}
    return _built(
        lambda: ExpertBank(config.n_experts, config.d_model, config.d_hidden, act or config.activation, config.bias),
        w_in=gate_up.detach().transpose(1, 2).requires_grad_(gate_up.requires_grad),
        w_out=down.detach().transpose(1, 2).requires_grad_(down.requires_grad),
        **biases,
    )


def _write_transposed_experts(bank: ExpertBank, experts: nn.Module, act=None) -> None:
    want = _glu_name(experts.act_fn) if act is None else _act_key(act)
    _check_same("expert activation", bank.act.name if act is None else _act_key(bank.act), want)
    _check_same("expert biases", bank.has_bias, getattr(experts, "gate_up_proj_bias", None) is not None)
    _check_shape("experts.gate_up_proj (transposed)", bank.w_in.transpose(1, 2), experts.gate_up_proj)
    _check_shape("experts.down_proj (transposed)", bank.w_out.transpose(1, 2), experts.down_proj)
    _set_param(experts, "gate_up_proj", bank.w_in.detach().transpose(1, 2))
    _set_param(experts, "down_proj", bank.w_out.detach().transpose(1, 2))
    if bank.has_bias:
        _set_param(experts, "gate_up_proj_bias", bank.b_in)
        _set_param(experts, "down_proj_bias", bank.b_out)


def _write_plain_experts(bank: ExpertBank, experts: nn.Module) -> None:
    _check_same("expert activation", bank.act.name, _plain_act_name(experts.act_fn))
    _check_same("expert biases", bank.has_bias, False)
    _check_shape("experts.up_proj", bank.w_in, experts.up_proj)
    _check_shape("experts.down_proj", bank.w_out, experts.down_proj)
    _set_param(experts, "up_proj", bank.w_in)
    _set_param(experts, "down_proj", bank.w_out)


def _write_fused_experts(bank: ExpertBank, experts: nn.Module, act=None) -> None:
    """``act``: the activation the HF experts compute (default: the GLU of their ``act_fn``)."""
    want = _glu_name(experts.act_fn) if act is None else _act_key(act)
    _check_same("expert activation", bank.act.name if act is None else _act_key(bank.act), want)
    _check_same("expert biases", bank.has_bias, False)
    _check_shape("experts.gate_up_proj", bank.w_in, experts.gate_up_proj)
    _check_shape("experts.down_proj", bank.w_out, experts.down_proj)
    _set_param(experts, "gate_up_proj", bank.w_in)
    _set_param(experts, "down_proj", bank.w_out)


def _shared_mlp_weights(mlp: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """HF ``down(act(gate(x)) * up(x))`` as the weights of a `SharedExperts` (at ``prefix``),
    ``w_in = [gate | up]``."""
    gate_w, up_w = _get(mlp, "gate_proj.weight"), _get(mlp, "up_proj.weight")
    w_in = torch.cat([gate_w.detach(), up_w.detach()], 0).requires_grad_(gate_w.requires_grad)
    return {f"{prefix}w_in.weight": w_in, f"{prefix}w_out.weight": _get(mlp, "down_proj.weight")}


def _mlp_act(mlp: nn.Module):
    """A gated MLP's activation (``act_fn``; Llama 4 names it ``activation_fn``)."""
    return _attr(mlp, "act_fn", "activation_fn")


def _shared_mlp(mlp: nn.Module) -> SharedExperts:
    """HF's shared-expert MLP as ungated `SharedExperts`."""
    Hs, D = _get(mlp, "gate_proj.weight").shape
    return _built(lambda: SharedExperts(D, Hs, activation=_glu_name(_mlp_act(mlp)), bias=False), **_shared_mlp_weights(mlp))


def _shared_to_mlp(shared: SharedExperts, mlp: nn.Module) -> None:
    _check_same("shared expert activation", shared.act.name, _glu_name(_mlp_act(mlp)))
    _check_same("shared expert biases", shared.w_in.bias is not None, False)
    _check_shape("shared expert down_proj", shared.w_out.weight, mlp.down_proj.weight)
    gate_w, up_w = shared.w_in.weight.chunk(2, dim=0)
    _set_param(mlp.gate_proj, "weight", gate_w)
    _set_param(mlp.up_proj, "weight", up_w)
    _set_param(mlp.down_proj, "weight", shared.w_out.weight)


# ------------------------------------------ softmax top-k: Mixtral, Qwen3-MoE, OLMoE, Qwen2
def _topk_config(block: nn.Module) -> MoEConfig:
    router, experts = _get(block, "gate"), _get(block, "experts")
    E, D = _get(router, "weight").shape
    return _layer_config(
        d_model=D,
        n_experts=E,
        d_hidden=_get(experts, "down_proj").shape[-1],
        k=int(_attr(router, "top_k")),
        activation=_glu_name(experts.act_fn),
        # Mixtral's router always renormalises; the others follow norm_topk_prob.
        gate_kwargs={"renormalize": bool(getattr(router, "norm_topk_prob", True))},
    )


def _topk_gate(config: MoEConfig, router: nn.Module, *, softmax_over: str = "all", **bias: Tensor) -> HFTopKSoftmaxGate:
    # The dtype the router returns its weights in: float32 for Mixtral, the logits' dtype
    # for the Qwen and OLMoE routers (``.to(router_logits.dtype)``) and GPT-OSS's.
    weights_dtype = "float32" if type(router).__name__ == "MixtralTopKRouter" else "input"
    # The grouped backend is the path that reproduces transformers bit for bit: its gate keeps
    # torch's ops too; the others route in the fused kernels on CUDA (`HFTopKSoftmaxGate`).
    return _built(
        lambda: HFTopKSoftmaxGate(
            config.d_model, config.n_experts, k=config.k, bias=bool(bias), softmax_over=softmax_over,
            weights_dtype=weights_dtype, fused=config.backend != "grouped", **config.gate_kwargs,
        ),
        weight=router.weight,
        **bias,
    )


def _topk_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    moe = MoE.from_config(config, gate=_topk_gate(config, block.gate), experts=_fused_experts(config, block.experts))
    return moe, {"router_tap": router_tap(block.gate), "jitter_noise": float(getattr(block, "jitter_noise", 0.0))}


def _write_topk_gate(moe: MoE, router: nn.Module) -> None:
    gate = moe.gate
    if not isinstance(gate, TopKSoftmaxGate):
        raise ValueError(f"to_hf: {type(router).__name__} needs a top-k softmax gate, got {type(gate).__name__}")
    if getattr(gate, "noisy", False) or gate.balancer is not None or getattr(gate, "bias", None) is not None:
        raise ValueError("to_hf: the gate has noise, a selection bias or a router bias; the HF router has none")
    _check_same("top_k", gate.k, int(router.top_k))
    _check_same("renormalisation (norm_topk_prob)", gate.renormalize, bool(getattr(router, "norm_topk_prob", True)))
    _check_shape("router weight", gate.weight, router.weight)
    _set_param(router, "weight", gate.weight)


def _write_topk(adapter: HFMoEBlock, block: nn.Module) -> None:
    if adapter.moe.shared is not None:
        raise ValueError(f"to_hf: {type(block).__name__} has no shared experts, the gatedmoe block has")
    _write_topk_gate(adapter.moe, block.gate)
    _write_fused_experts(adapter.moe.experts, block.experts)


def _qwen2_config(block: nn.Module) -> MoEConfig:
    shared_hidden = _get(block, "shared_expert.gate_proj.weight").shape[0]
    return _topk_config(block).replace(n_shared_experts=1, d_shared_hidden=shared_hidden)


def _qwen2_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    mlp, sgate = _get(block, "shared_expert"), _get(block, "shared_expert_gate")
    weights = _shared_mlp_weights(mlp, "expert.") | {"gate.weight": sgate.weight}
    if sgate.bias is not None:
        weights["gate.bias"] = sgate.bias
    shared = _built(
        lambda: GatedSharedExperts(
            config.d_model, config.d_shared_hidden, _glu_name(mlp.act_fn), bias=False, gate_bias=sgate.bias is not None
        ),
        **weights,
    )
    moe = MoE.from_config(
        config, gate=_topk_gate(config, block.gate), experts=_fused_experts(config, block.experts), shared=shared
    )
    return moe, {"router_tap": router_tap(block.gate)}


def _write_qwen2(adapter: HFMoEBlock, block: nn.Module) -> None:
    shared = adapter.moe.shared
    if not isinstance(shared, GatedSharedExperts):
        raise ValueError("to_hf: Qwen2-MoE blocks have a gated shared expert; the gatedmoe block has none")
    _write_topk_gate(adapter.moe, block.gate)
    _write_fused_experts(adapter.moe.experts, block.experts)
    _shared_to_mlp(shared.expert, block.shared_expert)
    sgate = shared.gate
    _check_shape("shared_expert_gate weight", sgate.weight, block.shared_expert_gate.weight)
    _check_same("shared_expert_gate bias", sgate.bias is not None, block.shared_expert_gate.bias is not None)
    _set_param(block.shared_expert_gate, "weight", sgate.weight)
    if sgate.bias is not None:
        _set_param(block.shared_expert_gate, "bias", sgate.bias)


# ---------------------------------------------------------------------- DeepSeek-V3
def group_mask_value(router: nn.Module) -> float:
    """The selection score the installed ``DeepseekV3TopkRouter`` gives experts outside
    the kept groups: 0.0 (transformers 4.x) or -inf (5.x), found by running the router
    once on a crafted input (zero weights, every expert's score negative)."""
    E, D = router.weight.shape
    n_group, topk_group = int(_attr(router, "num_group", "n_group")), int(router.topk_group)
    if topk_group >= n_group:
        return float("-inf")  # no group is masked: both rules select alike
    dev = router.weight.device
    # Strictly decreasing, all below -1: the first topk_group groups win, every score < 0.
    bias = -10.0 - 1e-3 * torch.arange(E, device=dev, dtype=torch.float32)
    state = {"weight": torch.zeros_like(router.weight), "e_score_correction_bias": bias}
    with torch.no_grad():
        out = torch.func.functional_call(router, state, (torch.zeros(1, D, dtype=router.weight.dtype, device=dev),))
    idx = next(t for t in out if isinstance(t, Tensor) and not t.is_floating_point())
    return float("-inf") if int(idx.max()) < topk_group * (E // n_group) else 0.0


def _deepseek_v3_config(block: nn.Module) -> MoEConfig:
    router, experts, mlp = _get(block, "gate"), _get(block, "experts"), _get(block, "shared_experts")
    E, D = router.weight.shape
    act = _glu_name(experts.act_fn)
    _check_same("shared expert activation (gatedmoe shares one)", _glu_name(mlp.act_fn), act)
    Hs = mlp.gate_proj.weight.shape[0]
    n_shared = int(getattr(getattr(block, "config", None), "n_shared_experts", 1) or 1)
    if Hs % n_shared:
        n_shared = 1
    return _layer_config(
        d_model=D,
        n_experts=E,
        d_hidden=experts.down_proj.shape[-1],
        gate="group_limited",
        k=int(_attr(router, "top_k")),
        activation=act,
        n_shared_experts=n_shared,
        d_shared_hidden=Hs // n_shared,
        gate_kwargs={
            "n_group": int(_attr(router, "num_group", "n_group")),
            "topk_group": int(router.topk_group),
            "normalize": bool(router.norm_topk_prob),
            "routed_scaling_factor": float(router.routed_scaling_factor),
            "mask_value": group_mask_value(router),
        },
    )


def _deepseek_v3_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    router = block.gate
    gate = _built(
        lambda: GroupLimitedGate(
            config.d_model, config.n_experts, k=config.k, fused=config.backend != "grouped", **config.gate_kwargs
        ),
        weight=router.weight,
        **{"balancer.bias": router.e_score_correction_bias},
    )
    moe = MoE.from_config(
        config, gate=gate, experts=_fused_experts(config, block.experts), shared=_shared_mlp(block.shared_experts)
    )
    return moe, {"router_tap": router_tap(router), "router_logits_dtype": "float32"}


def _write_deepseek_v3(adapter: HFMoEBlock, block: nn.Module) -> None:
    moe, router = adapter.moe, block.gate
    gate = moe.gate
    if not isinstance(gate, GroupLimitedGate):
        raise ValueError(f"to_hf: DeepSeek-V3 needs a group_limited gate, got {type(gate).__name__}")
    if not isinstance(moe.shared, SharedExperts):
        raise ValueError("to_hf: DeepSeek-V3 blocks have ungated shared experts (MoE.shared), and only those")
    _check_same("top_k", gate.k, int(router.top_k))
    _check_same("n_group", gate.n_group, int(_attr(router, "num_group", "n_group")))
    _check_same("topk_group", gate.topk_group, int(router.topk_group))
    _check_same("norm_topk_prob", gate.normalize, bool(router.norm_topk_prob))
    _check_same("routed_scaling_factor", gate.routed_scaling_factor, float(router.routed_scaling_factor))
    _check_shape("router weight", gate.weight, router.weight)
    _set_param(router, "weight", gate.weight)
    router.e_score_correction_bias = gate.balancer.bias.detach().clone()
    _write_fused_experts(moe.experts, block.experts)
    _shared_to_mlp(moe.shared, block.shared_experts)


# --------------------------------------------------------------------------- GPT-OSS
def _gpt_oss_config(block: nn.Module) -> MoEConfig:
    router, experts = _get(block, "router"), _get(block, "experts")
    E, D = router.weight.shape
    return _layer_config(
        d_model=D,
        n_experts=E,
        d_hidden=_get(experts, "down_proj").shape[1],
        k=int(router.top_k),
        activation=ClampedSwiGLU.name,
        bias=True,
        # Top-k of the logits then softmax over the kept ones == softmax, top-k, renormalise.
        gate_kwargs={"renormalize": True},
    )


def _gpt_oss_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    router, experts = block.router, block.experts
    gate = _topk_gate(config, router, softmax_over="topk", **({} if router.bias is None else {"bias": router.bias}))
    gate_up, gate_up_b = _get(experts, "gate_up_proj"), _get(experts, "gate_up_proj_bias")  # [E, D, 2H], [E, 2H]
    down, down_b = _get(experts, "down_proj"), _get(experts, "down_proj_bias")  # [E, H, D], [E, D]
    # HF interleaves gate (even columns) and up (odd columns); gatedmoe stacks [gate | up].
    g, b = gate_up.detach(), gate_up_b.detach()
    act = ClampedSwiGLU(alpha=float(experts.alpha), limit=float(experts.limit))
    bank = _built(
        lambda: ExpertBank(config.n_experts, config.d_model, config.d_hidden, act, bias=True),
        w_in=torch.cat([g[..., 0::2], g[..., 1::2]], -1).transpose(1, 2).requires_grad_(gate_up.requires_grad),
        b_in=torch.cat([b[:, 0::2], b[:, 1::2]], -1).requires_grad_(gate_up_b.requires_grad),
        w_out=down.detach().transpose(1, 2).requires_grad_(down.requires_grad),
        b_out=down_b,
    )
    moe = MoE.from_config(config, gate=gate, experts=bank)
    return moe, {"router_tap": router_tap(router), "returns_router_scores": True}


def _write_gpt_oss(adapter: HFMoEBlock, block: nn.Module) -> None:
    moe, router, experts = adapter.moe, block.router, block.experts
    gate, bank = moe.gate, moe.experts
    if not isinstance(gate, TopKSoftmaxGate) or not gate.renormalize or gate.balancer is not None:
        raise ValueError("to_hf: GPT-OSS needs a renormalised top-k softmax gate without a selection bias")
    _check_same("top_k", gate.k, int(router.top_k))
    _check_same("router bias", getattr(gate, "bias", None) is not None, router.bias is not None)
    if not isinstance(bank.act, ClampedSwiGLU) or not bank.has_bias:
        raise ValueError("to_hf: GPT-OSS experts need the ClampedSwiGLU activation and biases")
    _check_same("swiglu (alpha, limit)", (bank.act.alpha, bank.act.limit), (float(experts.alpha), float(experts.limit)))
    _check_shape("experts.gate_up_proj (transposed)", bank.w_in.transpose(1, 2), experts.gate_up_proj)
    _set_param(router, "weight", gate.weight)
    if router.bias is not None:
        _set_param(router, "bias", gate.bias)
    H = bank.d_hidden
    w = bank.w_in.detach().transpose(1, 2)  # [E, D, 2H], [gate | up]
    gate_up = torch.empty_like(w)
    gate_up[..., 0::2], gate_up[..., 1::2] = w[..., :H], w[..., H:]
    b = bank.b_in.detach()
    gate_up_b = torch.empty_like(b)
    gate_up_b[:, 0::2], gate_up_b[:, 1::2] = b[:, :H], b[:, H:]
    _set_param(experts, "gate_up_proj", gate_up)
    _set_param(experts, "gate_up_proj_bias", gate_up_b)
    _set_param(experts, "down_proj", bank.w_out.detach().transpose(1, 2))
    _set_param(experts, "down_proj_bias", bank.b_out)


# --------------------------------------------------------------------------- Llama 4
def _llama4_config(block: nn.Module) -> MoEConfig:
    router, experts, mlp = _get(block, "router"), _get(block, "experts"), _get(block, "shared_expert")
    E, D = router.weight.shape
    return _layer_config(
        d_model=D,
        n_experts=E,
        d_hidden=_get(experts, "down_proj").shape[1],
        gate="sigmoid",
        k=int(router.top_k),
        activation=_glu_name(experts.act_fn),
        n_shared_experts=1,
        d_shared_hidden=_get(mlp, "gate_proj.weight").shape[0],
        gate_kwargs={"normalize": False},
    )


def _llama4_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    router, experts = block.router, block.experts
    gate = _built(lambda: HFSigmoidTopKGate(config.d_model, config.n_experts, k=config.k), weight=router.weight)
    # Llama 4 stores the experts transposed: gate_up_proj [E, D, 2H] ([gate | up]), down_proj [E, H, D].
    gate_up, down = _get(experts, "gate_up_proj"), _get(experts, "down_proj")
    bank = _built(
        lambda: ExpertBank(config.n_experts, config.d_model, config.d_hidden, config.activation),
        w_in=gate_up.detach().transpose(1, 2).requires_grad_(gate_up.requires_grad),
        w_out=down.detach().transpose(1, 2).requires_grad_(down.requires_grad),
    )
    moe = InputScaledMoE.from_config(config, gate=gate, experts=bank, shared=_shared_mlp(block.shared_expert))
    return moe, {"router_tap": router_tap(router), "returns_router_logits": True}


def _write_llama4(adapter: HFMoEBlock, block: nn.Module) -> None:
    moe, router, experts = adapter.moe, block.router, block.experts
    gate, bank = moe.gate, moe.experts
    if not isinstance(moe, InputScaledMoE):
        raise ValueError("to_hf: Llama 4 scales the experts' inputs by the routing weights (InputScaledMoE)")
    if not isinstance(gate, SigmoidGate) or gate.normalize or gate.scale != 1.0 or gate.balancer is not None:
        raise ValueError("to_hf: Llama 4 needs an unnormalised, unscaled sigmoid gate without a selection bias")
    if not isinstance(moe.shared, SharedExperts):
        raise ValueError("to_hf: Llama 4 blocks have one ungated shared expert (MoE.shared)")
    _check_same("top_k", gate.k, int(router.top_k))
    _check_same("expert activation", bank.act.name, _glu_name(experts.act_fn))
    _check_same("expert biases", bank.has_bias, False)
    _check_shape("experts.gate_up_proj (transposed)", bank.w_in.transpose(1, 2), experts.gate_up_proj)
    _check_shape("router weight", gate.weight, router.weight)
    _set_param(router, "weight", gate.weight)
    _set_param(experts, "gate_up_proj", bank.w_in.detach().transpose(1, 2))
    _set_param(experts, "down_proj", bank.w_out.detach().transpose(1, 2))
    _shared_to_mlp(moe.shared, block.shared_expert)


# ----------------------------------------- generic: the original router, fused experts
@dataclass(frozen=True)
class Layout:
    """Where the parts of a block of the common transformers >= 5 shape live.

    The block computes ``experts(x, *router(x, *router_args)[1:]) (+ shared(x))``: a
    ``*TopKRouter`` returning ``(logits, weights, indices)``, fused experts
    (``gate_up_proj [E, 2H, D]``, ``down_proj [E, D, H]``, a GLU ``act_fn``) and optionally a
    shared-expert MLP, scaled by ``sigmoid(shared_gate(x))`` when ``shared_gate`` is set.
    """

    router: str = "gate"
    router_args: tuple[str, ...] = ()
    """Block attributes passed to the router after the hidden states (None where absent)."""
    shared: str | None = None
    shared_gate: str | None = None
    batched_input: bool = False
    """The router unpacks a ``[B, S, D]`` input (it gets ``[1, T, D]``)."""
    jitter: str | None = None
    """Block attribute holding a Mixtral-style multiplicative input jitter (training only)."""
    refuse: Callable[[nn.Module], str | None] | None = None
    """Why a block of this class cannot be converted (a setting gatedmoe does not express)."""
    activation: Callable[[nn.Module], nn.Module] | None = None
    """The experts' gate function as a built gatedmoe activation, read off the experts module
    (None: the GLU of their ``act_fn``)."""
    routed_scale: str | None = None
    """Block attribute holding a factor the block multiplies the routed output by (`HFRoutedScaleMoE`)."""
    post_norm: str | None = None
    """Block attribute holding a norm applied to the block's output (`HFMoEBlock.post_norm`)."""
    token_ids: str | None = None
    """Block attribute that is true when the router takes the input ids (DeepSeek-V4's ``is_hash``)."""
    router_state: bool = False
    """The router takes the previous layer's router states and returns the next
    (`HFStatefulRouterGate`; the block returns ``(hidden, states)``)."""
    flat_io: bool = False
    """The block takes flattened tokens and returns ``(hidden.flatten(), logits.flatten())``."""
    returns_router_scores: bool = False
    """The block returns ``(hidden, router_scores [T, K])`` as GPT-OSS's does."""
    transposed: bool = False
    """Fused GLU weights stored ``[in, out]``: ``gate_up_proj [E, D, 2H]`` (``[gate | up]`` in
    the last dimension), ``down_proj [E, H, D]`` (Aria's, ``is_transposed=True``)."""
    glu: bool = True
    """False: plain experts ``down(act(up(x)))``, weights ``up_proj [E, H, D]`` and
    ``down_proj [E, D, H]`` (Nemotron-H), activation from ``act_fn``."""


def _generic_config(layout: Layout) -> Callable[[nn.Module], MoEConfig]:
    def config(block: nn.Module) -> MoEConfig:
        why = layout.refuse(block) if layout.refuse is not None else None
        if why:
            raise TypeError(f"{type(block).__name__}: {why}")
        router, experts = _get(block, layout.router), _get(block, "experts")
        w_in = _get(experts, "gate_up_proj" if layout.glu else "up_proj")
        E, D = (w_in.shape[0], w_in.shape[1]) if layout.transposed else (w_in.shape[0], w_in.shape[2])
        d_hidden = _get(experts, "down_proj").shape[1 if layout.transposed else -1]
        k = _attr(router, "top_k", "num_experts_per_tok") if any(hasattr(router, n) for n in ("top_k", "num_experts_per_tok")) else None
        if k is None:
            k = getattr(block, "top_k", None) or getattr(getattr(block, "config", None), "num_experts_per_tok", None)
        if k is None:
            raise TypeError(f"{type(block).__name__}: cannot find the router's top_k")
        mlp = getattr(block, layout.shared) if layout.shared else None
        if layout.activation is not None:
            act = layout.activation(experts).name
        else:
            act = _glu_name(experts.act_fn) if layout.glu else _plain_act_name(experts.act_fn)
        return _layer_config(
            d_model=int(D),
            n_experts=int(E),
            d_hidden=int(d_hidden),
            gate=HFRouterGate.registry_name,
            k=int(k),
            activation=act,
            bias=getattr(experts, "gate_up_proj_bias", None) is not None,
            n_shared_experts=0 if mlp is None else 1,
        )

    return config


def _copy_module(module: nn.Module) -> nn.Module:
    """A deep copy with every parameter and buffer cloned (``requires_grad`` kept)."""
    return copy.deepcopy(module)


def _generic_parts(layout: Layout) -> Callable[[nn.Module, MoEConfig], tuple[MoE, dict[str, Any]]]:
    def parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
        router = _copy_module(_get(block, layout.router))
        args = {n: getattr(block, n, None) for n in layout.router_args}
        args = {n: (t if t is None else (_param(t) if isinstance(t, nn.Parameter) else t.detach().clone())) for n, t in args.items()}
        token_ids = bool(getattr(block, layout.token_ids, False)) if layout.token_ids else False
        if layout.router_state:
            gate = HFStatefulRouterGate(router, d_model=config.d_model, n_experts=config.n_experts, k=config.k)
        else:
            gate = HFRouterGate(
                router, d_model=config.d_model, n_experts=config.n_experts, k=config.k, router_args=args,
                batched_input=layout.batched_input, token_ids=token_ids,
            )  # fmt: skip
        mlp = getattr(block, layout.shared) if layout.shared else None
        shared = None
        if mlp is not None:
            sgate = getattr(block, layout.shared_gate) if layout.shared_gate else None
            shared = HFSharedExperts(_copy_module(mlp), None if sgate is None else _copy_module(sgate))
        act = None if layout.activation is None else layout.activation(block.experts)
        if layout.transposed:
            experts = _transposed_experts(config, block.experts, act)
        else:
            experts = _fused_experts(config, block.experts, act) if layout.glu else _plain_experts(config, block.experts)
        if layout.routed_scale:
            scale = float(_get(block, layout.routed_scale))
            moe = HFRoutedScaleMoE.from_config(config, gate=gate, experts=experts, shared=shared, routed_scale=scale)
        else:
            moe = MoE.from_config(config, gate=gate, experts=experts, shared=shared)
        jitter = float(getattr(block, layout.jitter, 0.0) or 0.0) if layout.jitter else 0.0
        kw: dict[str, Any] = {
            "jitter_noise": jitter, "returns_router_scores": layout.returns_router_scores, "flat_io": layout.flat_io,
        }  # fmt: skip
        if layout.post_norm:
            kw["post_norm"] = _copy_module(_get(block, layout.post_norm))
        return moe, kw

    return parts


def _copy_tensors(dst: nn.Module, src: nn.Module) -> None:
    """Give ``dst`` copies of every parameter and buffer of ``src`` (same structure)."""
    for name, t in [*src.named_parameters(), *src.named_buffers()]:
        owner_name, _, leaf = name.rpartition(".")
        owner = dst.get_submodule(owner_name) if owner_name else dst
        old = getattr(owner, leaf)
        _check_shape(name, t, old)
        if isinstance(old, nn.Parameter):
            _set_param(owner, leaf, t)
        else:
            setattr(owner, leaf, t.detach().clone())


def _generic_write(layout: Layout) -> Callable[[HFMoEBlock, nn.Module], None]:
    def write(adapter: HFMoEBlock, block: nn.Module) -> None:
        moe = adapter.moe
        if not isinstance(moe.gate, HFRouterGate):
            raise ValueError(f"to_hf: {type(block).__name__} is converted with its own router (HFRouterGate), got {type(moe.gate).__name__}")
        router = _get(block, layout.router)
        _check_same("router class", type(moe.gate.router).__name__, type(router).__name__)
        _copy_tensors(router, moe.gate.router)
        for n in moe.gate.router_args:
            t = getattr(moe.gate, n)
            if t is not None:
                if isinstance(getattr(block, n), nn.Parameter):
                    _set_param(block, n, t)
                else:
                    setattr(block, n, t.detach().clone())
        _check_same("router takes the input ids", moe.gate.uses_token_ids, bool(getattr(block, layout.token_ids, False)) if layout.token_ids else False)
        scale = float(_get(block, layout.routed_scale)) if layout.routed_scale else None
        _check_same("routed output scale", getattr(moe, "routed_scale", None), scale)
        if layout.transposed:
            _write_transposed_experts(moe.experts, block.experts, None if layout.activation is None else layout.activation(block.experts))
        elif layout.glu:
            _write_fused_experts(moe.experts, block.experts, None if layout.activation is None else layout.activation(block.experts))
        else:
            _write_plain_experts(moe.experts, block.experts)
        if (adapter.post_norm is None) != (layout.post_norm is None):
            raise ValueError(f"to_hf: a norm after the block differs between gatedmoe and {type(block).__name__}")
        if layout.post_norm:
            _copy_tensors(_get(block, layout.post_norm), adapter.post_norm)
        mlp = getattr(block, layout.shared) if layout.shared else None
        if (mlp is None) != (moe.shared is None):
            raise ValueError(f"to_hf: shared experts differ between gatedmoe and {type(block).__name__}")
        if mlp is not None:
            _copy_tensors(mlp, moe.shared.mlp)
            if layout.shared_gate:
                _copy_tensors(getattr(block, layout.shared_gate), moe.shared.gate)

    return write


def _generic(name: str, layout: Layout = Layout()) -> Family:
    return Family(name, _generic_config(layout), _generic_parts(layout), _generic_write(layout))


def _cohere2_refuse(block: nn.Module) -> str | None:
    strategy = getattr(block, "shared_expert_combination_strategy", "sum")
    if getattr(block, "num_shared_experts", 0) > 0 and strategy != "sum":
        return f"shared_expert_combination_strategy={strategy!r} (gatedmoe adds shared experts: 'sum' only)"
    return None


def _limited_swiglu(limit: str, *, act_fn: bool = False, clamp: str = "input") -> Callable[[nn.Module], nn.Module]:
    """Reads `LimitedSwiGLU` off experts whose ``_apply_gate`` clamps a SwiGLU at the
    attribute ``limit``; with ``act_fn`` their ``act_fn`` must be SiLU (it is the GLU's)."""

    def read(experts: nn.Module) -> nn.Module:
        if act_fn:
            _check_same("expert activation (act_fn) of the clamped GLU", _glu_name(experts.act_fn), "swiglu")
        return LimitedSwiGLU(float(_get(experts, limit)), clamp=clamp)

    return read


def _clamped_swiglu(alpha: str, limit: str) -> Callable[[nn.Module], nn.Module]:
    """Reads GPT-OSS's clamped SwiGLU (on a concatenated ``[gate | up]`` layout: MiniMax-M3,
    the privacy filter) off the experts' attributes ``alpha`` and ``limit``."""

    def read(experts: nn.Module) -> nn.Module:
        return ClampedSwiGLU(alpha=float(_get(experts, alpha)), limit=float(_get(experts, limit)))

    return read


def _softcapped_swiglu(experts: nn.Module) -> nn.Module:
    act = _get(experts, "act_fn")
    return SoftcappedSwiGLU(float(_get(act, "gate_softcap.softcap")), float(_get(act, "up_softcap.softcap")))


def _nemotron_h_refuse(block: nn.Module) -> str | None:
    if not isinstance(getattr(block, "fc1_latent_proj", None), nn.Identity):
        return "moe_latent_size is set (the experts run in a latent space between two projections; not converted)"
    return None


def _float32_swiglu(experts: nn.Module) -> nn.Module:
    _check_same("expert activation (act_fn) of the float32 GLU", _glu_name(experts.act_fn), "swiglu")
    return Float32SwiGLU()


_DS = Layout(shared="shared_experts")  # DeepSeek-V2 shape: gate, fused experts, + shared_experts(x)
_PLAIN = Layout()
_GATED_SHARED = Layout(shared="shared_expert", shared_gate="shared_expert_gate")

# Block class name -> (family, layout), each checked against transformers on a tiny random
# model in tests/interop/test_hf_generic.py.
GENERIC: dict[str, tuple[str, Layout]] = {
    "DeepseekV2Moe": ("deepseek_v2", _DS),
    "DeepseekV32MoE": ("deepseek_v32", _DS),
    "Dots1MoE": ("dots1", _DS),
    "ExaoneMoeSparseMoEBlock": ("exaone_moe", _DS),
    "Glm4MoeMoE": ("glm4_moe", _DS),
    "Glm4MoeLiteMoE": ("glm4_moe_lite", _DS),
    "Glm4vMoeTextMoE": ("glm4v_moe", _DS),
    "GlmMoeDsaMoE": ("glm_moe_dsa", _DS),
    "Kolibri1SparseMoeBlock": ("kolibri1", _DS),
    "AXK2MoE": ("axk2", _DS),
    "MistralLarge4TextMoE": ("mistral_large4", _DS),
    "Mistral4MoE": ("mistral4", _DS),
    "DeepseekOcr2TextMoe": ("deepseek_ocr2", _DS),
    "UnlimitedOcrTextMoe": ("unlimited_ocr", _DS),
    "Dots3NoteTextMoE": ("dots3_note", _DS),
    "SolarOpenMoE": ("solar_open", _DS),
    "KimiLinearMoE": ("kimi_linear", _DS),
    "Ernie4_5_MoeSparseMoeBlock": ("ernie4_5_moe", _DS),
    "Cohere2MoeSparseMoeBlock": ("cohere2_moe", Layout(shared="shared_experts", refuse=_cohere2_refuse)),
    "HunYuanMoEV1Moe": ("hunyuan_v1_moe", Layout(shared="shared_mlp")),
    # enable_moe_fp32_combine adds the routed and shared outputs in float32: the same sum
    # as in the input dtype except where their exponents differ by more than 16.
    "HYV3MoE": ("hy_v3", Layout(router_args=("e_score_correction_bias",), shared="shared_experts")),
    "FlintSparseMoeBlock": ("flint", Layout(shared="shared_expert")),
    "LaraMiniSparseMoeBlock": ("lara_mini", Layout(shared="shared_expert")),
    "Qwen3NextSparseMoeBlock": ("qwen3_next", _GATED_SHARED),
    "Qwen3_5MoeSparseMoeBlock": ("qwen3_5_moe", _GATED_SHARED),
    "Qwen4ExpTextSparseMoeBlock": ("qwen4_exp", _GATED_SHARED),
    "Qwen3VLMoeTextSparseMoeBlock": ("qwen3_vl_moe", _PLAIN),
    "FlexOlmoSparseMoeBlock": ("flex_olmo", _PLAIN),
    "MellumSparseMoeBlock": ("mellum", _PLAIN),
    "MiMoV2FlashMoE": ("mimo_v2_flash", _PLAIN),
    "JambaSparseMoeBlock": ("jamba", Layout(router="router")),
    "GraniteMoeMoE": ("granitemoe", Layout(router="router")),
    "GraniteMoeSharedMoE": ("granitemoeshared", Layout(router="router")),
    "GraniteMoeHybridMoE": ("granitemoehybrid", Layout(router="router")),
    "GraniteMoeSWAMoE": ("granitemoe_swa", Layout(router="router")),
    "PhimoeSparseMoeBlock": ("phimoe", Layout(router="router", jitter="input_jitter_noise")),
    "MiniMaxSparseMoeBlock": ("minimax", Layout(jitter="jitter_noise")),
    "MiniMaxM2SparseMoeBlock": ("minimax_m2", Layout(router_args=("e_score_correction_bias",), jitter="jitter_noise")),
    "Lfm2MoeSparseMoeBlock": ("lfm2_moe", Layout(router_args=("expert_bias",))),
    "AfmoeSparseMoeBlock": ("afmoe", Layout(router="router", router_args=("expert_bias",), batched_input=True, shared="shared_experts")),
    "LagunaSparseMoeBlock": ("laguna", Layout(shared="shared_experts", routed_scale="routed_scaling_factor")),
    "AXK1MoE": ("axk1", Layout(shared="shared_experts", post_norm="post_mlp_layernorm")),
    "Glm5NextTextMoE": ("glm5_next", Layout(shared="shared_experts", activation=_limited_swiglu("swiglu_limit"))),
    "HYV4MoE": ("hy_v4", Layout(shared="shared_experts", activation=_limited_swiglu("swiglu_limit"))),
    "HYV4VLMoE": ("hy_v4_vl", Layout(shared="shared_experts", activation=_limited_swiglu("swiglu_limit"))),
    "DeepseekV4SparseMoeBlock": (
        "deepseek_v4", Layout(shared="shared_experts", activation=_limited_swiglu("limit", act_fn=True), token_ids="is_hash"),
    ),
    "Step3p7SparseMoeBlock": (
        "step3p7",
        Layout(shared="shared_experts", routed_scale="routed_scaling_factor", activation=_limited_swiglu("limit", act_fn=True, clamp="output")),
    ),
    "BeamMoE": ("beam", Layout(routed_scale="routed_scaling_factor", activation=_float32_swiglu)),
    "MiniMaxM3VLSparseMoeBlock": (
        "minimax_m3_vl", Layout(shared="shared_experts", routed_scale="routed_scaling_factor", activation=_clamped_swiglu("swiglu_alpha", "swiglu_limit")),
    ),
    "Inkling2SparseMoeBlock": ("inkling2", Layout(activation=_softcapped_swiglu)),
    "Inkling2LoopSparseMoeBlock": ("inkling2_loop", Layout(activation=_softcapped_swiglu)),
    "BailingHybridMoE": ("bailing_hybrid", _DS),
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": ("qwen3_omni_moe", _PLAIN),
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": ("qwen3_omni_moe", _GATED_SHARED),
    "ZayaSparseMoeBlock": ("zaya", Layout(router_state=True)),
    "OpenAIPrivacyFilterMLP": (
        "openai_privacy_filter",
        # Its experts' eager loop upcasts to float32; a model runs them through grouped_mm
        # (``@use_experts_implementation``), in the model's dtype, as gatedmoe does.
        Layout(
            router="router", transposed=True, routed_scale="num_experts", activation=_clamped_swiglu("alpha", "limit"),
            returns_router_scores=True,
        ),
    ),
    # Ernie-4.5-VL's per-modality blocks (text_moe, vision_moe); the block choosing between
    # them by token type (Ernie4_5_VLMoeMoeBlock) stays and calls them.
    "Ernie4_5_VLMoeSparseMoeBlock": ("ernie4_5_vl_moe", Layout(flat_io=True)),
    "AriaTextMoELayer": ("aria", Layout(router="router", shared="shared_experts", transposed=True)),
    "NemotronHMoE": ("nemotron_h", Layout(shared="shared_experts", glu=False, refuse=_nemotron_h_refuse)),
}


# ---------------------------------------------------------------- Switch Transformers
# transformers activation classes -> gatedmoe's plain (non-GLU) activation with the same math.
_PLAIN_OF_HF_ACT = {"ReLU": "relu", "SiLUActivation": "silu", "SiLU": "silu", "ReLUSquaredActivation": "relu2"}


def _plain_act_name(act_fn: nn.Module) -> str:
    name = type(act_fn).__name__
    if name not in _PLAIN_OF_HF_ACT:
        raise ValueError(f"unsupported expert activation {name}; gatedmoe converts {sorted(_PLAIN_OF_HF_ACT)}")
    return _PLAIN_OF_HF_ACT[name]


def _switch_experts(block: nn.Module) -> list[nn.Module]:
    experts = _get(block, "experts")
    E = int(_get(block, "router.num_experts"))
    return [_get(experts, f"expert_{e}") for e in range(E)]


def _switch_config(block: nn.Module) -> MoEConfig:
    router, experts = _get(block, "router"), _switch_experts(block)
    E, D = _get(router, "classifier.weight").shape
    if getattr(experts[0].wi, "bias", None) is not None or getattr(experts[0].wo, "bias", None) is not None:
        raise TypeError(f"{type(block).__name__}: experts with biases (Switch Transformers' have none)")
    return _layer_config(
        d_model=int(D),
        n_experts=int(E),
        d_hidden=int(experts[0].wi.weight.shape[0]),
        gate=HFSwitchRouterGate.registry_name,
        k=1,
        activation=_plain_act_name(experts[0].act),
    )


def _stacked(ts: list[Tensor]) -> Tensor:
    return torch.stack([t.detach() for t in ts]).requires_grad_(ts[0].requires_grad)


def _switch_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    experts = _switch_experts(block)
    gate = HFSwitchRouterGate(_copy_module(block.router), d_model=config.d_model, n_experts=config.n_experts)
    # DenseActDense: wo(act(wi(x))), wi [H, D] and wo [D, H] per expert -> w_in [E, H, D], w_out [E, D, H].
    bank = _built(
        lambda: ExpertBank(config.n_experts, config.d_model, config.d_hidden, config.activation),
        w_in=_stacked([m.wi.weight for m in experts]),
        w_out=_stacked([m.wo.weight for m in experts]),
    )
    moe = MoE.from_config(config, gate=gate, experts=bank)
    return moe, {"expert_dropout": float(getattr(experts[0].dropout, "p", 0.0))}


def _write_switch(adapter: HFMoEBlock, block: nn.Module) -> None:
    moe, experts = adapter.moe, _switch_experts(block)
    gate, bank = moe.gate, moe.experts
    if not isinstance(gate, HFSwitchRouterGate):
        raise ValueError(f"to_hf: {type(block).__name__} is converted with its own router (HFSwitchRouterGate), got {type(gate).__name__}")
    if moe.shared is not None or moe.capacity_factor is not None:
        raise ValueError(f"to_hf: {type(block).__name__} has no shared experts and no capacity beyond its router's")
    _check_same("router class", type(gate.router).__name__, type(block.router).__name__)
    _check_same("expert activation", bank.act.name, _plain_act_name(experts[0].act))
    _check_same("expert biases", bank.has_bias, False)
    _check_shape("experts' wi (stacked)", bank.w_in, _stacked([m.wi.weight for m in experts]))
    _check_shape("experts' wo (stacked)", bank.w_out, _stacked([m.wo.weight for m in experts]))
    _copy_tensors(block.router, gate.router)
    for e, m in enumerate(experts):
        _set_param(m.wi, "weight", bank.w_in[e])
        _set_param(m.wo, "weight", bank.w_out[e])


# ------------------------------------------------------------------------------ DBRX
def _dbrx_config(block: nn.Module) -> MoEConfig:
    router, mlp = _get(block, "router"), _get(block, "experts.mlp")
    E, D = _get(router, "layer.weight").shape
    return _layer_config(
        d_model=int(D),
        n_experts=int(E),
        d_hidden=int(mlp.w1.shape[0]) // int(E),
        gate=HFLpNormRouterGate.registry_name,
        k=int(_get(block, "top_k")),
        activation=_glu_name(mlp.activation_fn),
    )


def _dbrx_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    mlp = block.experts.mlp
    E, H, D = config.n_experts, config.d_hidden, config.d_model
    gate = HFLpNormRouterGate(
        _copy_module(block.router), d_model=D, n_experts=E, k=config.k, norm_p=block.moe_normalize_expert_weights
    )
    # DbrxExpertGLU: (act(x w1_e^T) * x v1_e^T) @ w2_e, each of
    # w1, v1, w2 stored flat as [E*H, D] -> w_in = [w1_e | v1_e] [E, 2H, D], w_out = w2_e^T [E, D, H].
    w1, v1, w2 = (t.detach().view(E, H, D) for t in (mlp.w1, mlp.v1, mlp.w2))
    bank = _built(
        lambda: ExpertBank(E, D, H, config.activation),
        w_in=torch.cat([w1, v1], 1).requires_grad_(mlp.w1.requires_grad),
        w_out=w2.transpose(1, 2).requires_grad_(mlp.w2.requires_grad),
    )
    return MoE.from_config(config, gate=gate, experts=bank), {}


def _write_dbrx(adapter: HFMoEBlock, block: nn.Module) -> None:
    moe, mlp = adapter.moe, block.experts.mlp
    gate, bank = moe.gate, moe.experts
    if not isinstance(gate, HFLpNormRouterGate):
        raise ValueError(f"to_hf: DBRX is converted with its own router (HFLpNormRouterGate), got {type(gate).__name__}")
    if moe.shared is not None or moe.capacity_factor is not None:
        raise ValueError("to_hf: DBRX blocks have no shared experts and no capacity")
    _check_same("router class", type(gate.router).__name__, type(block.router).__name__)
    _check_same("top_k", gate.k, int(block.top_k))
    _check_same("moe_normalize_expert_weights", gate.norm_p, block.moe_normalize_expert_weights)
    _check_same("expert activation", bank.act.name, _glu_name(mlp.activation_fn))
    _check_same("expert biases", bank.has_bias, False)
    E, H, D = bank.n_experts, bank.d_hidden, bank.d_model
    _check_same("shape of the flat expert weights [E*H, D]", (E * H, D), tuple(mlp.w1.shape))
    _copy_tensors(block.router, gate.router)
    w = bank.w_in.detach()
    _set_param(mlp, "w1", w[:, :H].reshape(E * H, D))
    _set_param(mlp, "v1", w[:, H:].reshape(E * H, D))
    _set_param(mlp, "w2", bank.w_out.detach().transpose(1, 2).reshape(E * H, D))


# ---------------------------------------------------------------------------- JetMoE
def _jetmoe_config(block: nn.Module) -> MoEConfig:
    router = _get(block, "router")
    E, D = _get(router, "layer.weight").shape
    return _layer_config(
        d_model=int(D),
        n_experts=int(E),
        d_hidden=int(_get(block, "output_linear.weight").shape[-1]),
        gate=HFJetMoeRouterGate.registry_name,
        k=int(router.top_k),
        activation=_glu_name(block.activation),
        n_shared_experts=1,
    )


def _jetmoe_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    gate = HFJetMoeRouterGate(_copy_module(block.router), d_model=config.d_model, n_experts=config.n_experts, k=config.k)
    # input_linear [E, 2H, D], chunked [gate | up]; output_linear [E, D, H]: gatedmoe's layout.
    bank = _built(
        lambda: ExpertBank(config.n_experts, config.d_model, config.d_hidden, config.activation),
        w_in=block.input_linear.weight,
        w_out=block.output_linear.weight,
    )
    bias = _built(lambda: HFOutputBias(config.d_model), bias=_get(block, "bias"))
    return MoE.from_config(config, gate=gate, experts=bank, shared=bias), {}


def _write_jetmoe(adapter: HFMoEBlock, block: nn.Module) -> None:
    moe = adapter.moe
    gate, bank = moe.gate, moe.experts
    if not isinstance(gate, HFJetMoeRouterGate):
        raise ValueError(f"to_hf: JetMoE is converted with its own router (HFJetMoeRouterGate), got {type(gate).__name__}")
    if not isinstance(moe.shared, HFOutputBias) or moe.capacity_factor is not None:
        raise ValueError("to_hf: JetMoE blocks add an output bias (HFOutputBias as MoE.shared) and have no capacity")
    _check_same("router class", type(gate.router).__name__, type(block.router).__name__)
    _check_same("top_k", gate.k, int(block.router.top_k))
    _check_same("expert activation", bank.act.name, _glu_name(block.activation))
    _check_same("expert biases", bank.has_bias, False)
    _check_shape("input_linear.weight", bank.w_in, block.input_linear.weight)
    _check_shape("output_linear.weight", bank.w_out, block.output_linear.weight)
    _copy_tensors(block.router, gate.router)
    _set_param(block.input_linear, "weight", bank.w_in)
    _set_param(block.output_linear, "weight", bank.w_out)
    _set_param(block, "bias", moe.shared.bias)


# ---------------------------------------------------------------------- LongCat-Flash
# The names under which the unused gate_up_proj rows of the zero-computation experts are kept.
_ZERO_ROWS = "zero_experts_gate_up_proj"


def _longcat_config(block: nn.Module) -> MoEConfig:
    router, experts = _get(block, "router"), _get(block, "experts")
    gate_up, down = _get(experts, "gate_up_proj"), _get(experts, "down_proj")
    if gate_up is None or down is None:
        raise TypeError(f"{type(block).__name__}: no feed-forward experts (n_routed_experts=0)")
    # The router module is kept as it is (its forward reads classifier.weight only).
    E, D = _get(router, "classifier.weight").shape
    _check_same("experts (router outputs)", int(E), int(gate_up.shape[0]))
    return _layer_config(
        d_model=int(D),
        n_experts=int(E),
        d_hidden=int(down.shape[-1]),
        gate=HFRouterGate.registry_name,
        k=int(router.top_k),
        activation=_glu_name(experts.act_fn),
    )


def _longcat_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    experts = block.experts
    E_f = int(experts.down_proj.shape[0])
    gate = HFRouterGate(_copy_module(block.router), d_model=config.d_model, n_experts=config.n_experts, k=config.k)
    gate_up = experts.gate_up_proj.detach()
    # gate_up_proj has a row block for every expert, the identity ones included (never read).
    bank = _built(
        lambda: ExpertBank(E_f, config.d_model, config.d_hidden, config.activation),
        w_in=gate_up[:E_f].requires_grad_(experts.gate_up_proj.requires_grad),
        w_out=experts.down_proj,
    )
    moe = ZeroComputeMoE.from_config(config, gate=gate, experts=bank, n_zero_experts=config.n_experts - E_f)
    kept = {_ZERO_ROWS: _param(gate_up[E_f:].requires_grad_(experts.gate_up_proj.requires_grad))}
    return moe, {"kept": kept}


def _write_longcat(adapter: HFMoEBlock, block: nn.Module) -> None:
    moe, experts = adapter.moe, block.experts
    gate, bank = moe.gate, moe.experts
    if not isinstance(moe, ZeroComputeMoE) or not isinstance(gate, HFRouterGate):
        raise ValueError("to_hf: LongCat-Flash is converted to a ZeroComputeMoE with its own router (HFRouterGate)")
    if moe.shared is not None or moe.capacity_factor is not None:
        raise ValueError("to_hf: LongCat-Flash MoE blocks have no shared experts and no capacity")
    _check_same("router class", type(gate.router).__name__, type(block.router).__name__)
    _check_same("zero-computation experts", moe.n_zero_experts, int(experts.zero_expert_num))
    _check_same("expert activation", bank.act.name, _glu_name(experts.act_fn))
    _check_same("expert biases", bank.has_bias, False)
    _check_shape("experts.down_proj", bank.w_out, experts.down_proj)
    kept = None if adapter.kept is None else adapter.kept[_ZERO_ROWS]
    if kept is None:
        raise ValueError("to_hf: the LongCat-Flash block keeps the gate_up_proj rows of its zero-computation experts")
    _copy_tensors(block.router, gate.router)
    gate_up = torch.cat([bank.w_in.detach(), kept.detach()], 0).requires_grad_(bank.w_in.requires_grad)
    _check_shape("experts.gate_up_proj", gate_up, experts.gate_up_proj)
    _set_param(experts, "gate_up_proj", gate_up)
    _set_param(experts, "down_proj", bank.w_out)


# ---------------------------------------------------------------------------- Inkling
def _inkling_config(block: nn.Module) -> MoEConfig:
    router, experts, shared = _get(block, "gate"), _get(block, "experts"), _get(block, "shared_experts")
    E, D, S = int(experts.gate_up_proj.shape[0]), int(experts.gate_up_proj.shape[2]), int(shared.n_shared_experts)
    H = int(experts.down_proj.shape[-1])
    _check_same("shared experts' width (they join the routed experts' bank)", int(shared.down_proj.shape[-1]), H)
    _check_same("shared experts' activation", _glu_name(shared.act_fn), _glu_name(experts.act_fn))
    _check_same("router outputs (routed + shared experts)", int(router.weight.shape[0]), E + S)
    return _layer_config(
        d_model=D,
        n_experts=E + S,
        d_hidden=H,
        gate=HFSharedGammaRouterGate.registry_name,
        k=int(router.top_k) + S,
        activation=_glu_name(experts.act_fn),
    )


def _inkling_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    experts, shared = block.experts, block.shared_experts
    S = int(shared.n_shared_experts)
    gate = HFSharedGammaRouterGate(
        _copy_module(block.gate), d_model=config.d_model, n_routed=config.n_experts - S, n_shared=S, k=config.k - S
    )
    # The S shared experts (gate_proj, up_proj [S, H, D], down_proj [S, D, H]) follow the routed
    # ones in one bank: w_in = [gate | up].
    w_in = torch.cat([experts.gate_up_proj.detach(), torch.cat([shared.gate_proj.detach(), shared.up_proj.detach()], 1)])
    bank = _built(
        lambda: ExpertBank(config.n_experts, config.d_model, config.d_hidden, config.activation),
        w_in=w_in.requires_grad_(experts.gate_up_proj.requires_grad),
        w_out=torch.cat([experts.down_proj.detach(), shared.down_proj.detach()]).requires_grad_(experts.down_proj.requires_grad),
    )
    return MoE.from_config(config, gate=gate, experts=bank), {}


def _write_inkling(adapter: HFMoEBlock, block: nn.Module) -> None:
    moe, experts, shared = adapter.moe, block.experts, block.shared_experts
    gate, bank = moe.gate, moe.experts
    if not isinstance(gate, HFSharedGammaRouterGate):
        raise ValueError(f"to_hf: Inkling is converted with its own router (HFSharedGammaRouterGate), got {type(gate).__name__}")
    if moe.shared is not None or moe.capacity_factor is not None:
        raise ValueError("to_hf: Inkling's shared experts are experts of the bank; no MoE.shared, no capacity")
    _check_same("router class", type(gate.router).__name__, type(block.gate).__name__)
    _check_same("routed and shared experts", (gate.n_routed, gate.n_shared), (int(experts.gate_up_proj.shape[0]), int(shared.n_shared_experts)))
    _check_same("expert activation", bank.act.name, _glu_name(experts.act_fn))
    _check_same("expert biases", bank.has_bias, False)
    E, H = gate.n_routed, bank.d_hidden
    _check_shape("experts.gate_up_proj", bank.w_in[:E], experts.gate_up_proj)
    _copy_tensors(block.gate, gate.router)
    w_in, w_out = bank.w_in.detach(), bank.w_out.detach()
    _set_param(experts, "gate_up_proj", w_in[:E])
    _set_param(experts, "down_proj", w_out[:E])
    _set_param(shared, "gate_proj", w_in[E:, :H])
    _set_param(shared, "up_proj", w_in[E:, H:])
    _set_param(shared, "down_proj", w_out[E:])


# ------------------------------------------------------------------------------- Doge
def _doge_config(block: nn.Module) -> MoEConfig:
    E, D = _get(block, "down_embed.weight").shape
    return _layer_config(
        d_model=int(D),
        n_experts=int(E),
        d_hidden=1,
        gate=HFProductKeyGate.registry_name,
        k=int(_get(block, "top_k")),
        activation=_plain_act_name(block.act_fn),
        n_shared_experts=1,
        d_shared_hidden=int(_get(block, "gate_proj.weight").shape[0]),
    )


def _doge_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    gate = HFProductKeyGate(
        _copy_module(block.router_gate), d_model=config.d_model, n_experts=config.n_experts, k=config.k,
        normalize=bool(block.norm_topk_prob),
    )  # fmt: skip
    # Expert e is one hidden unit: f_e(x) = up_e * act(down_e . x), down_embed / up_embed [E, D].
    down, up = block.down_embed.weight, block.up_embed.weight
    bank = _built(
        lambda: ExpertBank(config.n_experts, config.d_model, 1, config.activation),
        w_in=down.detach().unsqueeze(1).requires_grad_(down.requires_grad),
        w_out=up.detach().unsqueeze(2).requires_grad_(up.requires_grad),
    )
    bias = block.gate_proj.bias is not None
    weights = _shared_mlp_weights(block)
    if bias:
        weights["w_in.bias"] = torch.cat([block.gate_proj.bias.detach(), block.up_proj.bias.detach()]).requires_grad_(block.gate_proj.bias.requires_grad)
        weights["w_out.bias"] = block.down_proj.bias
    shared = _built(
        lambda: SharedExperts(config.d_model, config.d_shared_hidden, activation=_glu_name(block.act_fn), bias=bias), **weights
    )
    moe = MoE.from_config(config, gate=gate, experts=bank, shared=shared)
    return moe, {"router_tap": router_tap(block), "returns_gate_logits": True}


def _write_doge(adapter: HFMoEBlock, block: nn.Module) -> None:
    moe = adapter.moe
    gate, bank, shared = moe.gate, moe.experts, moe.shared
    if not isinstance(gate, HFProductKeyGate) or not isinstance(shared, SharedExperts):
        raise ValueError("to_hf: Doge is converted with HFProductKeyGate and one shared MLP (SharedExperts)")
    _check_same("top_k", gate.k, int(block.top_k))
    _check_same("norm_topk_prob", gate.normalize, bool(block.norm_topk_prob))
    _check_same("expert activation", bank.act.name, _plain_act_name(block.act_fn))
    _check_same("expert width (one unit)", bank.d_hidden, 1)
    _check_shape("down_embed.weight", bank.w_in.squeeze(1), block.down_embed.weight)
    _copy_tensors(block.router_gate, gate.router_gate)
    _set_param(block.down_embed, "weight", bank.w_in.detach().squeeze(1))
    _set_param(block.up_embed, "weight", bank.w_out.detach().squeeze(2))
    _check_same("shared MLP biases", shared.w_in.bias is not None, block.gate_proj.bias is not None)
    _shared_to_mlp_with_bias(shared, block)


def _shared_to_mlp_with_bias(shared: SharedExperts, mlp: nn.Module) -> None:
    """`_shared_to_mlp` for an MLP whose projections may have biases."""
    _check_same("shared expert activation", shared.act.name, _glu_name(_mlp_act(mlp)))
    _check_shape("shared expert down_proj", shared.w_out.weight, mlp.down_proj.weight)
    for lin, w in zip((mlp.gate_proj, mlp.up_proj), shared.w_in.weight.chunk(2, dim=0), strict=True):
        _set_param(lin, "weight", w)
    _set_param(mlp.down_proj, "weight", shared.w_out.weight)
    if shared.w_in.bias is not None:
        for lin, b in zip((mlp.gate_proj, mlp.up_proj), shared.w_in.bias.chunk(2), strict=True):
            _set_param(lin, "bias", b)
        _set_param(mlp.down_proj, "bias", shared.w_out.bias)


# ------------------------------------------------------------------------- Muse-Spark
def _muse_spark_config(block: nn.Module) -> MoEConfig:
    router, experts = _get(block, "gate"), _get(block, "experts")
    E, D = router.weight.shape
    return _layer_config(
        d_model=int(D),
        n_experts=int(E),
        d_hidden=int(_get(experts, "down_proj").shape[-1]),
        gate=HFRouterGate.registry_name,
        k=int(router.top_k),
        activation=_glu_name(experts.act_fn),
    )


def _muse_spark_parts(block: nn.Module, config: MoEConfig) -> tuple[MoE, dict[str, Any]]:
    experts = block.experts
    M = int(experts.gate_up_proj.shape[-1])
    gate = HFRouterGate(_copy_module(block.gate), d_model=config.d_model, n_experts=config.n_experts, k=config.k)
    bank = _built(
        lambda: ExpertBank(config.n_experts, M, config.d_hidden, config.activation),
        w_in=experts.gate_up_proj,
        w_out=experts.down_proj,
    )
    moe = HFProjectedExpertsMoE.from_config(
        config, gate=gate, experts=bank, pre_proj=_copy_module(block.pre_expert_proj),
        pre_norm=_copy_module(block.pre_expert_norm), post_norm=_copy_module(experts.post_expert_norm),
        post_proj=_copy_module(block.post_expert_proj),
    )  # fmt: skip
    return moe, {}


def _write_muse_spark(adapter: HFMoEBlock, block: nn.Module) -> None:
    moe, experts = adapter.moe, block.experts
    if not isinstance(moe, HFProjectedExpertsMoE) or not isinstance(moe.gate, HFRouterGate):
        raise ValueError("to_hf: Muse-Spark is converted to an HFProjectedExpertsMoE with its own router (HFRouterGate)")
    if moe.shared is not None or moe.capacity_factor is not None:
        raise ValueError("to_hf: Muse-Spark MoE blocks have no shared experts and no capacity")
    _check_same("router class", type(moe.gate.router).__name__, type(block.gate).__name__)
    _copy_tensors(block.gate, moe.gate.router)
    _write_fused_experts(moe.experts, experts)
    for dst, src in (
        (block.pre_expert_proj, moe.pre_proj), (block.pre_expert_norm, moe.pre_norm),
        (experts.post_expert_norm, moe.post_norm), (block.post_expert_proj, moe.post_proj),
    ):  # fmt: skip
        _check_same("module class", type(src).__name__, type(dst).__name__)
        _copy_tensors(dst, src)


# --------------------------------------------------------------------------- registry
_MIXTRAL = Family("mixtral", _topk_config, _topk_parts, _write_topk)
_QWEN3 = Family("qwen3_moe", _topk_config, _topk_parts, _write_topk)
_OLMOE = Family("olmoe", _topk_config, _topk_parts, _write_topk)
_QWEN2 = Family("qwen2_moe", _qwen2_config, _qwen2_parts, _write_qwen2)
_DEEPSEEK_V3 = Family("deepseek_v3", _deepseek_v3_config, _deepseek_v3_parts, _write_deepseek_v3)
_GPT_OSS = Family("gpt_oss", _gpt_oss_config, _gpt_oss_parts, _write_gpt_oss)
_LLAMA4 = Family("llama4", _llama4_config, _llama4_parts, _write_llama4)
_DBRX = Family("dbrx", _dbrx_config, _dbrx_parts, _write_dbrx)
_JETMOE = Family("jetmoe", _jetmoe_config, _jetmoe_parts, _write_jetmoe)
_SWITCH = Family("switch_transformers", _switch_config, _switch_parts, _write_switch)
_LONGCAT = Family("longcat_flash", _longcat_config, _longcat_parts, _write_longcat)
_INKLING = Family("inkling", _inkling_config, _inkling_parts, _write_inkling)
_DOGE = Family("doge", _doge_config, _doge_parts, _write_doge)
_MUSE_SPARK = Family("muse_spark", _muse_spark_config, _muse_spark_parts, _write_muse_spark)

# Hugging Face block class name -> its family. Matched by exact class name, so subclasses
# (whose forward may differ) are not converted silently.
FAMILIES: dict[str, Family] = {
    "MixtralSparseMoeBlock": _MIXTRAL,
    "Qwen2MoeSparseMoeBlock": _QWEN2,
    "Qwen3MoeSparseMoeBlock": _QWEN3,
    "OlmoeSparseMoeBlock": _OLMOE,
    "DeepseekV3MoE": _DEEPSEEK_V3,
    "GptOssMLP": _GPT_OSS,
    "Llama4TextMoe": _LLAMA4,
    "SwitchTransformersSparseMLP": _SWITCH,
    "DbrxFFN": _DBRX,
    "JetMoeMoE": _JETMOE,
    "LongcatFlashMoE": _LONGCAT,
    "InklingMoE": _INKLING,
    "DogeCDMoE": _DOGE,
    "MuseSparkMoE": _MUSE_SPARK,
    **{cls: _generic(name, layout) for cls, (name, layout) in GENERIC.items()},
}


def family_of(block: nn.Module) -> Family:
    """The `Family` converting ``block``; TypeError listing the supported classes otherwise."""
    name = type(block).__name__
    if name not in FAMILIES:
        raise TypeError(f"unsupported Hugging Face MoE block {name}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
