"""`MoEConfig`: the settings of one `gatedmoe.MoE` layer, in one frozen value.

This is the one place that lists the layer's settings; models, layer variants, arena
presets, the CLI and the Hugging Face converters carry it whole instead of relaying
arguments one by one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gatedmoe.dispatch.options import TritonOptions
from gatedmoe.gates.balancing import BALANCE_EVERY
from gatedmoe.losses import COUNTS

__all__ = ["LOAD_BALANCE_SCOPES", "MoEConfig"]

LOAD_BALANCE_SCOPES = ("micro_batch", "sequence", "global_batch")


def _positive_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _bool(name: str, v: object) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")


def _finite_nonneg(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")


def _described_gate_names() -> set[str]:
    """Names a config may record for a built gate (`gatedmoe.MoE` records its
    ``registry_name``, else its class name): those of every defined `Gate` subclass."""
    from gatedmoe.gates.base import Gate

    names, todo = set(), [Gate]
    while todo:
        cls = todo.pop()
        names.add(getattr(cls, "registry_name", cls.__name__))
        todo.extend(cls.__subclasses__())
    return names


def _check_gate_settings(gate: str, k: int, n_experts: int, bias_update_rate: float) -> None:
    """What building the layer would refuse about the gate, refused by the config with the
    same messages: an unknown gate name, a k out of range for a top-k gate, bias balancing
    on a gate that is not token choice. A name that only describes a built gate (a `Gate`
    subclass outside the registry, e.g. the Hugging Face adapters') passes: such a config
    is built with ``MoE.from_config(config, gate=...)``."""
    # Imported here: the gates import `gatedmoe.routing` and friends, not this module, but
    # keep this module import-light.
    from gatedmoe.gates import registry
    from gatedmoe.gates.base import check_k

    if gate not in registry.names():
        if gate in _described_gate_names():
            return
        registry.get(gate)  # ValueError listing the known gates
    cls = registry.get(gate)
    if cls.uses_k:
        check_k(k, n_experts)
    if bias_update_rate > 0 and not cls.token_choice:
        raise ValueError(
            f"gate {cls.__name__} is not a token-choice gate; bias balancing "
            "needs a gate whose tokens select experts from a score"
        )


def _check_activation(activation: str) -> None:
    """An unknown activation name, refused by the config with the message building the
    layer would give (listing the known names). A built activation outside the registry
    (a user's `Activation` may carry any name) is recorded by `MoEConfig._describing`."""
    # Imported here: the activations import torch; keep this module import-light.
    from gatedmoe.experts.activations import activation_names, get_activation

    if activation not in activation_names():
        get_activation(activation)  # ValueError listing the known activations


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Settings of a sparse MoE layer (`gatedmoe.MoE`); frozen, keyword-only.

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
        Experts per token for the top-k gates (``Gate.uses_k``; default 2). The other gates
        ignore it: the dense ones, those that choose their own number per token, and
        ``modified_softmax``, dense unless given its optional top-k as ``gate_kwargs={"k": ...}``.
    activation : str
        Expert activation (default "swiglu"; see ``gatedmoe.experts.activation_names()``;
        another name is a ValueError listing them). A layer built with an activation
        outside the registry records that activation's name (see `gatedmoe.MoE`).
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
    backend_options : TritonOptions, optional
        Options value of the Triton backend (scatter precision, kernel configs); None = its
        defaults. Refused with ``backend="grouped"``, which has none.
    load_balance_weight, router_z_weight : float
        Weights of the load-balancing loss (default 0.01) and ST-MoE router z-loss
        (default 0.001) in ``aux_losses``; 0 turns one off.
    load_balance_scope : {"micro_batch", "sequence", "global_batch"}
        Over which tokens the load-balancing loss counts and averages (`gatedmoe.losses`;
        docs/training.md): "micro_batch" (default, Switch Transformers: this forward's
        tokens), "sequence" (DeepSeek-V2/V3 sequence-wise loss: each sequence of the input
        ``x [..., L, D]`` alone, averaged; a 2-D input is one sequence), "global_batch"
        (Qwen, Qiu et al. 2025: expert frequencies summed over the layer's balance group of
        ranks and over the micro-batches of the optimizer step so far; the probabilities
        stay this forward's; call ``gatedmoe.balance_step(model)`` after each optimizer
        step).
    load_balance_count : {"routed", "kept"}
        Whether the loss counts assignments as the gate routed them, before capacity drops
        ("routed", default: the Switch paper's definition), or only those kept.
    check_inputs : bool
        Fail on NaN/inf in the input (default True, for every layer variant too): a
        ValueError on the CPU; on an accelerator, or under ``torch.compile``, a device-side
        assertion (no host sync: the step fails with a RuntimeError "device-side assert
        triggered" at the next synchronisation). False passes NaN/inf through to the output.
    gate_kwargs : mapping
        Extra keyword arguments for the gate (e.g. ``{"noisy": True}``); treat as read-only.
    bias_update_rate : float
        If > 0, attach auxiliary-loss-free bias balancing (Wang et al. 2024) to the gate
        with this update rate (token-choice gates only). Default 0: off.
    bias_update_every : {"forward", "step"}
        When the selection bias of a gate with a balancer moves: after each training
        forward from its counts ("forward", default), or once per optimizer step from the
        counts accumulated over its micro-batches and summed over the balance group's
        ranks ("step", DeepSeek-V3; call ``gatedmoe.balance_step(model)`` after
        ``optimizer.step()``).

    Examples
    --------
    >>> from gatedmoe import MoE, MoEConfig
    >>> cfg = MoEConfig(d_model=16, n_experts=4, d_hidden=32, k=1)
    >>> moe = MoE.from_config(cfg)
    >>> moe.config.replace(k=2).k
    2
    """

    d_model: int
    n_experts: int
    d_hidden: int
    gate: str = "topk_softmax"
    k: int = 2
    activation: str = "swiglu"
    bias: bool = False
    n_shared_experts: int = 0
    d_shared_hidden: int | None = None
    capacity_factor: float | None = None
    capacity_priority: str = "position"
    backend: str = "auto"
    backend_options: TritonOptions | None = None
    load_balance_weight: float = 0.01
    router_z_weight: float = 0.001
    check_inputs: bool = True
    gate_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    bias_update_rate: float = 0.0
    load_balance_scope: str = "micro_batch"
    load_balance_count: str = "routed"
    bias_update_every: str = "forward"

    def __post_init__(self) -> None:
        # Imported here: the dispatch registry is cheap, but keep this module import-light.
        from gatedmoe.dispatch import check_backend_name

        for name in ("d_model", "n_experts", "d_hidden"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.gate, str):
            raise TypeError(f"gate must be a gate name (str), got {type(self.gate).__name__}")
        if not isinstance(self.activation, str):
            raise TypeError(f"activation must be an activation name (str), got {type(self.activation).__name__}")
        _check_activation(self.activation)
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"k must be an int, got {type(self.k).__name__}")
        if self.k < 1:
            raise ValueError(f"k must satisfy 1 <= k <= n_experts={self.n_experts}, got k={self.k}")
        _bool("bias", self.bias)
        _bool("check_inputs", self.check_inputs)
        if isinstance(self.n_shared_experts, bool) or not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be an int >= 0, got {self.n_shared_experts!r}")
        if self.d_shared_hidden is not None:
            _positive_int("d_shared_hidden", self.d_shared_hidden)
        cf = self.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf) or not cf > 0):
            raise ValueError(f"capacity_factor must be > 0 or None, got {cf}")
        if self.capacity_priority not in ("position", "score"):
            raise ValueError(f"capacity_priority must be 'position' or 'score', got {self.capacity_priority!r}")
        check_backend_name(self.backend)
        if self.backend_options is not None:
            if not isinstance(self.backend_options, TritonOptions):
                raise TypeError(f"backend_options must be a TritonOptions or None, got {type(self.backend_options).__name__}")
            if self.backend == "grouped":
                raise ValueError("backend_options are options of the 'triton' backend; backend='grouped' takes none")
        _finite_nonneg("load_balance_weight", self.load_balance_weight)
        _finite_nonneg("router_z_weight", self.router_z_weight)
        _finite_nonneg("bias_update_rate", self.bias_update_rate)
        _check_gate_settings(self.gate, self.k, self.n_experts, self.bias_update_rate)
        for name, known in (
            ("load_balance_scope", LOAD_BALANCE_SCOPES), ("load_balance_count", COUNTS), ("bias_update_every", BALANCE_EVERY)
        ):
            if getattr(self, name) not in known:
                raise ValueError(f"{name} must be one of {known}, got {getattr(self, name)!r}")
        if not isinstance(self.gate_kwargs, Mapping):
            raise TypeError(f"gate_kwargs must be a mapping, got {type(self.gate_kwargs).__name__}")
        # A private copy, so a caller's later edits to its dict cannot change a frozen config.
        object.__setattr__(self, "gate_kwargs", dict(self.gate_kwargs))

    @classmethod
    def _describing(cls, activation: str, **settings: Any) -> MoEConfig:
        """The config of a layer built with an activation outside the registry: ``settings``
        checked as usual, ``activation`` the built activation's name, which no registry lists
        (so a `replace` or `from_dict` of this config refuses it: only the built activation
        gives it a meaning, through ``MoE.from_config(config, experts=...)``)."""
        config = cls(**settings)
        object.__setattr__(config, "activation", activation)
        return config

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with ``changes`` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self, plain: bool = False) -> dict[str, Any]:
        """The settings as a dict (``gate_kwargs`` copied). ``backend_options`` as is, or with
        ``plain=True`` as `TritonOptions.to_dict` writes it, so that the dict is JSON-able
        wherever the gate's keyword arguments are (checkpoints); `from_dict` reads both."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["gate_kwargs"] = dict(self.gate_kwargs)
        if plain and self.backend_options is not None:
            d["backend_options"] = self.backend_options.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MoEConfig:
        """Inverse of `to_dict` (either form); validated like a new config.

        Examples
        --------
        >>> cfg = MoEConfig(d_model=8, n_experts=4, d_hidden=16, backend_options=TritonOptions(decode=False))
        >>> MoEConfig.from_dict(cfg.to_dict(plain=True)) == MoEConfig.from_dict(cfg.to_dict()) == cfg
        True
        """
        d = dict(d)
        if isinstance(d.get("backend_options"), Mapping):
            d["backend_options"] = TritonOptions.from_dict(d["backend_options"])
        return cls(**d)
