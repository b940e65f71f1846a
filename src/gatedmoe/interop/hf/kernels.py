"""gatedmoe as a transformers ``experts_implementation``: ``from_pretrained(...,
experts_implementation="gatedmoe")`` runs the fused experts of every ``@use_experts_implementation``
class on gatedmoe's dispatch backends, on the model's own weights, without patching.

transformers 5.x looks the name up in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``
(an ``ExpertsInterface``, a ``GeneralInterface`` with a class-wide ``register``), both when
it validates ``experts_implementation`` (``PreTrainedModel.get_correct_experts_implementation``)
and at every experts forward (``use_experts_implementation``'s wrapper calls
``experts_interface.get_interface(config._experts_implementation, original_forward)``).
Importing `gatedmoe.interop.hf` registers :data:`NAME` (`register_experts_implementation`).

The router stays transformers' own (it runs before the experts call), so routing is the
original's by construction; gatedmoe executes ``experts(x, top_k_index, top_k_weights)``.

Shape legend: T tokens, D model dim, H expert hidden (H' = 2H for GLU), E experts, K experts
per token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from gatedmoe.autocast import outside_autocast
from gatedmoe.dispatch import check_backend_name, get_backend
from gatedmoe.routing import Routing

__all__ = ["NAME", "gatedmoe_experts_forward", "register_experts_implementation", "experts_view"]

NAME = "gatedmoe"
log = logging.getLogger(__name__)
_fallback_logged: set[str] = set()


@dataclass(frozen=True)
class _HFGateActivation:
    """The experts module's own activation as a gatedmoe activation: ``self._apply_gate(h)``
    (GLU; HF's column order, concatenated or interleaved) or ``self.act_fn(h)`` (plain).
    ``name`` is "swiglu" only where that is exactly transformers' default gate on SiLU, so
    the Triton backend fuses it; any other name makes Triton fall back to grouped (logged)."""

    name: str
    fn: Callable[[Tensor], Tensor]
    glu: bool

    def __call__(self, h: Tensor) -> Tensor:
        return self.fn(h)


@dataclass(frozen=True)
class _ExpertsView:
    """The attributes gatedmoe's dispatch backends read from an `ExpertBank`, as views of a
    transformers experts module's parameters (no copy: gradients reach its parameters).
    ``w_in [E, H', D]``, ``w_out [E, D, H]``, ``b_in [E, H']``, ``b_out [E, D]``."""

    w_in: Tensor
    w_out: Tensor
    b_in: Tensor | None
    b_out: Tensor | None
    act: _HFGateActivation
    n_experts: int
    active_lora: None = None

    @property
    def has_bias(self) -> bool:
        return self.b_in is not None


def _is_default_swiglu(experts: nn.Module) -> bool:
    from transformers.integrations.moe import _default_apply_gate

    act = getattr(experts, "act_fn", None)
    act_name = act.__name__ if type(act).__name__ == "function" else type(act).__name__
    gate = getattr(type(experts), "_apply_gate", None)
    return (
        act_name in ("SiLUActivation", "SiLU", "silu")
        and gate is _default_apply_gate
        and experts.is_concatenated
        and not experts.is_transposed
        and not experts.has_bias
    )


def experts_view(experts: nn.Module) -> _ExpertsView:
    """gatedmoe's view of a ``@use_experts_implementation`` experts module (see the module
    docstring). Weights stored ``[E, D, H']`` (``is_transposed``) are viewed transposed."""

    def w(t: Tensor) -> Tensor:
        return t.transpose(-2, -1) if experts.is_transposed else t

    if experts.has_gate:
        w_in, b_in = experts.gate_up_proj, getattr(experts, "gate_up_proj_bias", None)
        name = "swiglu" if _is_default_swiglu(experts) else f"hf:{type(experts).__name__}"
        act = _HFGateActivation(name, experts._apply_gate, glu=True)
    else:
        w_in, b_in = experts.up_proj, getattr(experts, "up_proj_bias", None)
        act = _HFGateActivation(f"hf:{type(experts).__name__}", experts.act_fn, glu=False)
    b_out = getattr(experts, "down_proj_bias", None)
    if not experts.has_bias:
        b_in = b_out = None
    return _ExpertsView(w(w_in), w(experts.down_proj), b_in, b_out, act, int(experts.num_experts))


def _unsupported(experts: nn.Module) -> str | None:
    if getattr(experts, "_is_expert_parallel", False):
        return "expert-parallel sentinel ids"
    if getattr(experts, "has_post_expert_norm", False):
        return "a norm after each expert (has_post_expert_norm)"
    return None


def gatedmoe_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *, backend: str = "auto"
) -> Tensor:
    """transformers' experts signature ``(self, x_TD, top_k_index [T, K], top_k_weights
    [T, K]) -> y_TD``, executed by gatedmoe's dispatch ``backend`` ("auto": Triton on CUDA,
    grouped GEMMs elsewhere). ``y_t = sum_j w_tj f_{i_tj}(x_t)``; the grouped backend sums
    each token's k weighted outputs in float32 and rounds once to ``x``'s dtype, as
    transformers' ``grouped_mm`` does. Under ``torch.autocast`` the products run in
    autocast's dtype (as transformers' eager experts, linear layers, do); the result has
    ``x``'s dtype. Blocks gatedmoe's backends do not run (a post-expert norm,
    expert-parallel sentinels) fall back to transformers' ``grouped_mm``, logged once."""
    reason = _unsupported(self)
    if reason is not None:
        from transformers.integrations.moe import grouped_mm_experts_forward

        if reason not in _fallback_logged:
            _fallback_logged.add(reason)
            log.warning("experts_implementation=%r: %s; using transformers' grouped_mm", NAME, reason)
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    view = experts_view(self)
    # The top-k weights keep their dtype (float32 from some routers): the product with the
    # expert output promotes as transformers' does.
    routing = Routing.from_topk(top_k_weights, top_k_index, n_experts=view.n_experts)
    dispatch = get_backend(backend, hidden_states.device)
    # Under autocast as transformers' eager experts (linear layers) run, and as `MoE` does.
    return outside_autocast(dispatch, hidden_states, routing, view).to(hidden_states.dtype)


def register_experts_implementation(name: str = NAME, backend: str = "auto") -> str:
    """Register gatedmoe's experts forward with transformers under ``name`` (default
    "gatedmoe"), running dispatch ``backend`` ("auto", "grouped", "triton"). Idempotent;
    returns ``name``. ValueError for a name that is not a non-empty string or that is one of
    transformers' own implementations ("eager", "grouped_mm", ...): the registry is
    process-wide, so that would change (or, for "eager", silently not change) every model.

    Examples
    --------
    >>> register_experts_implementation("gatedmoe_grouped", backend="grouped")  # doctest: +SKIP
    'gatedmoe_grouped'
    >>> AutoModelForCausalLM.from_pretrained(path, experts_implementation="gatedmoe_grouped")  # doctest: +SKIP
    """
    check_backend_name(backend)
    from transformers.integrations.moe import ExpertsInterface

    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    taken = getattr(ExpertsInterface, "_global_mapping", {}).get(name)
    if name == "eager" or (taken is not None and not getattr(taken, "_gatedmoe", False)):
        raise ValueError(f"name {name!r} is one of transformers' own experts implementations; choose another name")

    def forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return gatedmoe_experts_forward(self, hidden_states, top_k_index, top_k_weights, backend=backend)

    forward.__name__ = forward.__qualname__ = f"gatedmoe_experts_forward_{backend}"
    # Marks gatedmoe's registrations, which a later call may replace.
    forward._gatedmoe = True
    ExpertsInterface.register(name, forward)
    return name


def _register_default() -> None:
    """Register :data:`NAME` if transformers (5.x, with an ``ExpertsInterface``) is installed."""
    try:
        import transformers.integrations.moe as moe
    except ImportError:
        return
    if hasattr(moe, "ExpertsInterface"):
        register_experts_implementation()

