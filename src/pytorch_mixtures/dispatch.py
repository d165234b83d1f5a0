"""Sort-based dispatch: permute slots so each expert's rows are contiguous, then un-permute.

No ``[tokens, experts, capacity]`` one-hot tensors: slots are argsorted by expert (stable, so
rows keep token order within an expert), experts run on contiguous slices, and outputs are
scattered back and summed per token. Everything is deterministic on CPU.

Shape legend: N tokens, D model dim, E experts, K slots per token, S slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .routing import RouterOutput

__all__ = ["DispatchPlan", "combine", "permute", "plan_dispatch", "sorted_weights"]


@dataclass(frozen=True)
class DispatchPlan:
    """Where each slot goes in the expert-sorted layout.

    Attributes:
        order: ``[S]`` int64; ``order[i]`` is the slot at sorted row i. Kept slots come first,
            grouped by expert in increasing expert id; dropped slots follow.
        tokens_per_expert: ``[E]`` int64, kept rows per expert (row counts of the groups).
        num_kept: 0-dim int64 tensor, ``tokens_per_expert.sum()``.
        max_rows_per_expert: a static upper bound on every ``tokens_per_expert`` entry when the
            routing has a fixed capacity (top-k with an int capacity: ``min(C, N)``; expert
            choice: ``S // E``), else None. Lets experts use padded ``[E, C, D]`` batches.
    """

    order: Tensor
    tokens_per_expert: Tensor
    num_kept: Tensor
    max_rows_per_expert: int | None = None


def plan_dispatch(route: RouterOutput) -> DispatchPlan:
    """Sort the router's slots by expert; dropped and padding slots go last."""
    if not isinstance(route, RouterOutput):
        raise TypeError(f"route: expected a RouterOutput, got {type(route).__name__}")
    num_experts = route.num_experts
    sort_key_S = torch.where(route.kept, route.expert_ids, num_experts)
    order_S = torch.argsort(sort_key_S, stable=True)
    # scatter_add, not bincount: a static output shape keeps torch.compile graphs whole
    ones_S = torch.ones_like(sort_key_S)
    counts_E1 = sort_key_S.new_zeros(num_experts + 1).scatter_add_(0, sort_key_S, ones_S)
    tokens_per_expert_E = counts_E1[:num_experts]
    return DispatchPlan(
        order_S, tokens_per_expert_E, tokens_per_expert_E.sum(), _max_rows_per_expert(route)
    )


def _max_rows_per_expert(route: RouterOutput) -> int | None:
    if not isinstance(route.capacity, int):
        return None  # dropless, or a capacity only known on the device
    if route.slots_per_token is None:  # expert choice: exactly S / E slots per expert
        return int(route.token_ids.shape[0]) // route.num_experts
    # top-k picks distinct experts, so an expert holds at most one slot per token
    return min(route.capacity, route.num_tokens)


def permute(x_ND: Tensor, route: RouterOutput, plan: DispatchPlan) -> Tensor:
    """Gather token rows into expert-sorted slot order: ``[N, D] -> [S, D]``.

    Rows past ``plan.num_kept`` belong to dropped slots; experts must ignore them.
    """
    # index_select, not x[idx]: the same gather, measurably faster on CPU
    return x_ND.index_select(0, route.token_ids[plan.order])


def sorted_weights(route: RouterOutput, plan: DispatchPlan, dtype: torch.dtype) -> Tensor:
    """Combine weight of each expert-sorted row, ``[S]`` in ``dtype``; zero for dropped slots."""
    return torch.where(route.kept, route.weights.to(dtype), 0.0)[plan.order]


def combine(
    y_sorted_SD: Tensor, route: RouterOutput, plan: DispatchPlan, *, weighted: bool = False
) -> Tensor:
    """Un-permute expert outputs and sum each token's weighted slots: ``[S, D] -> [N, D]``.

    ``weighted=True``: the rows already carry their combine weights (experts that apply
    :func:`sorted_weights` themselves, where their tensors are narrowest), so they are only
    summed. Dropped slots contribute exactly zero: their weight is zero and their rows, which
    experts treat as padding, are zero by the experts' contract.

    On CPU the sorted rows are added straight into their tokens with ``index_add_``
    (deterministic there, and several times faster than un-permuting ``[S, D]`` first: random
    row gathers over S rows miss the cache, adds into N rows do not). Elsewhere token-major
    routings (top-k) are un-permuted and summed over a ``[N, K, D]`` view, which is
    deterministic on every device; other routings use ``index_add_``.
    """
    num_tokens, dim = route.num_tokens, y_sorted_SD.shape[-1]
    k = route.slots_per_token
    if k is None or y_sorted_SD.device.type == "cpu":
        if not weighted:
            weights_S = sorted_weights(route, plan, y_sorted_SD.dtype)
            y_sorted_SD = y_sorted_SD * weights_S.unsqueeze(-1)
        out_ND = y_sorted_SD.new_zeros(num_tokens, dim)
        return out_ND.index_add_(0, route.token_ids[plan.order], y_sorted_SD)
    y_SD = torch.empty_like(y_sorted_SD)
    y_SD[plan.order] = y_sorted_SD
    y_NKD = y_SD.view(num_tokens, k, dim)
    if weighted:
        return y_NKD.sum(dim=1)
    weights_S = torch.where(route.kept, route.weights.to(y_SD.dtype), 0.0)
    # multiply-and-sum, not a [N,1,K] @ [N,K,D] bmm: bmm's backward loops per token on CPU
    return (y_NKD * weights_S.view(num_tokens, k, 1)).sum(dim=1)
