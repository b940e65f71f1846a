"""Routing analysis: statistics over batches and layers (load, balance, entropy, expert
co-activation, which tokens go to which expert), and plots."""

from gatedmoe.analysis.plots import plot_bars, plot_coactivation, plot_curves, plot_token_experts
from gatedmoe.analysis.routing_stats import RoutingStats

__all__ = ["RoutingStats", "plot_curves", "plot_bars", "plot_coactivation", "plot_token_experts"]
