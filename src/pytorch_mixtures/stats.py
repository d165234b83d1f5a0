"""Routing telemetry: what the router did in a layer's last forward, and across a model.

* :class:`RoutingStats`: one layer's last forward. All fields are tensors computed on the
  routing device without host syncs; reading a value (``float(stats.dropped_fraction)``) is what
  syncs.
* :func:`routing_stats`: every MoE layer's last-forward statistics as plain Python numbers
  (one host sync for the whole model), ready for a logger.
* :func:`plot_expert_load`: a heatmap of each layer's per-expert utilisation over training
  steps, from a list of :func:`routing_stats` tables (matplotlib, the ``[cli]`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .dispatch import DispatchPlan
from .routing import RouterOutput

__all__ = ["LayerStats", "RoutingStats", "plot_expert_load", "routing_stats", "routing_stats_from"]


@dataclass(frozen=True)
class RoutingStats:
    """Routing statistics of one forward.

    Attributes:
        tokens_per_expert: ``[E]`` int64, slots each expert processed (after drops).
        num_tokens: 0-dim int64, real (non-padding) tokens routed.
        requested_slots: 0-dim int64, slots the router asked for (``num_tokens * top_k`` for
            top-k; for expert choice, the real-token slots the experts picked).
        dropped_slots: 0-dim int64, requested slots dropped by capacity.
        unrouted_tokens: 0-dim int64, real tokens with no kept slot (their layer output is 0).
        token_choice: True for token-choice routing (top-k), False for expert choice.
        router_entropy: 0-dim float32, mean over real tokens of the entropy (nats) of the
            router's distribution over experts (sigmoid scores normalised per token); ``log E``
            for a uniform router, 0 for a one-hot one.
        top1_confidence: 0-dim float32, mean over real tokens of the largest probability.
        nonfinite_tokens: 0-dim int64, real tokens whose input row or router logits hold NaN or
            inf (non-finite router weights show here). They are routed like any other token
            (their own output is then non-finite); in dropless top-k routing no other token's
            output is affected.
        zero_computation_slots: kind (``"zero"``, ``"copy"``, ``"constant"``) -> 0-dim int64,
            kept slots sent to that kind of zero-computation expert (MoE++; ``MoELayer``'s
            ``zero_computation_experts`` / ``num_noop_experts``); empty for a layer without
            them. These experts are also the last entries of ``tokens_per_expert``.
        active_experts_per_token: 0-dim float32, mean over real tokens of the kept slots per
            token (the realised number of active experts: ``top_k`` for dropless top-k, fewer
            with drops; variable for ``ReLURouter``, whose target is ``target_k``).
    """

    tokens_per_expert: Tensor
    num_tokens: Tensor
    requested_slots: Tensor
    dropped_slots: Tensor
    unrouted_tokens: Tensor
    token_choice: bool = True
    router_entropy: Tensor = field(default_factory=lambda: torch.zeros(()))
    top1_confidence: Tensor = field(default_factory=lambda: torch.zeros(()))
    nonfinite_tokens: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    zero_computation_slots: Mapping[str, Tensor] = field(default_factory=dict)
    active_experts_per_token: Tensor = field(default_factory=lambda: torch.zeros(()))

    @property
    def zero_computation_fraction(self) -> Tensor:
        """0-dim float32: the share of kept slots that went to zero-computation experts (the
        compute MoE++ saves; 0 for a layer without them)."""
        kept = self.tokens_per_expert.sum().clamp_min(1).float()
        if not self.zero_computation_slots:
            return torch.zeros((), device=kept.device)
        total = torch.stack(list(self.zero_computation_slots.values())).sum()
        return total.float() / kept

    @property
    def utilisation(self) -> Tensor:
        """``[E]`` float32: load / ideal load, ideal = requested slots / E (1.0 everywhere at
        perfect balance; below 1 on average when slots are dropped)."""
        num_experts = self.tokens_per_expert.numel()
        ideal = self.requested_slots.float().clamp_min(1.0) / max(num_experts, 1)
        return self.tokens_per_expert.float() / ideal

    @property
    def dead_experts(self) -> Tensor:
        """0-dim int64: experts that processed no token in this forward."""
        return self.tokens_per_expert.eq(0).sum()

    @property
    def dropped_fraction(self) -> Tensor:
        """0-dim float: the share of routing lost to capacity.

        Token choice: dropped slots / requested slots (0 when dropless). Expert choice, where
        no requested slot is dropped: the fraction of tokens that no expert picked.
        """
        if not self.token_choice:
            return self.unrouted_fraction
        return self.dropped_slots.float() / self.requested_slots.clamp_min(1).float()

    @property
    def unrouted_fraction(self) -> Tensor:
        """0-dim float: fraction of real tokens that got no expert at all."""
        return self.unrouted_tokens.float() / self.num_tokens.clamp_min(1).float()

    @property
    def load_imbalance(self) -> Tensor:
        """0-dim float: max over mean of ``tokens_per_expert`` (1.0 is perfect balance)."""
        load_E = self.tokens_per_expert.float()
        return load_E.max() / load_E.mean().clamp_min(1e-9)


def routing_stats_from(
    route: RouterOutput,
    plan: DispatchPlan,
    x_ND: Tensor | None = None,
    *,
    zero_computation: Mapping[str, tuple[int, int]] | None = None,
) -> RoutingStats:
    """Statistics of one routing and its dispatch plan; ``x_ND`` ``[N, D]`` (the routed input)
    adds the count of non-finite tokens; ``zero_computation`` (kind -> ``[start, end)`` of its
    expert ids) adds the per-kind counts of kept slots sent to zero-computation experts."""
    num_tokens = route.num_tokens
    if route.token_mask is None:
        real_tokens = torch.tensor(num_tokens, device=route.kept.device)
        real_slots_S = torch.ones_like(route.kept)
    else:
        real_tokens = route.token_mask.sum()
        real_slots_S = route.token_mask[route.token_ids]
    requested = real_slots_S.sum()
    dropped = (real_slots_S & ~route.kept).sum()
    kept_per_token_N = torch.zeros(num_tokens, dtype=torch.long, device=route.kept.device)
    kept_per_token_N.index_add_(0, route.token_ids, route.kept.long())
    unrouted_N = kept_per_token_N.eq(0)
    if route.token_mask is not None:
        unrouted_N = unrouted_N & route.token_mask
        kept_per_token_N = torch.where(route.token_mask, kept_per_token_N, 0)
    # kept slots of real tokens / real tokens (padding's slots are never kept)
    active = kept_per_token_N.sum().float() / real_tokens.clamp_min(1).float()
    entropy, confidence = _router_confidence(route)
    # a token whose input or router logits hold NaN/inf (NaN router weights show here too)
    nonfinite_N = ~torch.isfinite(route.logits.detach()).all(dim=-1)
    if x_ND is not None:
        nonfinite_N = nonfinite_N | ~torch.isfinite(x_ND.detach()).all(dim=-1)
    if route.token_mask is not None:
        nonfinite_N = nonfinite_N & route.token_mask
    nonfinite = nonfinite_N.sum()
    tokens_per_expert = plan.tokens_per_expert.detach()
    zero_computation_slots = {
        kind: tokens_per_expert[start:end].sum()
        for kind, (start, end) in (zero_computation or {}).items()
    }
    return RoutingStats(
        tokens_per_expert=tokens_per_expert,
        num_tokens=real_tokens,
        requested_slots=requested,
        dropped_slots=dropped,
        unrouted_tokens=unrouted_N.sum(),
        token_choice=route.slots_per_token is not None,
        router_entropy=entropy,
        top1_confidence=confidence,
        nonfinite_tokens=nonfinite,
        zero_computation_slots=zero_computation_slots,
        active_experts_per_token=active,
    )


@torch.no_grad()
def _router_confidence(route: RouterOutput) -> tuple[Tensor, Tensor]:
    """Mean entropy and mean top-1 probability of the router's per-token distributions."""
    probs_NE = route.probs.detach().float()
    if probs_NE.numel() == 0:
        zero = torch.zeros((), device=probs_NE.device)
        return zero, zero
    # sigmoid scores do not sum to 1: normalise (softmax rows are unchanged)
    probs_NE = probs_NE / probs_NE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    entropy_N = -torch.special.xlogy(probs_NE, probs_NE).sum(dim=-1)
    top1_N = probs_NE.max(dim=-1).values
    if route.token_mask is None:
        return entropy_N.mean(), top1_N.mean()
    real_N = route.token_mask.float()
    count = real_N.sum().clamp_min(1.0)
    return (entropy_N * real_N).sum() / count, (top1_N * real_N).sum() / count


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
    "active_experts_per_token",
)
_INT_FIELDS = {"num_tokens", "dead_experts"}


def routing_stats(model: nn.Module) -> dict[str, LayerStats]:
    """Routing statistics of every layer in ``model`` that has run forward, by module name.

    Each row holds ``num_tokens``, ``dropped_fraction``, ``unrouted_fraction``,
    ``load_imbalance`` (max/mean load), ``router_entropy`` (nats), ``top1_confidence``,
    ``dead_experts``, ``active_experts_per_token`` and ``tokens_per_expert`` (a list of E
    ints), and for layers with
    zero-computation experts ``zero_computation_slots`` (kind -> int) and
    ``zero_computation_fraction``: size O(layers * E),
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
    # one flat vector for every layer's scalars (and zero-computation counts): one host sync
    values: list[Tensor] = []
    for _, stats in layers:
        values += [getattr(stats, key).detach().float().reshape(()).cpu() for key in _SCALARS]
        if stats.zero_computation_slots:
            values.append(stats.zero_computation_fraction.detach().float().reshape(()).cpu())
            values += [
                v.detach().float().reshape(()).cpu() for v in stats.zero_computation_slots.values()
            ]
    flat = torch.stack(values).tolist()
    table: dict[str, LayerStats] = {}
    at = 0
    for name, stats in layers:
        row = flat[at : at + len(_SCALARS)]
        at += len(_SCALARS)
        entry: LayerStats = {
            key: int(value) if key in _INT_FIELDS else float(value)
            for key, value in zip(_SCALARS, row, strict=True)
        }
        entry["tokens_per_expert"] = [int(v) for v in stats.tokens_per_expert.tolist()]
        if stats.zero_computation_slots:
            entry["zero_computation_fraction"] = float(flat[at])
            kinds = list(stats.zero_computation_slots)
            counts = flat[at + 1 : at + 1 + len(kinds)]
            entry["zero_computation_slots"] = {
                kind: int(count) for kind, count in zip(kinds, counts, strict=True)
            }
            at += 1 + len(kinds)
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
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    target = Path(path)
    if target.is_dir() or target.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise ValueError(
            f"path: expected an image file name ending in .png, .svg, .pdf or .jpg, got "
            f"{str(target)!r}{' (a directory)' if target.is_dir() else ''}"
        )
    if not target.parent.is_dir():
        raise ValueError(f"path: expected a file in an existing folder, got {str(target)!r}")
    if (
        not isinstance(history, Sequence)
        or not all(isinstance(t, dict) for t in history)
        or not all(isinstance(row, dict) for t in history for row in t.values())
    ):
        raise TypeError(
            "history: expected a list of routing_stats tables (dicts of per-layer dicts)"
        )
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
