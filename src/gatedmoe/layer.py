"""`MoE`: gate + expert bank + dispatch (+ shared experts, capacity), and `aux_loss`.

Shape legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from gatedmoe import gates as gate_registry
from gatedmoe.dispatch import check_backend_name, get_backend
from gatedmoe.experts.activations import get_activation
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.losses import load_balance_loss, router_z_loss
from gatedmoe.routing import Routing
from gatedmoe.transient import TransientState

__all__ = ["MoE", "SharedExperts", "aux_loss"]


class SharedExperts(nn.Module):
    """Experts every token goes through (DeepSeekMoE): one dense feed-forward block of
    hidden width ``n_shared * d_hidden``, which equals n_shared separate experts summed."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu", bias: bool = False) -> None:
        super().__init__()
        self.act = get_activation(activation)
        h_in = 2 * d_hidden if self.act.glu else d_hidden
        self.w_in = nn.Linear(d_model, h_in, bias=bias)
        self.w_out = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(self.act(self.w_in(x)))


class MoE(TransientState, nn.Module):
    """Sparse mixture-of-experts feed-forward layer: ``y = sum_e g_e(x) f_e(x) [+ shared(x)]``.

    Parameters
    ----------
    d_model : int
        D, width of the input and output.
    n_experts : int
        E, number of routed experts.
    d_hidden : int
        H, hidden width of each expert.
    gate : str
        Registered gate name (see ``gatedmoe.gates.names()``), default "topk_softmax".
    k : int
        Experts per token for gates that take k (default 2); dense gates ignore it.
    activation : str
        Expert activation (default "swiglu"; see ``gatedmoe.experts.activation_names()``).
    bias : bool
        Expert biases (default False).
    n_shared_experts : int
        Experts every token also goes through (DeepSeekMoE), default 0.
    d_shared_hidden : int, optional
        Hidden width of each shared expert (default ``d_hidden``).
    capacity_factor : float, optional
        If set, each expert keeps at most ``ceil(capacity_factor * N / E)`` assignments
        (N assignments in the batch) and drops the rest (Switch Transformers). None = dropless.
    capacity_priority : {"position", "score"}
        Which assignments an over-full expert keeps (see `Routing.drop_over_capacity`).
    backend : str
        "auto" (default: Triton on CUDA where available, else grouped) or a name from
        ``gatedmoe.dispatch.backend_names()``.
    load_balance_weight, router_z_weight : float
        Weights of the Switch load-balancing loss (default 0.01) and ST-MoE router z-loss
        (default 0.001) in ``aux_losses``; 0 turns one off.
    check_inputs : bool
        Raise on NaN/inf in the input (costs one device sync per forward; default True).
    gate_kwargs : dict, optional
        Extra keyword arguments for the gate (e.g. ``{"noisy": True}``).
    bias_update_rate : float
        If > 0, attach auxiliary-loss-free bias balancing (Wang et al. 2024) to the gate
        with this update rate (`Gate.attach_bias_balancer`; token-choice gates only).
        Default 0: off.

    ``forward(x, token_ids=None)``: ``token_ids`` (int, shape ``x.shape[:-1]``) are passed
    to gates that route by token id (``gate.uses_token_ids``, e.g. "hash") and ignored
    by the others.

    After each forward: ``last_routing`` (the executed `Routing`, after capacity) and
    ``aux_losses`` (dict of weighted loss tensors; sum them with `aux_loss`).

    Examples
    --------
    >>> import torch
    >>> moe = MoE(16, n_experts=4, d_hidden=32, k=2)
    >>> y = moe(torch.randn(2, 5, 16))
    >>> y.shape, sorted(moe.aux_losses)
    (torch.Size([2, 5, 16]), ['load_balance', 'router_z'])
    """

    _transient = {"last_routing": None, "aux_losses": {}}

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        d_hidden: int,
        *,
        gate: str = "topk_softmax",
        k: int = 2,
        activation: str = "swiglu",
        bias: bool = False,
        n_shared_experts: int = 0,
        d_shared_hidden: int | None = None,
        capacity_factor: float | None = None,
        capacity_priority: str = "position",
        backend: str = "auto",
        load_balance_weight: float = 0.01,
        router_z_weight: float = 0.001,
        check_inputs: bool = True,
        gate_kwargs: dict[str, Any] | None = None,
        bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.backend = check_backend_name(backend)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        if capacity_priority not in ("position", "score"):
            raise ValueError(f"capacity_priority must be 'position' or 'score', got {capacity_priority!r}")
        if isinstance(n_shared_experts, bool) or not isinstance(n_shared_experts, int) or n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be an int >= 0, got {n_shared_experts!r}")
        gate_cls = gate_registry.get(gate)
        kw = dict(gate_kwargs or {})
        if gate_cls.uses_k:
            kw["k"] = k
        self.gate = gate_cls(d_model=d_model, n_experts=n_experts, **kw)
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        if bias_update_rate > 0:
            self.gate.attach_bias_balancer(bias_update_rate)
        self.experts = ExpertBank(n_experts, d_model, d_hidden, activation, bias)
        self.shared = (
            SharedExperts(d_model, n_shared_experts * (d_shared_hidden or d_hidden), activation, bias)
            if n_shared_experts
            else None
        )
        self.d_model, self.n_experts, self.k = d_model, n_experts, k
        self.capacity_factor = capacity_factor
        self.capacity_priority = capacity_priority
        self.load_balance_weight = float(load_balance_weight)
        self.router_z_weight = float(router_z_weight)
        self.check_inputs = bool(check_inputs)
        self.last_routing: Routing | None = None
        self.aux_losses: dict[str, Tensor] = {}

    def capacity(self, n_assignments: int) -> int:
        """Slots per expert for a batch of ``n_assignments`` (needs ``capacity_factor``)."""
        return max(1, math.ceil(self.capacity_factor * n_assignments / self.n_experts))

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., d_model={self.d_model}], got {tuple(x.shape)}")
        if self.check_inputs and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf")

    def route(self, x_TD: Tensor, token_ids: Tensor | None = None) -> Routing:
        """Gate ``x_TD``, record auxiliary losses, apply capacity; returns the executed routing.

        ``token_ids`` (``[T]`` or any shape with T elements) reach gates that use them.
        """
        if self.gate.uses_token_ids:
            routing = self.gate(x_TD, token_ids=token_ids)
        else:
            routing = self.gate(x_TD)
        losses: dict[str, Tensor] = {}
        if self.load_balance_weight and routing.probs is not None:
            losses["load_balance"] = self.load_balance_weight * load_balance_loss(routing)
        if self.router_z_weight and routing.logits is not None:
            losses["router_z"] = self.router_z_weight * router_z_loss(routing)
        losses.update(self.gate.gate_losses)
        self.aux_losses = losses
        if self.capacity_factor is not None:
            routing = routing.drop_over_capacity(self.capacity(routing.n_assignments), self.capacity_priority)
        return routing

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """``x [..., D] -> [..., D]``; ``token_ids [...]`` for gates that route by token id."""
        self._check(x)
        if token_ids is not None and tuple(token_ids.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"token_ids must have shape x.shape[:-1]={tuple(x.shape[:-1])}, got {tuple(token_ids.shape)}")
        x_TD = x.reshape(-1, self.d_model)
        routing = self.route(x_TD, None if token_ids is None else token_ids.reshape(-1))
        self.last_routing = routing
        y_TD = get_backend(self.backend, x.device)(x_TD, routing, self.experts)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, capacity_factor={self.capacity_factor}"


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of every auxiliary loss left by the last forward of each MoE layer in ``model``.

    Returns a zero scalar when there is none. Add it to the task loss before backward.
    """
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
