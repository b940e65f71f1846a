"""Router replay: record which experts each `MoE` layer chose in one forward, and force the
same choice in a later forward.

Reinforcement-learning fine-tuning of an MoE scores tokens with one forward (the rollout)
and trains on them with another; if the router picks different experts the second time
(other kernels, other batch shapes, parameters updated in between), the policy ratio
compares two different networks. Replaying the rollout's routing in the training forward
keeps the expert choice fixed ("routing replay", Zheng et al. 2025 GSPO; "Rollout Routing
Replay", Ma et al. 2025).

What is recorded, per layer and per forward, is the gate's routing, compactly: the
assignments' token ids (int32), expert ids (int16 when E fits, else int32) and combine
weights (float32), N of each. Replay replaces the gate's output by the recorded
assignments, in the layer's ``route`` seam (a forward hook on the gate: the layer, its
subclasses such as `ExpertParallelMoE` and its capacity are untouched):

* ``weights="recorded"``: the recorded combine weights, constants (no gradient to the
  router through them);
* ``weights="router"``: the current router's probabilities at the recorded experts,
  renormalised over each token's recorded experts and scaled to its recorded weight sum.
  That is exactly the gate's own weight for gates that renormalise over their selection
  (``topk_softmax`` by default, ``sigmoid``, ``group_limited``), with the router's
  gradient; for other gates it equals the recorded weight at the recording's parameters.

The replayed routing carries the current router's ``probs`` and ``logits``, so the
auxiliary losses are computed on it as usual. A gate's bias balancer still observes the
counts of its own choice; leave it off (or in eval mode) while replaying.

Shape legend: T tokens, E experts, N assignments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gatedmoe.layers.moe import MoE
from gatedmoe.routing import Routing

__all__ = ["RecordedRouting", "RouterReplay", "REPLAY_WEIGHTS"]

REPLAY_WEIGHTS = ("recorded", "router")


@dataclass(frozen=True)
class RecordedRouting:
    """One layer's routing in one forward, compact (detached, on the CPU by default).

    ``token`` int32 ``[N]``, ``expert`` int16/int32 ``[N]`` (sorted by expert, as in
    `Routing`), ``weight`` float32 ``[N]``, ``n_tokens`` T, ``n_experts`` E.
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    n_tokens: int
    n_experts: int

    @classmethod
    def of(cls, routing: Routing, device: torch.device | str | None = "cpu") -> RecordedRouting:
        small = torch.int16 if routing.n_experts <= torch.iinfo(torch.int16).max else torch.int32
        return cls(
            token=routing.token.detach().to(device=device, dtype=torch.int32),
            expert=routing.expert.detach().to(device=device, dtype=small),
            weight=routing.weight.detach().to(device=device, dtype=torch.float32),
            n_tokens=routing.n_tokens,
            n_experts=routing.n_experts,
        )

    def routing(self, fresh: Routing, weights: str = "recorded") -> Routing:
        """The recorded assignments as a `Routing` on ``fresh``'s device, with ``fresh``'s
        (the current gate's) probabilities and logits; weights as ``weights`` says."""
        if weights not in REPLAY_WEIGHTS:
            raise ValueError(f"weights must be one of {REPLAY_WEIGHTS}, got {weights!r}")
        if (fresh.n_tokens, fresh.n_experts) != (self.n_tokens, self.n_experts):
            raise ValueError(
                f"the recorded routing has {self.n_tokens} tokens and {self.n_experts} experts; "
                f"this forward has {fresh.n_tokens} and {fresh.n_experts}"
            )
        device = fresh.token.device
        token, expert = self.token.to(device, torch.long), self.expert.to(device, torch.long)
        recorded = self.weight.to(device)
        if weights == "recorded":
            weight = recorded.to(fresh.weight.dtype)
        else:
            if fresh.probs is None:
                raise ValueError("weights='router' needs the gate's probs; this gate gives none")
            p_N = fresh.probs[token, expert]
            T = self.n_tokens
            p_T = torch.zeros(T, dtype=p_N.dtype, device=device).index_add(0, token, p_N)
            w_T = torch.zeros(T, dtype=p_N.dtype, device=device).index_add(0, token, recorded.to(p_N.dtype))
            weight = (p_N / p_T[token].clamp_min(torch.finfo(p_N.dtype).tiny) * w_T[token]).to(fresh.weight.dtype)
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=device).scatter_add_(0, expert, torch.ones_like(expert))
        return Routing(
            token=token, expert=expert, weight=weight, counts=counts, n_tokens=self.n_tokens,
            probs=fresh.probs, logits=fresh.logits,
        )


class RouterReplay:
    """Record the routing of every `MoE` layer of ``model``, then replay it.

    Parameters
    ----------
    model : nn.Module
        A model containing `MoE` layers (or one layer).
    device : str or torch.device, optional
        Where records are kept (default "cpu"; None keeps the routing's device).

    Attributes
    ----------
    records : dict[str, list[RecordedRouting]]
        Per layer (qualified module name, "" for the model itself), one record per forward
        made under `record`, in order.

    Examples
    --------
    >>> import torch, gatedmoe
    >>> moe = gatedmoe.MoE(8, n_experts=4, d_hidden=16, k=2)
    >>> replay = RouterReplay(moe)
    >>> x = torch.randn(5, 8)
    >>> with replay.record():
    ...     y = moe(x)
    >>> with torch.no_grad():
    ...     _ = moe.gate.weight.add_(torch.randn(4, 8))  # an update
    >>> with replay.replay():
    ...     y2 = moe(x)  # same experts, same weights as the recorded forward
    >>> torch.equal(moe.last_routing.expert, replay.records[""][0].expert.long())
    True
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = "cpu") -> None:
        self.layers: dict[str, MoE] = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
        if not self.layers:
            raise ValueError("model contains no gatedmoe.MoE layer to record")
        self.device = device
        self.records: dict[str, list[RecordedRouting]] = {n: [] for n in self.layers}

    def clear(self) -> None:
        """Forget every record."""
        for v in self.records.values():
            v.clear()

    @contextlib.contextmanager
    def _hooks(self, make_hook) -> Iterator[None]:
        handles = [layer.gate.register_forward_hook(make_hook(name)) for name, layer in self.layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def record(self) -> contextlib.AbstractContextManager[None]:
        """Within the block, every forward of each layer appends its gate's routing."""

        def make_hook(name: str):
            def hook(gate: nn.Module, args: tuple, routing: Routing) -> None:
                self.records[name].append(RecordedRouting.of(routing, self.device))

            return hook

        return self._hooks(make_hook)

    def replay(self, weights: str = "recorded") -> contextlib.AbstractContextManager[None]:
        """Within the block, the i-th forward of each layer routes as its i-th record
        (counting from the start of the block); ``weights``: "recorded" or "router"
        (module docstring). A forward past the last record raises IndexError; a record of
        another batch size raises ValueError."""
        if weights not in REPLAY_WEIGHTS:
            raise ValueError(f"weights must be one of {REPLAY_WEIGHTS}, got {weights!r}")
        cursor = dict.fromkeys(self.layers, 0)

        def make_hook(name: str):
            def hook(gate: nn.Module, args: tuple, routing: Routing) -> Routing:
                i = cursor[name]
                if i >= len(self.records[name]):
                    raise IndexError(f"layer {name!r}: forward {i + 1} under replay, but {len(self.records[name])} recorded")
                cursor[name] = i + 1
                return self.records[name][i].routing(routing, weights)

            return hook

        return self._hooks(make_hook)

    def state_dict(self) -> dict[str, Tensor]:
        """The records as flat tensors (``"{layer}.{i}.token"`` ...), e.g. for safetensors;
        `load_state_dict` reads them back."""
        out: dict[str, Tensor] = {}
        for name, recs in self.records.items():
            for i, r in enumerate(recs):
                p = f"{name}.{i}"
                out[f"{p}.token"], out[f"{p}.expert"], out[f"{p}.weight"] = r.token, r.expert, r.weight
                out[f"{p}.shape"] = torch.tensor([r.n_tokens, r.n_experts])
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the records by those of `state_dict` (layers absent there get none)."""
        self.clear()
        for name in self.records:
            i = 0
            while f"{name}.{i}.token" in state:
                p = f"{name}.{i}"
                T, E = state[f"{p}.shape"].tolist()
                self.records[name].append(
                    RecordedRouting(state[f"{p}.token"], state[f"{p}.expert"], state[f"{p}.weight"], int(T), int(E))
                )
                i += 1
