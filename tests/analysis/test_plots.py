import torch

from gatedmoe import MoE
from gatedmoe.analysis import (
    RoutingStats,
    plot_bars,
    plot_coactivation,
    plot_curves,
    plot_token_experts,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _stats(gate):
    moe = MoE(8, 4, 16, gate=gate)
    stats = RoutingStats()
    ids = torch.randint(0, 6, (20,))
    moe(torch.randn(20, 8))
    stats.update_model(moe, token_ids=ids)
    return stats


def test_plots_are_non_empty_pngs(tmp_path):
    stats = {"topk": _stats("topk_softmax"), "switch": _stats("switch")}
    paths = [
        plot_curves({"a": [[1, 2.0], [2, 1.5]], "b": [[1, 2.1], [2, 1.2]]}, tmp_path / "c.png"),
        plot_bars({"a": (0.5, 0.1), "b": (float("nan"), 0.0)}, tmp_path / "b.png", ylabel="entropy"),
        plot_coactivation(stats, tmp_path / "co.png"),
        plot_token_experts(stats, tmp_path / "tok.png", vocab=list(" \nabcd")),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 2000
