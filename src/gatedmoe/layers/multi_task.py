"""Multi-task MoE: one shared expert bank, one gate per task (MMoE, DSelect-k multi-task)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gatedmoe import gates as gate_registry
from gatedmoe.dispatch import check_backend_name, get_backend
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.losses import load_balance_loss
from gatedmoe.routing import Routing
from gatedmoe.transient import TransientState

__all__ = ["MultiTaskMoE"]


class MultiTaskMoE(TransientState, nn.Module):
    """Multi-gate mixture of experts (Ma et al. 2018, "Modeling Task Relationships in
    Multi-task Learning with Multi-gate Mixture-of-Experts"; with ``gate="dselect_k"``,
    the multi-task DSelect-k of Hazimeh et al. 2021).

    Formula: for task k, ``y^k = sum_e g^k_e(x) f_e(x)``: the experts ``f_e`` are shared,
    each task has its own gate ``g^k`` (any registered gate; default "softmax", the MMoE
    gate). Task towers are left to the caller.

    Parameters
    ----------
    d_model, n_experts, d_hidden : int
        As in `gatedmoe.MoE`.
    n_tasks : int
        Number of tasks (gates), >= 1.
    gate, k, gate_kwargs, activation, bias, backend :
        As in `gatedmoe.MoE`; every task's gate is built from the same name and kwargs.
    load_balance_weight : float
        Weight of the Switch load-balancing loss per task (default 0: MMoE has none).

    ``forward(x)`` returns a list of n_tasks tensors shaped like x. After it,
    ``aux_losses`` holds ``"task{i}/<loss>"`` entries (gate losses, e.g. DSelect-k's
    entropy) and ``last_routings`` the routing of each task.

    Examples
    --------
    >>> import torch
    >>> m = MultiTaskMoE(8, n_experts=4, d_hidden=16, n_tasks=2)
    >>> [y.shape for y in m(torch.randn(3, 8))]
    [torch.Size([3, 8]), torch.Size([3, 8])]
    """

    _transient = {"aux_losses": {}, "last_routings": []}

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        d_hidden: int,
        n_tasks: int,
        *,
        gate: str = "softmax",
        k: int = 2,
        gate_kwargs: dict[str, Any] | None = None,
        activation: str = "swiglu",
        bias: bool = False,
        backend: str = "auto",
        load_balance_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
        gate_cls = gate_registry.get(gate)
        if gate_cls.uses_token_ids:
            raise ValueError(f"gate {gate!r} routes by token id, which does not depend on the task")
        kw = dict(gate_kwargs or {})
        if gate_cls.uses_k:
            kw["k"] = k
        self.backend = check_backend_name(backend)
        self.d_model, self.n_tasks = d_model, n_tasks
        self.experts = ExpertBank(n_experts, d_model, d_hidden, activation, bias)
        self.gates = nn.ModuleList(gate_cls(d_model=d_model, n_experts=n_experts, **kw) for _ in range(n_tasks))
        self.load_balance_weight = float(load_balance_weight)
        self.aux_losses: dict[str, Tensor] = {}
        self.last_routings: list[Routing] = []

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x [..., D]`` to one ``[..., D]`` output per task."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., d_model={self.d_model}], got {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.d_model)
        dispatch = get_backend(self.backend, x.device)
        outs, routings, losses = [], [], {}
        for i, g in enumerate(self.gates):
            routing = g(x_TD)
            for name, v in g.gate_losses.items():
                losses[f"task{i}/{name}"] = v
            if self.load_balance_weight and routing.probs is not None:
                losses[f"task{i}/load_balance"] = self.load_balance_weight * load_balance_loss(routing)
            routings.append(routing)
            outs.append(dispatch(x_TD, routing, self.experts).reshape(x.shape))
        self.aux_losses, self.last_routings = losses, routings
        return outs
