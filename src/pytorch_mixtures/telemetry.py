"""Model-level routing telemetry: one compact table for logging, and a load heatmap.

* :func:`routing_stats`: every MoE layer's last-forward statistics as plain Python numbers
  (one host sync for the whole model), ready for a logger.
* :func:`plot_expert_load`: a heatmap of each layer's per-expert utilisation over training
  steps, from a list of :func:`routing_stats` tables (matplotlib, the ``[cli]`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .stats import RoutingStats

__all__ = ["LayerStats", "plot_expert_load", "routing_stats"]

#: one layer's row of :func:`routing_stats`: str -> int | float | list[int]
LayerStats = dict[str, Any]

_SCALARS = (
    "num_tokens",
    "dropped_fraction",
    "unrouted_fraction",
    "load_imbalance",
    "router_entropy",
    "top1_confidence",
    "dead_experts",
)
_INT_FIELDS = {"num_tokens", "dead_experts"}


def routing_stats(model: nn.Module) -> dict[str, LayerStats]:
    """Routing statistics of every layer in ``model`` that has run forward, by module name.

    Each row holds ``num_tokens``, ``dropped_fraction``, ``unrouted_fraction``,
    ``load_imbalance`` (max/mean load), ``router_entropy`` (nats), ``top1_confidence``,
    ``dead_experts`` and ``tokens_per_expert`` (a list of E ints): size O(layers * E),
    whatever the batch. Values describe each layer's *last* forward. All tensors are moved to
    the host at once (one sync), so calling it every few steps is cheap.

    Example::

        table = pm.routing_stats(model)
        history.append(table)
        logger.log({f"{name}/imbalance": row["load_imbalance"] for name, row in table.items()})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers: list[tuple[str, RoutingStats]] = []
    for name, module in model.named_modules():
        stats = getattr(module, "stats", None)
        if isinstance(stats, RoutingStats):
            layers.append((name, stats))
    if not layers:
        return {}
    scalar_rows = []
    for _, stats in layers:
        values = [getattr(stats, key).detach().float().reshape(()).cpu() for key in _SCALARS]
        scalar_rows.append(torch.stack(values))
    scalars = torch.stack(scalar_rows).tolist()
    table: dict[str, LayerStats] = {}
    for (name, stats), row in zip(layers, scalars, strict=True):
        entry: LayerStats = {
            key: int(value) if key in _INT_FIELDS else float(value)
            for key, value in zip(_SCALARS, row, strict=True)
        }
        entry["tokens_per_expert"] = [int(v) for v in stats.tokens_per_expert.tolist()]
        table[name or "<root>"] = entry
    return table


def plot_expert_load(
    history: Sequence[dict[str, LayerStats]],
    path: str | os.PathLike[str],
    *,
    steps: Sequence[int] | None = None,
    title: str | None = None,
) -> str:
    """Draw each layer's expert utilisation (load / mean load) over steps as a heatmap.

    One panel per layer (rows: experts, columns: steps; 1.0 is a perfectly balanced expert,
    0 a dead one). Requires matplotlib (``pip install 'pytorch-mixtures[cli]'``); it is
    imported here, not at package import, and drawn without pyplot's global state.

    Args:
        history: tables from :func:`routing_stats`, one per logged step.
        path: output file; the format follows its suffix (``.png``, ``.svg``, ``.pdf``).
        steps: the step number of each table (default 0, 1, 2, ...).
        title: optional figure title.

    Returns:
        ``path`` as a string.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_expert_load needs matplotlib: pip install 'pytorch-mixtures[cli]'"
        ) from error
    if not history:
        raise ValueError("history: expected at least one routing_stats table, got none")
    if steps is not None and len(steps) != len(history):
        raise ValueError(f"steps: expected one step per table ({len(history)}), got {len(steps)}")
    names = [name for name in history[-1]]
    if not names:
        raise ValueError("history: the last table has no layer (has the model run forward?)")
    xs = list(steps) if steps is not None else list(range(len(history)))

    figure = Figure(figsize=(max(4.0, 0.15 * len(xs) + 3.0), 2.2 * len(names) + 0.6))
    axes = figure.subplots(len(names), 1, squeeze=False)[:, 0]
    image = None
    for ax, name in zip(axes, names, strict=True):
        columns: list[list[float] | None] = []
        for table in history:
            loads = table.get(name, {}).get("tokens_per_expert")
            if loads is None:
                columns.append(None)
                continue
            mean = sum(loads) / max(len(loads), 1)
            columns.append([v / mean if mean > 0 else 0.0 for v in loads])
        width = max((len(c) for c in columns if c is not None), default=0)
        nan = float("nan")
        grid_ES = [[c[e] if c is not None else nan for c in columns] for e in range(width)]
        peak = max((v for row in grid_ES for v in row if v == v), default=0.0)
        image = ax.imshow(
            grid_ES,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            vmin=0.0,
            vmax=max(2.0, peak),
        )
        ticks = sorted({0, len(xs) - 1, *range(0, len(xs), max(1, len(xs) // 8))})
        ax.set_xticks(ticks, [str(xs[i]) for i in ticks])
        ax.set_ylabel(f"{name}\nexpert")
    axes[-1].set_xlabel("step")
    if image is not None:
        figure.colorbar(image, ax=list(axes), label="load / mean load")
    if title:
        figure.suptitle(title)
    figure.savefig(os.fspath(path))
    return os.fspath(path)
