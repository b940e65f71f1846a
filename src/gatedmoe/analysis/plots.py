"""Plots of routing and training across several runs (PNG files, matplotlib's Agg backend).

Each function takes plain numbers or `RoutingStats` keyed by a run label, writes one PNG
and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from gatedmoe.analysis.routing_stats import RoutingStats

__all__ = ["plot_curves", "plot_bars", "plot_coactivation", "plot_token_experts"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _grid(n: int, panel: tuple[float, float]):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False,
                                   layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def plot_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: str | Path, *, ylabel: str = "validation loss",
                title: str = "", bands: Mapping[str, Sequence[Sequence[float]]] | None = None) -> Path:
    """One line per label through points ``[(step, value), ...]``; ``bands[label]``, points
    ``[(step, low, high), ...]``, shades a band around that label's line (e.g. ± one
    standard deviation over seeds)."""
    if not curves:
        raise ValueError("curves is empty")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, pts in curves.items():
        if pts:
            xs, ys = zip(*[(p[0], p[1]) for p in pts], strict=True)
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label)
            band = (bands or {}).get(label)
            if band:
                bx, lo, hi = zip(*[(p[0], p[1], p[2]) for p in band], strict=True)
                ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(values: Mapping[str, tuple[float, float]], path: str | Path, *, ylabel: str, title: str = "") -> Path:
    """One bar per label, ``(mean, std)`` (std drawn as an error bar when > 0)."""
    if not values:
        raise ValueError("values is empty")
    plt = _pyplot()
    labels = list(values)
    means = [values[k][0] for k in labels]
    stds = [values[k][1] for k in labels]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(labels) + 1.5), 3.6))
    ax.bar(range(len(labels)), [0.0 if math.isnan(m) else m for m in means], yerr=stds if any(x > 0 for x in stds) else None,
           capsize=4, color="#4c72b0")
    for i, m in enumerate(means):
        if math.isnan(m):
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _layer(stats: RoutingStats, layer: str | None) -> str:
    if not stats.layer_names:
        raise ValueError("no routing recorded yet; call update() first")
    return stats.layer_names[0] if layer is None else layer


def plot_coactivation(stats: Mapping[str, RoutingStats], path: str | Path, *, layer: str | None = None) -> Path:
    """Per label, the ``[E, E]`` expert co-activation ``P(j | i)`` of one MoE layer
    (default: the first): the fraction of tokens routed to expert i that also went to j.
    The diagonal (1 by definition) is grey."""
    if not stats:
        raise ValueError("stats is empty")
    fig, axes = _grid(len(stats), (3.4, 3.2))
    for ax, (label, st) in zip(axes, stats.items(), strict=True):
        name = _layer(st, layer)
        co = st.coactivation(name, normalize=True)
        # The diagonal is 1 by definition (a token routed to i is routed to i): grey, not data.
        co.fill_diagonal_(float("nan"))
        cmap = _pyplot().get_cmap("magma").with_extremes(bad="#bbbbbb")
        im = ax.imshow(co.numpy(), vmin=0, vmax=1, cmap=cmap)
        ax.set_title(f"{label}\n{name}", fontsize=8)
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("expert i", fontsize=8)
    fig.colorbar(im, ax=axes, label="P(j | i)", shrink=0.8)
    return _save(fig, path)


def _token_label(vocab: Sequence[str], i: int) -> str:
    if i >= len(vocab):
        return str(i)
    # Whitespace would be an empty tick label.
    return {" ": "␣", "\n": "\\n", "\t": "\\t"}.get(vocab[i], vocab[i])


def plot_token_experts(stats: Mapping[str, RoutingStats], path: str | Path, vocab: Sequence[str], *,
                       layer: str | None = None, top: int = 30) -> Path:
    """Per label, which tokens go to which expert in one MoE layer (default: the first):
    rows are the ``top`` most frequent tokens, each row its assignments' share per expert.
    Every panel has the same rows in the same order (frequency summed over all labels) and
    the same colour scale, so panels compare row by row.

    ``vocab[i]`` is the text of token id i (characters are shown with ``repr`` for
    whitespace).
    """
    if not stats:
        raise ValueError("stats is empty")
    all_counts = {label: st.token_expert_counts(_layer(st, layer)) for label, st in stats.items()}
    V = max(c.shape[0] for c in all_counts.values())
    freq = torch.zeros(V, dtype=torch.float64)
    for c in all_counts.values():
        freq[: c.shape[0]] += c.sum(1) / c.sum().clamp_min(1.0)
    order = torch.argsort(freq, descending=True, stable=True)[:top]
    order = order[freq[order] > 0]
    fig, axes = _grid(len(stats), (3.6, 0.17 * top + 1.4))
    im = None
    for ax, (label, st) in zip(axes, stats.items(), strict=True):
        name = _layer(st, layer)
        counts = torch.zeros(V, all_counts[label].shape[1], dtype=torch.float64)
        counts[: all_counts[label].shape[0]] = all_counts[label]
        rows = counts[order]
        share = rows / rows.sum(1, keepdim=True).clamp_min(1e-30)
        share[rows.sum(1) == 0] = float("nan")
        im = ax.imshow(share.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ticks = [_token_label(vocab, i) for i in order.tolist()]
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"{label}\n{name}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, label="share of the token's assignments", shrink=0.8)
    return _save(fig, path)
