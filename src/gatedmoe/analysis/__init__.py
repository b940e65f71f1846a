"""Routing analysis: statistics over batches and layers, and plots."""

from gatedmoe.analysis.routing_stats import RoutingStats

__all__ = ["RoutingStats"]
