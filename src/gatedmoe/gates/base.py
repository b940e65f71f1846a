"""The `Gate` base class: a module that maps tokens ``x_TD`` to a `Routing`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gatedmoe.gates.balancing import BiasBalancer
from gatedmoe.gates.router import router_logits
from gatedmoe.routing import Routing
from gatedmoe.transient import TransientState
from gatedmoe.validation import check_input, positive_int

__all__ = ["Gate", "check_k", "routing_from_dense"]


def check_k(k: int, n_experts: int) -> int:
    """Validate a top-k against the number of experts; return it."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int in [1, n_experts={n_experts}], got {type(k).__name__}")
    if not 1 <= k <= n_experts:
        raise ValueError(f"k must satisfy 1 <= k <= n_experts={n_experts}, got k={k}")
    return k


class Gate(TransientState, nn.Module):
    """Base of every gate.

    A gate owns its router parameters and returns a `Routing` from ``forward(x_TD)``.
    Router math runs in float32 whatever the input dtype. A gate with a loss of its own
    (e.g. noisy top-k's importance and load losses) leaves it, already weighted, in
    ``self.gate_losses`` after each forward; the MoE layer collects it.

    Subclasses set ``uses_k = False`` when they route densely or choose the number of
    experts themselves, so the layer does not pass ``k``; ``uses_token_ids = True`` when
    ``forward`` needs the vocabulary ids of the tokens (hash routing), so the layer passes
    ``token_ids``; ``token_choice = True`` when each token picks its experts from a
    score ``[T, E]``, so a selection bias (`BiasBalancer`, auxiliary-loss-free balancing)
    can be attached with `attach_bias_balancer`. Such gates add `selection_bias` to their
    scores before selecting and call `update_bias_balancer` after routing.

    Input contract (checked for every gate, subclasses included, by a forward pre-hook
    before ``forward`` runs): ``x_TD`` a floating-point tensor ``[T, d_model]``, T >= 0;
    anything else is a TypeError/ValueError naming ``x_TD``. T = 0 gives an empty `Routing`
    and finite (zero) gate losses. NaN/inf is the layer's to check (``check_inputs``).
    """

    _transient = {"gate_losses": {}}

    uses_k: bool = True
    uses_token_ids: bool = False
    token_choice: bool = False
    # Set by `gatedmoe.gates.register`: the name `MoEConfig.gate` records for a built gate.
    registry_name: str

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.n_experts = positive_int("n_experts", n_experts)
        self.gate_losses: dict[str, Tensor] = {}
        self.balancer: BiasBalancer | None = None
        self.register_forward_pre_hook(_check_gate_input, with_kwargs=True)

    def router_logits(self, x_TD: Tensor) -> Tensor:
        """``x W^T`` in float32 (the linear router of most gates), ``[T, E]``; 16-bit inputs
        on CUDA multiply on the tensor cores (see `gatedmoe.gates.router`)."""
        return router_logits(x_TD, self.weight)

    # ------------------------------------------------------------ bias balancing
    def attach_bias_balancer(self, update_rate: float = 1e-3) -> Gate:
        """Give this token-choice gate a selection-only expert bias (Wang et al. 2024).

        The bias is added to the gate's selection scores, never to its combine weights,
        and moves by ``update_rate * sign(mean(c) - c_e)`` after each training forward
        (or once per optimizer step: ``balancer.every = "step"``, see `BiasBalancer`).
        Raises ValueError for gates that are not token choice (``token_choice=False``).
        Returns ``self``.
        """
        if not self.token_choice:
            raise ValueError(
                f"gate {type(self).__name__} is not a token-choice gate; bias balancing "
                "needs a gate whose tokens select experts from a score"
            )
        self.balancer = BiasBalancer(self.n_experts, update_rate)
        return self

    def selection_bias(self) -> Tensor | None:
        """The selection bias ``[E]`` to add to scores before top-k, or None."""
        return None if self.balancer is None else self.balancer.bias

    def update_bias_balancer(self, counts_E: Tensor) -> None:
        """Hand this forward's counts to the balancer (training with grad only): a step now
        or at the optimizer step, as ``balancer.every`` says."""
        if self.balancer is not None and self.training and torch.is_grad_enabled():
            self.balancer.observe(counts_E)

    def forward(self, x_TD: Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_gate_input(gate: Gate, args: tuple, kwargs: dict) -> None:
    x_TD = args[0] if args else kwargs.get("x_TD")
    check_input(x_TD, gate.d_model, type(gate).__name__, ndims=(2,), shape_text="[T, d_model]", name="x_TD")


def routing_from_dense(
    weights_TE: Tensor,
    mask_TE: Tensor | None = None,
    probs: Tensor | None = None,
    logits: Tensor | None = None,
) -> Routing:
    """Routing of the entries of a dense ``[T, E]`` weight matrix where ``mask_TE`` is True
    (every entry if None): one assignment per kept ``(t, e)``, weight ``weights_TE[t, e]``.

    Used by gates that keep a variable number of experts per token (thresholds, top-p,
    DSelect-k's exact zeros) or route densely.
    """
    T, E = weights_TE.shape
    if mask_TE is None:
        experts_TE = torch.arange(E, device=weights_TE.device).expand(T, E)
        return Routing.from_topk(weights_TE, experts_TE, E, probs=probs, logits=logits)
    token_N, expert_N = mask_TE.nonzero(as_tuple=True)
    return Routing.from_assignments(
        token_N, expert_N, weights_TE[token_N, expert_N], n_experts=E, n_tokens=T, probs=probs, logits=logits
    )
