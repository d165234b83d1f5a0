"""Compatibility module: the model-level telemetry now lives in :mod:`pytorch_mixtures.stats`.
Kept so that ``pytorch_mixtures.telemetry.X`` still works."""

from .stats import LayerStats, plot_expert_load, routing_stats

__all__ = ["LayerStats", "plot_expert_load", "routing_stats"]
