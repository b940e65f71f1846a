"""`RoutingStats`: routing statistics accumulated over batches and layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gatedmoe.routing import Routing

__all__ = ["RoutingStats"]


@dataclass
class _LayerTotals:
    counts: torch.Tensor  # [E] float64, assignments per expert
    n_tokens: int = 0
    n_assignments: int = 0
    n_dropped: int = 0
    entropy_sum: float = 0.0  # sum over tokens of the entropy of the gate distribution
    n_entropy_tokens: int = 0
    n_batches: int = field(default=0)
    # [E, E] float64: tokens routed to both i and j (diagonal: tokens routed to i).
    coactivation: torch.Tensor | None = None
    # [V, E] float64: assignments by input token id (grown as larger ids arrive).
    token_counts: torch.Tensor | None = None
    # [E] float64: sum of the combine weights of each expert's assignments.
    weight_sums: torch.Tensor | None = None


class RoutingStats:
    """Accumulate load per expert and routing quality over batches and layers.

    Per layer: ``load`` (fraction of assignments per expert), ``cv`` (coefficient of
    variation of the load), ``max_violation`` (max load / mean load - 1, as in
    "Auxiliary-Loss-Free Load Balancing"), ``entropy`` (mean per-token entropy of the gate
    distribution, nats; ``entropy_normalized`` divides by log E: 1 = uniform, the one
    `format`, `gatedmoe train` and `gatedmoe compare` show), ``weight_share`` (share of the
    combine weight per expert: the load of a dense gate, whose assignment load is uniform
    by construction), ``dropped_fraction``
    (assignments removed by capacity / assignments proposed), ``experts_per_token`` (mean
    executed assignments per token), ``coactivation`` (``[E, E]``: ``P(j | i)``, the
    fraction of tokens routed to expert i that also went to expert j).

    `coactivation` returns the raw counts; `token_expert_counts` returns assignments by
    input token id when ``token_ids`` were passed to `update` (which characters go to
    which expert).

    Examples
    --------
    >>> import torch
    >>> from gatedmoe import MoE
    >>> moe = MoE(8, 4, 16)
    >>> stats = RoutingStats()
    >>> _ = moe(torch.randn(10, 8)); stats.update_model(moe)
    >>> sorted(stats.summary()["layers"])
    ['moe']
    """

    def __init__(self) -> None:
        self._layers: dict[str, _LayerTotals] = {}

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    def reset(self) -> None:
        self._layers.clear()

    @torch.no_grad()
    def update(self, routing: Routing, layer: str = "moe", token_ids: torch.Tensor | None = None) -> None:
        """Add one batch's routing for ``layer``.

        ``token_ids`` (int, ``n_tokens`` elements, any shape) are the vocabulary ids of the
        routed tokens; when given, assignments are also counted per id.
        """
        if not isinstance(routing, Routing):
            raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
        if token_ids is not None and token_ids.numel() != routing.n_tokens:
            raise ValueError(f"token_ids has {token_ids.numel()} elements, the routing has {routing.n_tokens} tokens")
        acc = self._layers.get(layer)
        E = routing.n_experts
        if acc is None:
            acc = self._layers[layer] = _LayerTotals(
                counts=torch.zeros(E, dtype=torch.float64), coactivation=torch.zeros(E, E, dtype=torch.float64)
            )
        elif acc.counts.numel() != E:
            raise ValueError(f"layer {layer!r} had {acc.counts.numel()} experts, this routing has {E}")
        acc.counts += routing.counts.detach().to("cpu", torch.float64)
        w = torch.zeros(E, dtype=torch.float64)
        w.index_add_(0, routing.expert.cpu(), routing.weight.detach().to("cpu", torch.float64).abs())
        acc.weight_sums = w if acc.weight_sums is None else acc.weight_sums + w
        # Which experts each token went to, as a 0/1 matrix [T, E].
        hit_TE = torch.zeros(routing.n_tokens, E, dtype=torch.float64)
        hit_TE[routing.token.cpu(), routing.expert.cpu()] = 1.0
        acc.coactivation += hit_TE.T @ hit_TE
        if token_ids is not None:
            ids = token_ids.detach().reshape(-1).to("cpu", torch.long)
            V = int(ids.max()) + 1 if ids.numel() else 0
            if acc.token_counts is None:
                acc.token_counts = torch.zeros(V, E, dtype=torch.float64)
            elif acc.token_counts.shape[0] < V:
                grown = torch.zeros(V, E, dtype=torch.float64)
                grown[: acc.token_counts.shape[0]] = acc.token_counts
                acc.token_counts = grown
            per_token_TE = torch.zeros(routing.n_tokens, E, dtype=torch.float64)
            per_token_TE.index_put_((routing.token.cpu(), routing.expert.cpu()), torch.ones(routing.n_assignments, dtype=torch.float64), accumulate=True)
            acc.token_counts.index_add_(0, ids, per_token_TE)
        acc.n_tokens += routing.n_tokens
        acc.n_assignments += routing.n_assignments
        acc.n_dropped += routing.n_dropped
        acc.n_batches += 1
        if routing.probs is not None and routing.n_tokens:
            p = routing.probs.detach().double().clamp_min(1e-30)
            acc.entropy_sum += float(-(p * p.log()).sum())
            acc.n_entropy_tokens += routing.n_tokens

    def update_model(self, model: nn.Module, token_ids: torch.Tensor | None = None) -> None:
        """Add the ``last_routing`` of every MoE layer in ``model`` (named by module path);
        ``token_ids`` as in `update` (the ids of the forward's input, e.g. ``idx [B, S]``)."""
        found = False
        for name, m in model.named_modules():
            routing = getattr(m, "last_routing", None)
            if isinstance(routing, Routing):
                self.update(routing, name or "moe", token_ids)
                found = True
        if not found:
            raise ValueError("model has no MoE layer with a last_routing; run a forward first")

    def summary(self) -> dict:
        """Statistics per layer and averaged over layers, as plain Python numbers."""
        layers = {}
        for name, acc in self._layers.items():
            E = acc.counts.numel()
            total = acc.counts.sum().item()
            load = (acc.counts / total) if total else torch.zeros(E, dtype=torch.float64)
            mean = load.mean().item()
            proposed = acc.n_assignments + acc.n_dropped
            wsum = acc.weight_sums if acc.weight_sums is not None else torch.zeros(E, dtype=torch.float64)
            layers[name] = {
                "n_experts": E,
                "n_tokens": acc.n_tokens,
                "load": load.tolist(),
                "weight_share": (wsum / wsum.sum()).tolist() if wsum.sum() > 0 else load.tolist(),
                "cv": (load.std(unbiased=False).item() / mean) if mean else 0.0,
                "max_violation": (load.max().item() / mean - 1.0) if mean else 0.0,
                "entropy": acc.entropy_sum / acc.n_entropy_tokens if acc.n_entropy_tokens else float("nan"),
                "entropy_normalized": (
                    acc.entropy_sum / acc.n_entropy_tokens / math.log(E) if acc.n_entropy_tokens and E > 1 else float("nan")
                ),
                "dropped_fraction": acc.n_dropped / proposed if proposed else 0.0,
                "experts_per_token": acc.n_assignments / acc.n_tokens if acc.n_tokens else 0.0,
                "coactivation": self._conditional(acc.coactivation).tolist(),
            }
        keys = ["cv", "max_violation", "entropy", "entropy_normalized", "dropped_fraction", "experts_per_token"]
        overall = {k: sum(v[k] for v in layers.values()) / len(layers) for k in keys} if layers else {}
        return {"layers": layers, "mean": overall}

    @staticmethod
    def _conditional(co: torch.Tensor) -> torch.Tensor:
        diag = co.diagonal().clone()
        return torch.where(diag[:, None] > 0, co / diag.clamp_min(1.0)[:, None], torch.zeros_like(co))

    def _get(self, layer: str) -> _LayerTotals:
        if layer not in self._layers:
            raise ValueError(f"unknown layer {layer!r}; recorded layers: {', '.join(self._layers) or 'none'}")
        return self._layers[layer]

    def coactivation(self, layer: str, normalize: bool = False) -> torch.Tensor:
        """``[E, E]`` float64: tokens routed to both experts i and j (diagonal: to i).

        ``normalize=True`` divides row i by the diagonal entry: ``P(j | i)``.
        """
        co = self._get(layer).coactivation
        return self._conditional(co) if normalize else co.clone()

    def token_expert_counts(self, layer: str) -> torch.Tensor:
        """``[V, E]`` float64: assignments of tokens with id v to expert e (V = largest id
        seen + 1). Needs ``token_ids`` in `update`."""
        acc = self._get(layer)
        if acc.token_counts is None:
            raise ValueError(f"no token ids recorded for layer {layer!r}; pass token_ids to update()")
        return acc.token_counts.clone()

    def format(self) -> str:
        """A plain-text table of `summary`, one row per layer. ``entropy/logE`` is the
        normalised routing entropy (1 = uniform over experts), as in `gatedmoe compare`."""
        s = self.summary()
        rows = [f"{'layer':<24} {'load CV':>7} {'max viol':>9} {'entropy/logE':>12} {'dropped %':>9}"]
        for name, v in {**s["layers"], **({"mean": s["mean"]} if s["mean"] else {})}.items():
            ent = v["entropy_normalized"]
            ent_s = "n/a" if math.isnan(ent) else f"{ent:.3f}"
            rows.append(
                f"{name[-24:]:<24} {v['cv']:7.3f} {v['max_violation']:9.3f} {ent_s:>12} {100 * v['dropped_fraction']:9.2f}"
            )
        return "\n".join(rows)

    def plot(self, path: str | Path, title: str = "Expert load (1 = uniform)", *, vmin: float | None = None,
             vmax: float | None = None, quantity: str = "load") -> Path:
        """Save a PNG heatmap, layers x experts, of load relative to uniform.

        ``quantity="weight_share"`` draws the share of the combine weight instead (the load
        of a dense gate). ``vmin`` / ``vmax`` fix the colour scale, so that heatmaps of
        several runs drawn with the same values compare by colour.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if quantity not in ("load", "weight_share"):
            raise ValueError(f"quantity must be 'load' or 'weight_share', got {quantity!r}")
        if not self._layers:
            raise ValueError("no routing recorded yet; call update() first")
        grid = self.relative_grid(quantity)
        s = self.summary()["layers"]
        E = grid.shape[1]
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * E + 2), max(2, 0.4 * len(s) + 1.2)))
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(s)), [n[-20:] for n in s])
        ax.set_title(title)
        label = "load / uniform" if quantity == "load" else "weight share / uniform"
        fig.colorbar(im, ax=ax, label=label)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def relative_grid(self, quantity: str = "load") -> torch.Tensor:
        """``[layers, E]`` float: ``quantity`` ("load" or "weight_share") per expert times
        the layer's E (1 = uniform), layers in recording order; NaN past a layer's E."""
        s = self.summary()["layers"]
        E = max(v["n_experts"] for v in s.values())
        grid = torch.full((len(s), E), float("nan"))
        for i, v in enumerate(s.values()):
            grid[i, : v["n_experts"]] = torch.tensor(v[quantity]) * v["n_experts"]
        return grid
