"""`MoE`: gate + expert bank + dispatch (+ shared experts, capacity), and `aux_loss`.

Shape legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe import gates as gate_registry
from gatedmoe.autocast import outside_autocast
from gatedmoe.dispatch import get_backend
from gatedmoe.dispatch.options import TritonOptions
from gatedmoe.experts.activations import (
    Activation,
    ExpandedGatedActivation,
    activation_names,
    resolve_activation,
)
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.gates.base import Gate
from gatedmoe.layers.config import MoEConfig
from gatedmoe.losses import (
    global_batch_balance_loss,
    load_balance_loss,
    router_z_loss,
    sequence_balance_loss,
)
from gatedmoe.routing import Routing
from gatedmoe.transient import TransientState
from gatedmoe.validation import boolean, check_finite, check_input, positive_int

__all__ = ["MoE", "MoEConfig", "SharedExperts", "GatedSharedExperts", "aux_loss", "balance_step"]


class SharedExperts(nn.Module):
    """Experts every token goes through (DeepSeekMoE): one dense feed-forward block of
    hidden width ``n_shared * d_hidden``, which equals n_shared separate experts summed.

    ``x [..., D] -> [..., D]`` computed in ``x.dtype``, as the routed experts are: the
    weights are cast to it (gradients reach them in their own dtype), so a bfloat16,
    float16 or float64 input to a float32 layer gives an output of the input's dtype.

    Examples
    --------
    >>> import torch
    >>> SharedExperts(8, 16)(torch.randn(3, 8, dtype=torch.bfloat16)).dtype
    torch.bfloat16
    """

    def __init__(
        self, d_model: int, d_hidden: int, activation: str | Activation | ExpandedGatedActivation = "swiglu", bias: bool = False
    ) -> None:
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("d_hidden", d_hidden)
        boolean("bias", bias)
        self.act = resolve_activation(activation)
        h_in = 2 * d_hidden if self.act.glu else d_hidden
        self.w_in = nn.Linear(d_model, h_in, bias=bias)
        self.w_out = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D] -> [..., D]`` in ``x.dtype``."""
        h = _linear_in_dtype(self.w_in, x)
        return _linear_in_dtype(self.w_out, self.act(h))


def _linear_in_dtype(linear: nn.Linear, x: Tensor) -> Tensor:
    """``linear(x)`` with its weight and bias cast to ``x.dtype``: the routed experts
    compute in the input's dtype (`gatedmoe.dispatch`), and a plain ``nn.Linear`` call
    would fail on a non-float32 input with a float32 layer."""
    bias = None if linear.bias is None else linear.bias.to(x.dtype)
    return F.linear(x, linear.weight.to(x.dtype), bias)


class GatedSharedExperts(nn.Module):
    """Shared experts scaled per token by a learned sigmoid gate (Qwen2-MoE, Qwen3-Next):
    ``sigmoid(x w_g (+ b_g)) * shared(x)``, with ``shared`` a `SharedExperts` and
    ``w_g [1, D]``. Pass as ``MoE(..., shared=...)`` (with ``n_shared_experts >= 1``).

    Examples
    --------
    >>> import torch
    >>> GatedSharedExperts(8, 16)(torch.randn(3, 8)).shape
    torch.Size([3, 8])
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        activation: str | Activation | ExpandedGatedActivation = "swiglu",
        bias: bool = False,
        gate_bias: bool = False,
    ) -> None:
        super().__init__()
        boolean("gate_bias", gate_bias)
        self.expert = SharedExperts(d_model, d_hidden, activation, bias)
        self.gate = nn.Linear(d_model, 1, bias=gate_bias)

    @property
    def act(self) -> Activation | ExpandedGatedActivation:
        return self.expert.act

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D] -> [..., D]`` in ``x.dtype`` (see `SharedExperts`)."""
        return torch.sigmoid(_linear_in_dtype(self.gate, x)) * self.expert(x)


class MoE(TransientState, nn.Module):
    """Sparse mixture-of-experts feed-forward layer: ``y = sum_e g_e(x) f_e(x) [+ shared(x)]``.

    Two seams a variant overrides (expert parallelism overrides `dispatch` only):
    ``route(x_TD, token_ids) -> Routing`` (gate, auxiliary losses, capacity) and
    ``dispatch(x_TD, routing) -> y_TD`` (the routed experts through the chosen backend).
    ``forward`` checks the input, flattens it, runs both and adds the shared experts.

    Parameters
    ----------
    d_model, n_experts, d_hidden : int
        D, E and H (see `MoEConfig`).
    gate : str or Gate
        A registered gate name (``gatedmoe.gates.names()``, default "topk_softmax") or a
        built `gatedmoe.gates.Gate` with the layer's ``d_model`` and ``n_experts``, used as
        it is: ``k`` and ``bias_update_rate`` are read off it (a non-default value that
        differs from the gate's is a ValueError), ``gate_kwargs`` are recorded in the config
        as the description of how it was built.
    activation : str or Activation
        Expert activation name (default "swiglu"; ``gatedmoe.experts.activation_names()``)
        or a built activation. The config records a built one's name, even one outside the
        registry (a user's `Activation`): ``from_config(config, experts=...)`` rebuilds
        such a layer from its expert bank.
    experts : ExpertBank, optional
        A built expert bank to use instead of a fresh one (must match d_model, n_experts,
        d_hidden, activation and bias).
    shared : nn.Module, optional
        Built shared experts (needs ``n_shared_experts > 0``).
    **other settings
        ``k``, ``bias``, ``n_shared_experts``, ``d_shared_hidden``, ``capacity_factor``,
        ``capacity_priority``, ``backend``, ``backend_options``, ``load_balance_weight``,
        ``router_z_weight``, ``check_inputs``, ``gate_kwargs``, ``bias_update_rate``,
        ``load_balance_scope``, ``load_balance_count``, ``bias_update_every``: as documented
        in `MoEConfig`, the one list of the layer's settings (``self.config``).

    ``forward(x, token_ids=None)``: ``token_ids`` (int, shape ``x.shape[:-1]``) are passed
    to gates that route by token id (``gate.uses_token_ids``, e.g. "hash") and ignored
    by the others.

    After each forward: ``last_routing`` (the executed `Routing`, after capacity) and
    ``aux_losses`` (dict of weighted loss tensors; sum them with `aux_loss`).

    Balancing across ranks and micro-batches (``load_balance_scope="global_batch"``,
    ``bias_update_every="step"``) sums counts over ``balance_group`` when one is set with
    `set_balance_group` (`ExpertParallelMoE` sets its expert-parallel group); call
    `balance_step` (or ``gatedmoe.balance_step(model)``) after each optimizer step.

    Inputs (the contract of every layer, `gatedmoe.validation`): ``x`` must be a
    floating-point tensor ``[..., d_model]``; a non-tensor, an integer/bool/complex tensor
    or a wrong last dimension is a TypeError/ValueError naming ``x``, before any work. Any
    floating dtype is accepted and *computed in*: the experts run in ``x.dtype`` (their
    weights are cast to it), the router in float32, and the output has ``x.dtype`` (a
    float64 input to a float32 layer gives float64). Zero tokens (``x.shape[:-1]`` with a
    0) is a valid batch: an empty output and zero auxiliary losses. NaN/inf in ``x``: see
    ``check_inputs`` in `MoEConfig`.

    ``torch.compile`` works, outputs and gradients (tested on the CPU; on CUDA the same
    path applies and the Triton backend is a custom op of its own): under compile the
    grouped backend runs its product as the custom op ``gatedmoe::grouped_mm`` (the fake
    implementation of ``torch._grouped_mm`` takes bfloat16 only, which failed float32
    layers with "Expected inputs of BF16 type") and the NaN check as a device-side
    assertion. ``fullgraph=True`` works with fixed-k gates (top-k, sigmoid, switch, expert
    choice, capacity included); gates that keep a variable number of experts per token
    (threshold, top-p, dense-masked ones) produce data-dependent sizes and break the graph
    there. The same holds for every variant in `gatedmoe.layers`.

    Examples
    --------
    >>> import torch
    >>> moe = MoE(16, n_experts=4, d_hidden=32, k=2)
    >>> y = moe(torch.randn(2, 5, 16))
    >>> y.shape, sorted(moe.aux_losses)
    (torch.Size([2, 5, 16]), ['load_balance', 'router_z'])
    >>> same = MoE.from_config(moe.config)  # the same settings, fresh weights
    """

    _transient = {"last_routing": None, "aux_losses": {}, "_step_counts": None}

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        d_hidden: int,
        *,
        gate: str | Gate = "topk_softmax",
        k: int = 2,
        activation: str | Activation | ExpandedGatedActivation = "swiglu",
        bias: bool = False,
        n_shared_experts: int = 0,
        d_shared_hidden: int | None = None,
        capacity_factor: float | None = None,
        capacity_priority: str = "position",
        backend: str = "auto",
        backend_options: TritonOptions | None = None,
        load_balance_weight: float = 0.01,
        router_z_weight: float = 0.001,
        check_inputs: bool = True,
        gate_kwargs: dict[str, Any] | None = None,
        bias_update_rate: float = 0.0,
        load_balance_scope: str = "micro_batch",
        load_balance_count: str = "routed",
        bias_update_every: str = "forward",
        experts: ExpertBank | None = None,
        shared: nn.Module | None = None,
    ) -> None:
        super().__init__()
        gate_part = gate if isinstance(gate, Gate) else None
        act_part = None if isinstance(activation, str) else activation
        if gate_part is not None:
            gate = getattr(gate_part, "registry_name", type(gate_part).__name__)
            # A k other than the default that the built gate contradicts is refused, as a
            # conflicting bias_update_rate is (the default cannot be told from a k=2 given).
            if hasattr(gate_part, "k") and k not in (2, gate_part.k):
                raise ValueError(f"k={k} differs from the built gate's k={gate_part.k}")
            k = getattr(gate_part, "k", k)
            balancer = getattr(gate_part, "balancer", None)
            if balancer is not None and bias_update_rate == 0.0:
                bias_update_rate = balancer.update_rate
        elif not isinstance(gate, str):
            raise TypeError(f"gate must be a gate name or a gatedmoe.gates.Gate, got {type(gate).__name__}")
        settings = dict(
            d_model=d_model, n_experts=n_experts, d_hidden=d_hidden, gate=gate, k=k,
            bias=bias, n_shared_experts=n_shared_experts, d_shared_hidden=d_shared_hidden,
            capacity_factor=capacity_factor, capacity_priority=capacity_priority, backend=backend,
            backend_options=backend_options, load_balance_weight=load_balance_weight,
            router_z_weight=router_z_weight, check_inputs=check_inputs, gate_kwargs=gate_kwargs or {},
            bias_update_rate=bias_update_rate, load_balance_scope=load_balance_scope,
            load_balance_count=load_balance_count, bias_update_every=bias_update_every,
        )
        if act_part is not None:
            activation = resolve_activation(act_part).name
        if act_part is not None and activation not in activation_names():
            # A user's activation may carry any name; the config records it as a description.
            config = MoEConfig._describing(activation, **settings)
        else:
            config = MoEConfig(activation=activation, **settings)
        self._build(config, gate_part, act_part, experts, shared)

    @classmethod
    def from_config(
        cls,
        config: MoEConfig,
        *,
        gate: Gate | None = None,
        experts: ExpertBank | None = None,
        shared: nn.Module | None = None,
        **kwargs: Any,
    ) -> MoE:
        """The layer ``config`` describes, with optional built parts (checked against it).

        ``kwargs`` go to the constructor of a subclass (e.g. ``group`` of
        `gatedmoe.parallel.ExpertParallelMoE`).
        """
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        settings = config.to_dict()
        d_model, n_experts, d_hidden = settings.pop("d_model"), settings.pop("n_experts"), settings.pop("d_hidden")
        if gate is not None:
            _check_gate_part(config, gate)
            settings["gate"] = gate
        if experts is not None and config.activation not in activation_names() and experts.act.name == config.activation:
            # A config describing a built activation outside the registry: the bank's is it.
            settings["activation"] = experts.act
        return cls(d_model, n_experts, d_hidden, **settings, experts=experts, shared=shared, **kwargs)

    def _build(
        self,
        config: MoEConfig,
        gate_part: Gate | None,
        act_part: Activation | ExpandedGatedActivation | None,
        experts: ExpertBank | None,
        shared: nn.Module | None,
    ) -> None:
        self.config = config
        if gate_part is not None:
            _check_gate_part(config, gate_part)
            self.gate = gate_part
        else:
            gate_cls = gate_registry.get(config.gate)
            kw = dict(config.gate_kwargs)
            if gate_cls.uses_k:
                kw["k"] = config.k
            self.gate = gate_cls(d_model=config.d_model, n_experts=config.n_experts, **kw)
        balancer = getattr(self.gate, "balancer", None)
        if gate_part is None:
            if config.bias_update_rate > 0:
                self.gate.attach_bias_balancer(config.bias_update_rate)
        elif config.bias_update_rate > 0 and balancer is None:
            self.gate.attach_bias_balancer(config.bias_update_rate)
        elif balancer is not None and config.bias_update_rate not in (0.0, balancer.update_rate):
            raise ValueError(
                f"bias_update_rate={config.bias_update_rate} differs from the built gate's balancer "
                f"(update_rate={balancer.update_rate})"
            )
        balancer = getattr(self.gate, "balancer", None)
        if balancer is not None:
            balancer.every = config.bias_update_every
        n_bank, d_bank = self._bank_size(config)
        if experts is None:
            experts = ExpertBank(n_bank, d_bank, config.d_hidden, act_part or config.activation, config.bias)
        else:
            _check_experts_part(config, experts, n_bank, d_bank)
        self.experts = experts
        if shared is None and config.n_shared_experts:
            shared = SharedExperts(
                config.d_model, config.n_shared_experts * (config.d_shared_hidden or config.d_hidden),
                act_part or config.activation, config.bias,
            )
        elif shared is not None and not config.n_shared_experts:
            raise ValueError("shared experts were given but n_shared_experts=0")
        elif shared is not None and not isinstance(shared, nn.Module):
            raise TypeError(f"shared must be an nn.Module, got {type(shared).__name__}")
        self.shared = shared
        self.last_routing: Routing | None = None
        self.aux_losses: dict[str, Tensor] = {}
        self.balance_group: Any = None
        self.balance_distributed = False
        # Global-batch counts ``[E]`` of the optimizer step so far (load_balance_scope="global_batch").
        self._step_counts: Tensor | None = None

    def _bank_size(self, config: MoEConfig) -> tuple[int, int]:
        """``(experts, model width)`` of the `ExpertBank`: ``(n_experts, d_model)`` here;
        `gatedmoe.layers.ZeroComputeMoE` keeps some experts out of it, and a variant whose
        experts run between projections gives their width."""
        return config.n_experts, config.d_model

    # Read-only views of the config, for the code and users that read them off the layer.
    d_model = property(lambda self: self.config.d_model)
    n_experts = property(lambda self: self.config.n_experts)
    k = property(lambda self: self.config.k)
    backend = property(lambda self: self.config.backend)
    backend_options = property(lambda self: self.config.backend_options)
    capacity_factor = property(lambda self: self.config.capacity_factor)
    capacity_priority = property(lambda self: self.config.capacity_priority)
    load_balance_weight = property(lambda self: float(self.config.load_balance_weight))
    router_z_weight = property(lambda self: float(self.config.router_z_weight))
    check_inputs = property(lambda self: bool(self.config.check_inputs))

    def capacity(self, n_assignments: int) -> int:
        """Slots per expert for a batch of ``n_assignments`` (needs ``capacity_factor``)."""
        return max(1, math.ceil(self.capacity_factor * n_assignments / self.n_experts))

    def _check(self, x: Tensor) -> None:
        # The one input contract of every layer (gatedmoe.validation): type, dtype, shape,
        # then NaN/inf as check_inputs says: here on the CPU, after routing elsewhere
        # (`_check_routed`).
        check_input(x, self.d_model, type(self).__name__)
        if self.check_inputs and x.device.type == "cpu":
            check_finite(x, type(self).__name__)

    def _check_routed(self, x_TD: Tensor, routing: Routing) -> None:
        # On accelerators the finiteness check is a device-side assertion (no host sync).
        # Where the gate left lse = logsumexp(x W^T) the check reads those T values instead
        # of x's T*D: any NaN or inf in a row of x makes every logit of the row NaN or
        # infinite (inf * 0 is NaN), so its lse too (fine-grained shape on an H200: the
        # check of x took 0.12 ms of a 7.4 ms step).
        if self.check_inputs and x_TD.device.type != "cpu":
            check_finite(x_TD if routing.lse is None else routing.lse, type(self).__name__)

    # ------------------------------------------------------------ balancing
    def set_balance_group(self, group: Any = None) -> MoE:
        """Sum balancing counts over the ranks of ``group`` (None = the world): the
        global-batch loss's frequencies and the step-wise bias update's counts. Every rank
        of the group must then run the same number of forwards and `balance_step` calls.
        For data parallelism pass the data-parallel group (with expert parallelism too, the
        group of every rank whose tokens form the global batch). Returns ``self``."""
        self.balance_group = group
        self.balance_distributed = True
        return self

    def balance_step(self) -> None:
        """Close an optimizer step: the selection bias takes its step from the counts of the
        step's micro-batches (``bias_update_every="step"``), and the global-batch counts
        start again from zero. Call after ``optimizer.step()`` (see `balance_step`)."""
        balancer = getattr(self.gate, "balancer", None)
        if balancer is not None:
            balancer.step(self.balance_group, self.balance_distributed)
        self._step_counts = None

    def _global_counts(self, counts_E: Tensor) -> Tensor:
        """``counts_E`` summed over the balance group and, in training, added to the
        counts of the optimizer step so far (the f of the global-batch loss)."""
        counts_E = counts_E.detach().clone()
        if self.balance_distributed:
            import torch.distributed as dist

            dist.all_reduce(counts_E, group=self.balance_group)
        if not (self.training and torch.is_grad_enabled()):
            return counts_E
        if self._step_counts is not None:
            counts_E = counts_E + self._step_counts
        self._step_counts = counts_E
        return counts_E

    def balance_loss(self, routing: Routing, seq_len: int | None = None) -> Tensor:
        """The unweighted load-balancing loss of ``routing`` at the layer's
        ``load_balance_scope`` and ``load_balance_count`` (`gatedmoe.losses`); ``seq_len``
        tokens per sequence for the sequence scope (None: all tokens are one sequence)."""
        scope, count = self.config.load_balance_scope, self.config.load_balance_count
        if scope == "sequence":
            return sequence_balance_loss(routing, seq_len or max(routing.n_tokens, 1), count)
        if scope == "global_batch":
            counted = routing.routed if count == "routed" else routing
            return global_batch_balance_loss(routing, self._global_counts(counted.counts))
        return load_balance_loss(routing, count)

    # ------------------------------------------------------------ seams
    def route(self, x_TD: Tensor, token_ids: Tensor | None = None, *, seq_len: int | None = None) -> Routing:
        """Gate ``x_TD``, record auxiliary losses, apply capacity; returns the executed routing.

        ``token_ids`` (``[T]`` or any shape with T elements) reach gates that use them.
        ``seq_len``: the sequence-scope loss's tokens per sequence (`forward` passes L of
        ``x [..., L, D]``); None: ``x_TD`` is one sequence.
        """
        gated = self._gate_route(x_TD, token_ids)
        self._record_losses(gated, seq_len)
        return self._apply_capacity(gated)

    def _gate_route(self, x_TD: Tensor, token_ids: Tensor | None) -> Routing:
        if self.gate.uses_token_ids:
            return self.gate(x_TD, token_ids=token_ids)
        return self.gate(x_TD)

    def _record_losses(self, gated: Routing, seq_len: int | None) -> None:
        """``aux_losses`` of the gate's routing ``gated`` (before capacity drops)."""
        losses: dict[str, Tensor] = {}
        if self.load_balance_weight and gated.probs is not None:
            losses["load_balance"] = self.load_balance_weight * self.balance_loss(gated, seq_len)
        if self.router_z_weight and gated.logits is not None:
            losses["router_z"] = self.router_z_weight * router_z_loss(gated)
        losses.update(self.gate.gate_losses)
        self._set_transient("aux_losses", losses)

    def _apply_capacity(self, gated: Routing) -> Routing:
        if self.capacity_factor is None:
            return gated
        return gated.drop_over_capacity(self.capacity(gated.n_assignments), self.capacity_priority)

    def dispatch(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """Run the routed experts on ``x_TD [T, D]`` as ``routing`` says; ``[T, D]``.

        Combines with the routing weights; the shared experts are not included. ``x_TD``
        must be a floating-point tensor ``[routing.n_tokens, d_model]`` and ``routing`` a
        `Routing` (TypeError/ValueError naming the argument; shapes only, no device sync).
        """
        _check_dispatch_args(x_TD, routing, self.d_model, type(self).__name__)
        backend = get_backend(self.backend, x_TD.device)
        return backend(x_TD, routing, self.experts, options=self.backend_options)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """``x [..., D] -> [..., D]``; ``token_ids [...]`` for gates that route by token id.

        Under ``torch.autocast`` the router still computes float32 logits (from x rounded to
        autocast's dtype, `gatedmoe.gates.router`) and the experts run in autocast's dtype, so
        the output has that dtype, as an autocast ``nn.Linear``'s does."""
        self._check(x)
        _check_token_ids(token_ids, x)
        x_TD = x.reshape(-1, self.d_model)
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        token_ids = None if token_ids is None else token_ids.reshape(-1)
        if type(self).route is not MoE.route:  # a subclass's own route seam: called as is
            routing = self.route(x_TD, token_ids, seq_len=seq_len)
            self._check_routed(x_TD, routing)
            self._set_transient("last_routing", routing)
            y_TD = outside_autocast(self.dispatch, x_TD, routing)
        else:
            # What `route` does, with the losses and the device-side finiteness check queued
            # after the experts' kernels: their host work (small ops, ~0.4 ms on an H200)
            # then overlaps the GPU's expert products instead of delaying the first of them.
            # Same results: both only read the routing, and the check never waits for the GPU.
            gated = self._gate_route(x_TD, token_ids)
            routing = self._apply_capacity(gated)
            self._set_transient("last_routing", routing)
            y_TD = outside_autocast(self.dispatch, x_TD, routing)
            self._check_routed(x_TD, routing)
            self._record_losses(gated, seq_len)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, capacity_factor={self.capacity_factor}"


def _check_token_ids(token_ids: Tensor | None, x: Tensor) -> None:
    """``token_ids`` is None or an integer tensor shaped ``x.shape[:-1]``."""
    if token_ids is None:
        return
    if not isinstance(token_ids, Tensor):
        raise TypeError(f"token_ids must be None or an integer torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got dtype {token_ids.dtype}")
    if tuple(token_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"token_ids must have shape x.shape[:-1]={tuple(x.shape[:-1])}, got {tuple(token_ids.shape)}")


def _check_dispatch_args(x_TD: object, routing: object, d_model: int, owner: str) -> None:
    """The `MoE.dispatch` seam's arguments: ``routing`` a `Routing` and ``x_TD`` a float
    tensor ``[T, d_model]`` with T its ``n_tokens``. Shapes only: a row count that differs
    would silently give zero rows (more rows) or an IndexError deep in a backend (fewer)."""
    if not isinstance(routing, Routing):
        raise TypeError(f"{owner}.dispatch: routing must be a gatedmoe.Routing, got {type(routing).__name__}")
    check_input(x_TD, d_model, f"{owner}.dispatch", ndims=(2,), shape_text="[T, d_model]", name="x_TD")
    if x_TD.shape[0] != routing.n_tokens:
        raise ValueError(
            f"{owner}.dispatch: x_TD has {x_TD.shape[0]} rows but routing has n_tokens={routing.n_tokens}; "
            "pass the rows the routing was computed from"
        )


def _check_gate_part(config: MoEConfig, gate: Gate) -> None:
    if not isinstance(gate, Gate):
        raise TypeError(f"gate must be a gatedmoe.gates.Gate, got {type(gate).__name__}")
    for name in ("d_model", "n_experts"):
        if getattr(gate, name) != getattr(config, name):
            raise ValueError(f"the built gate has {name}={getattr(gate, name)}, the config {getattr(config, name)}")
    name = getattr(gate, "registry_name", type(gate).__name__)
    if name != config.gate:
        raise ValueError(f"the built gate is {name!r}, the config says gate={config.gate!r}")
    if hasattr(gate, "k") and gate.k != config.k:
        raise ValueError(f"the built gate has k={gate.k}, the config k={config.k}")


def _check_experts_part(config: MoEConfig, experts: ExpertBank, n_bank: int, d_bank: int) -> None:
    if not isinstance(experts, ExpertBank):
        raise TypeError(f"experts must be a gatedmoe.ExpertBank, got {type(experts).__name__}")
    ours = (n_bank, d_bank, config.d_hidden, config.activation, config.bias)
    theirs = (experts.n_experts, experts.d_model, experts.d_hidden, experts.act.name, experts.has_bias)
    if ours != theirs:
        raise ValueError(
            "the built experts (n_experts, d_model, d_hidden, activation, bias) = "
            f"{theirs} differ from the config's {ours}"
        )


def balance_step(model: nn.Module) -> None:
    """Close an optimizer step for every `MoE` layer in ``model`` (`MoE.balance_step`):
    step-wise bias updates happen, global-batch counts restart. Call it after
    ``optimizer.step()``, on every rank.

    Examples
    --------
    >>> import torch
    >>> moe = MoE(8, 4, 16, gate="sigmoid", bias_update_rate=1e-3, bias_update_every="step")
    >>> for micro_batch in torch.randn(2, 6, 8):  # gradient accumulation over 2
    ...     (moe(micro_batch).square().mean() + aux_loss(moe)).backward()
    >>> balance_step(moe)  # after optimizer.step()
    """
    for m in model.modules():
        if isinstance(m, MoE):
            m.balance_step()


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of every auxiliary loss left by the last forward of each MoE layer in ``model``.

    Returns a zero scalar when there is none. Add it to the task loss before backward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    total: Tensor | None = None
    for m in model.modules():
        losses = getattr(m, "aux_losses", None)
        if isinstance(losses, dict):
            for v in losses.values():
                total = v if total is None else total + v
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total
