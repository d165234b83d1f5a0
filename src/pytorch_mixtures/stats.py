"""Routing telemetry: what the router did in a layer's last forward.

All fields are tensors computed on the routing device without host syncs; reading a value
(``float(stats.dropped_fraction)``) is what syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .dispatch import DispatchPlan
from .routing import RouterOutput

__all__ = ["RoutingStats", "routing_stats_from"]


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
        nonfinite_tokens: 0-dim int64, real tokens whose input row holds NaN or inf. They are
            routed like any other token (their own output is then non-finite); in dropless
            top-k routing no other token's output is affected.
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
    route: RouterOutput, plan: DispatchPlan, x_ND: Tensor | None = None
) -> RoutingStats:
    """Statistics of one routing and its dispatch plan; ``x_ND`` ``[N, D]`` (the routed input)
    adds the count of non-finite tokens."""
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
    entropy, confidence = _router_confidence(route)
    if x_ND is None:
        nonfinite = torch.zeros((), dtype=torch.long, device=route.kept.device)
    else:
        nonfinite_N = ~torch.isfinite(x_ND.detach()).all(dim=-1)
        if route.token_mask is not None:
            nonfinite_N = nonfinite_N & route.token_mask
        nonfinite = nonfinite_N.sum()
    return RoutingStats(
        tokens_per_expert=plan.tokens_per_expert.detach(),
        num_tokens=real_tokens,
        requested_slots=requested,
        dropped_slots=dropped,
        unrouted_tokens=unrouted_N.sum(),
        token_choice=route.slots_per_token is not None,
        router_entropy=entropy,
        top1_confidence=confidence,
        nonfinite_tokens=nonfinite,
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
