"""Multi-task MoE: one shared expert bank, one gate per task (MMoE, DSelect-k multi-task)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gatedmoe import gates as gate_registry
from gatedmoe.dispatch import get_backend
from gatedmoe.dispatch.options import TritonOptions
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.layers._settings import honoured_settings
from gatedmoe.layers.config import MoEConfig
from gatedmoe.losses import load_balance_loss, router_z_loss
from gatedmoe.routing import Routing
from gatedmoe.transient import TransientState
from gatedmoe.validation import check_finite, check_input, positive_int

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
    gate, k, gate_kwargs, activation, bias, backend, backend_options, bias_update_rate :
        As in `gatedmoe.MoEConfig`; every task's gate is built from the same name and kwargs
        (and gets its own bias balancer with ``bias_update_rate > 0``).
    load_balance_weight, router_z_weight : float
        Weights of the Switch load-balancing loss and the router z-loss, per task
        (default 0: MMoE has neither).
    check_inputs : bool
        Fail on NaN/inf in the input (default True), as `gatedmoe.MoE` does (see
        `MoEConfig`).

    These are the `MoEConfig` fields it honours (``self.config`` holds them); `from_config`
    builds one from a config and refuses, naming the field, one whose other settings
    (shared experts, capacity) differ from their defaults.

    ``forward(x)`` takes ``x [..., D]`` under the input contract of `gatedmoe.MoE` (any
    floating dtype, computed in; zero tokens valid; TypeError/ValueError naming ``x``
    otherwise) and returns a list of n_tasks tensors shaped like x. After it,
    ``aux_losses`` holds ``"task{i}/<loss>"`` entries (gate losses, e.g. DSelect-k's
    entropy) and ``last_routings`` the routing of each task.

    Examples
    --------
    >>> import torch
    >>> from gatedmoe import MoEConfig
    >>> m = MultiTaskMoE(8, n_experts=4, d_hidden=16, n_tasks=2)
    >>> [y.shape for y in m(torch.randn(3, 8))]
    [torch.Size([3, 8]), torch.Size([3, 8])]
    >>> cfg = MoEConfig(d_model=8, n_experts=4, d_hidden=16, gate="softmax")
    >>> MultiTaskMoE.from_config(cfg, n_tasks=2).config == cfg
    True
    """

    _transient = {"aux_losses": {}, "last_routings": []}
    # The MoEConfig fields this variant uses; the others must keep their defaults.
    honoured = (
        "d_model", "n_experts", "d_hidden", "gate", "k", "gate_kwargs", "activation", "bias", "backend",
        "backend_options", "load_balance_weight", "router_z_weight", "check_inputs", "bias_update_rate",
    )

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
        backend_options: TritonOptions | None = None,
        load_balance_weight: float = 0.0,
        router_z_weight: float = 0.0,
        check_inputs: bool = True,
        bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__()
        positive_int("n_tasks", n_tasks)
        cfg = MoEConfig(
            d_model=d_model, n_experts=n_experts, d_hidden=d_hidden, gate=gate, k=k, gate_kwargs=gate_kwargs or {},
            activation=activation, bias=bias, backend=backend, backend_options=backend_options,
            load_balance_weight=load_balance_weight, router_z_weight=router_z_weight, check_inputs=check_inputs,
            bias_update_rate=bias_update_rate,
        )
        gate_cls = gate_registry.get(cfg.gate)
        if gate_cls.uses_token_ids:
            raise ValueError(f"gate {cfg.gate!r} routes by token id, which does not depend on the task")
        kw = dict(cfg.gate_kwargs)
        if gate_cls.uses_k:
            kw["k"] = cfg.k
        self.config = cfg
        self.d_model, self.n_tasks = cfg.d_model, n_tasks
        self.experts = ExpertBank(cfg.n_experts, cfg.d_model, cfg.d_hidden, cfg.activation, cfg.bias)
        self.gates = nn.ModuleList(gate_cls(d_model=cfg.d_model, n_experts=cfg.n_experts, **kw) for _ in range(n_tasks))
        if cfg.bias_update_rate > 0:
            for g in self.gates:
                g.attach_bias_balancer(cfg.bias_update_rate)
        self.aux_losses: dict[str, Tensor] = {}
        self.last_routings: list[Routing] = []

    @classmethod
    def from_config(cls, config: MoEConfig, *, n_tasks: int) -> MultiTaskMoE:
        """One gate per task and one expert bank as ``config`` says (``self.config == config``).

        ValueError, naming the field, if a setting outside `honoured` differs from its default.
        """
        settings = honoured_settings(config, cls.honoured, cls.__name__)
        d_model, n_experts, d_hidden = settings.pop("d_model"), settings.pop("n_experts"), settings.pop("d_hidden")
        return cls(d_model, n_experts, d_hidden, n_tasks, **settings)

    @property
    def backend(self) -> str:
        return self.config.backend

    @property
    def load_balance_weight(self) -> float:
        return float(self.config.load_balance_weight)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x [..., D]`` to one ``[..., D]`` output per task."""
        cfg = self.config
        check_input(x, self.d_model, "MultiTaskMoE")
        if cfg.check_inputs:
            check_finite(x, "MultiTaskMoE")
        x_TD = x.reshape(-1, self.d_model)
        dispatch = get_backend(cfg.backend, x.device)
        outs, routings, losses = [], [], {}
        for i, g in enumerate(self.gates):
            routing = g(x_TD)
            for name, v in g.gate_losses.items():
                losses[f"task{i}/{name}"] = v
            if cfg.load_balance_weight and routing.probs is not None:
                losses[f"task{i}/load_balance"] = cfg.load_balance_weight * load_balance_loss(routing)
            if cfg.router_z_weight and routing.logits is not None:
                losses[f"task{i}/router_z"] = cfg.router_z_weight * router_z_loss(routing)
            routings.append(routing)
            outs.append(dispatch(x_TD, routing, self.experts, options=cfg.backend_options).reshape(x.shape))
        self.aux_losses, self.last_routings = losses, routings
        return outs
