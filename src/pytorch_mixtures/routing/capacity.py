"""Per-expert capacity: how many slots each expert takes, and which slots fit.

* Token choice (GShard / Switch): ``C = ceil(cf * tokens * K / E)``; overflow is dropped for
  that expert only. Which slots an overfull expert keeps is the *drop policy*:
  ``"position"`` (GShard, Lepikhin et al. 2020: slots fill in priority order, all first
  choices by token position, then all second choices, ...) or ``"probs"`` (Megatron-Core's
  ``moe_token_drop_policy="probs"``, DeepSpeed's ``drop_policy="probs"``: each expert keeps
  its C highest-weighted slots, so the lowest-scoring slots are dropped first).
* Expert choice (Zhou et al. 2022): each expert takes ``C`` tokens per sequence.

Capacities are exact integers: a factor is read as the decimal it was written as
(``Fraction(repr(cf))``: 2.2 is 11/5, not the binary float 2.2000000000000002), and
``ceil(p * n / q)`` is integer arithmetic, so ``2.2 * 45 / 3`` gives 33, not 34.

Shape legend: N tokens, K slots per token, E experts, T sequence length.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DROP_POLICIES",
    "DropPolicy",
    "capacity_fraction",
    "capacity_keep_mask",
    "capacity_ratio",
    "ceil_scaled",
    "check_drop_policy",
    "expert_choice_capacity",
    "token_choice_keep",
]


DropPolicy = Literal["position", "probs"]
#: the drop policies of capacity mode, the default first
DROP_POLICIES: tuple[DropPolicy, ...] = ("position", "probs")


def check_drop_policy(value: object) -> DropPolicy:
    """``value`` if it is one of :data:`DROP_POLICIES`, else a ValueError naming the choices."""
    if not isinstance(value, str) or value not in DROP_POLICIES:
        raise ValueError(
            f"drop_policy: expected one of {', '.join(map(repr, DROP_POLICIES))}, got {value!r}"
        )
    return value  # narrowed to the literal by the membership test


def capacity_fraction(factor: float) -> Fraction:
    """The decimal a user wrote (``repr`` is the shortest string that reads back the float)."""
    return Fraction(repr(float(factor)))


def capacity_ratio(factor: float) -> tuple[int, int]:
    """``factor`` as an exact ratio ``(p, q)`` of its shortest decimal (computed where the
    factor is set: ``Fraction`` cannot run under ``torch.compile``)."""
    # a bounded denominator keeps p * tokens * K inside int64 (short decimals stay exact)
    fraction = capacity_fraction(factor).limit_denominator(10**9)
    return fraction.numerator, fraction.denominator


def ceil_scaled(factor: float, count: int) -> int:
    """``ceil(factor * count)``, exactly, reading ``factor`` as its shortest decimal."""
    return math.ceil(capacity_fraction(factor) * count)


def capacity_keep_mask(
    expert_ids_KN: Tensor,
    capacity: Tensor | int,
    num_experts: int,
    scores_KN: Tensor | None = None,
) -> Tensor:
    """Which slots fit in their expert's capacity, filling in priority order.

    Args:
        expert_ids_KN: ``[K, N]`` int64 expert per slot in priority order (row-major: all first
            choices by token position, then all second choices, as in GShard). Entries equal to
            ``num_experts`` mark slots that take no capacity (padding).
        capacity: per-expert capacity C.
        num_experts: E.
        scores_KN: ``[K, N]`` floating, optional: when given, each expert keeps its C
            highest-scoring slots (the ``"probs"`` drop policy), ties going to the earlier slot
            in priority order; a NaN score ranks last. None keeps the first C in priority order.

    Returns:
        ``[K, N]`` bool, True where the slot is among the first C of its expert.

    Sort-based (argsort by expert, rank within expert): O(S log S), no ``[S, E]`` one-hot.
    """
    ids_S = expert_ids_KN.reshape(-1)
    by_score_S: Tensor | None = None
    if scores_KN is not None:
        # rank by score first (stable: ties keep priority order), then by expert below; the
        # scores are routing decisions, not a gradient path
        by_score_S = torch.argsort(scores_KN.detach().reshape(-1), descending=True, stable=True)
        ids_S = ids_S[by_score_S]
    order_S = torch.argsort(ids_S, stable=True)
    # scatter_add, not bincount: a static output shape keeps torch.compile graphs whole
    counts = ids_S.new_zeros(num_experts + 1).scatter_add_(0, ids_S, torch.ones_like(ids_S))
    starts = torch.cumsum(counts, dim=0) - counts
    rank_sorted_S = torch.arange(ids_S.numel(), device=ids_S.device) - starts[ids_S[order_S]]
    rank_S = torch.empty_like(rank_sorted_S).scatter_(0, order_S, rank_sorted_S)
    keep_S = (rank_S < capacity) & (ids_S < num_experts)
    if by_score_S is not None:  # back from score order to priority order
        keep_S = torch.empty_like(keep_S).scatter_(0, by_score_S, keep_S)
    return keep_S.reshape(expert_ids_KN.shape)


def token_choice_keep(
    expert_ids_NK: Tensor,
    mask_N: Tensor | None,
    capacity_factor: float | None,
    num_experts: int,
    ratio: tuple[int, int] | None = None,
    *,
    drop_policy: DropPolicy = "position",
    scores_NK: Tensor | None = None,
) -> tuple[Tensor, Tensor | int | None]:
    """Which token-choice slots are kept: padding never, overflow past GShard capacity not.

    Args:
        expert_ids_NK: ``[N, K]`` int64 chosen experts (k-th column = k-th choice).
        mask_N: ``[N]`` bool, False for padding, or None.
        capacity_factor: None (dropless) or ``cf``: capacity ``ceil(cf * real_tokens * K / E)``.
        num_experts: E.
        ratio: ``capacity_ratio(cf)``, precomputed (routers keep it; needed under compile).
        drop_policy: ``"position"`` (GShard: earlier slots in priority order keep their place)
            or ``"probs"`` (each expert keeps its C highest ``scores_NK`` slots; ties to the
            earlier slot in priority order). No effect when dropless.
        scores_NK: ``[N, K]`` floating slot scores, required with ``drop_policy="probs"``
            (the router's combine weights, as Megatron-Core ranks them).

    Returns:
        ``kept_NK`` ``[N, K]`` bool, and the capacity (an int, a 0-dim int64 tensor when it
        depends on the mask, or None when dropless).
    """
    num_tokens, top_k = expert_ids_NK.shape
    check_drop_policy(drop_policy)
    if drop_policy == "probs" and scores_NK is None:
        raise ValueError("scores_NK: expected the [N, K] slot scores with drop_policy='probs'")
    kept_NK = torch.ones_like(expert_ids_NK, dtype=torch.bool)
    if mask_N is not None:
        kept_NK = kept_NK & mask_N.unsqueeze(-1)
    if capacity_factor is None:
        return kept_NK, None
    p, q = capacity_ratio(capacity_factor) if ratio is None else ratio
    # ceil(p * n * K / (q * E)) in integers: exact, and no host sync for a device count
    p, q = p * top_k, q * num_experts
    capacity: Tensor | int
    if mask_N is None:
        capacity = (num_tokens * p + q - 1) // q
    else:
        capacity = (mask_N.sum() * p + (q - 1)) // q
    # padding slots take no capacity: give them the sentinel expert E
    prio_ids_KN = torch.where(kept_NK, expert_ids_NK, num_experts).T
    prio_scores_KN = None if drop_policy == "position" or scores_NK is None else scores_NK.T
    return capacity_keep_mask(prio_ids_KN, capacity, num_experts, prio_scores_KN).T, capacity


def expert_choice_capacity(
    seq_len: int,
    num_experts: int,
    capacity_factor: float | None,
    capacity: int | float | None,
    ratio: tuple[int, int] | None = None,
) -> int:
    """Tokens each expert takes from a sequence of ``seq_len`` (never more than ``seq_len``).

    ``capacity_factor`` gives ``ceil(cf * T / E)`` (``ratio``: its precomputed
    :func:`capacity_ratio`); otherwise ``capacity`` is an int count or a float fraction of the
    sequence (``ceil(capacity * T)``).
    """
    if capacity_factor is not None:
        p, q = capacity_ratio(capacity_factor) if ratio is None else ratio
        count = (seq_len * p + q * num_experts - 1) // (q * num_experts)
    elif isinstance(capacity, int):
        count = capacity
    else:
        assert capacity is not None
        count = ceil_scaled(capacity, seq_len)
    return min(count, seq_len)
