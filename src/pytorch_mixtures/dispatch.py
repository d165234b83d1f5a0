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

__all__ = ["DispatchPlan", "combine", "permute", "plan_dispatch"]


@dataclass(frozen=True)
class DispatchPlan:
    """Where each slot goes in the expert-sorted layout.

    Attributes:
        order: ``[S]`` int64; ``order[i]`` is the slot at sorted row i. Kept slots come first,
            grouped by expert in increasing expert id; dropped slots follow.
        tokens_per_expert: ``[E]`` int64, kept rows per expert (row counts of the groups).
        num_kept: 0-dim int64 tensor, ``tokens_per_expert.sum()``.
    """

    order: Tensor
    tokens_per_expert: Tensor
    num_kept: Tensor


def plan_dispatch(route: RouterOutput) -> DispatchPlan:
    """Sort the router's slots by expert; dropped and padding slots go last."""
    if not isinstance(route, RouterOutput):
        raise TypeError(f"route: expected a RouterOutput, got {type(route).__name__}")
    num_experts = route.num_experts
    sort_key_S = torch.where(route.kept, route.expert_ids, num_experts)
    order_S = torch.argsort(sort_key_S, stable=True)
    counts_E1 = torch.bincount(sort_key_S, minlength=num_experts + 1)
    tokens_per_expert_E = counts_E1[:num_experts]
    return DispatchPlan(order_S, tokens_per_expert_E, tokens_per_expert_E.sum())


def permute(x_ND: Tensor, route: RouterOutput, plan: DispatchPlan) -> Tensor:
    """Gather token rows into expert-sorted slot order: ``[N, D] -> [S, D]``.

    Rows past ``plan.num_kept`` belong to dropped slots; experts must ignore them.
    """
    return x_ND[route.token_ids[plan.order]]


def combine(y_sorted_SD: Tensor, route: RouterOutput, plan: DispatchPlan) -> Tensor:
    """Un-permute expert outputs and sum each token's weighted slots: ``[S, D] -> [N, D]``.

    Dropped slots contribute exactly zero (``torch.where``, so garbage in their rows, even
    NaN, cannot leak). Token-major routings (top-k) are summed over a ``[N, K, D]`` view,
    which is deterministic on every device; others use ``index_add_`` (deterministic on CPU).
    """
    num_tokens, dim = route.num_tokens, y_sorted_SD.shape[-1]
    y_SD = torch.empty_like(y_sorted_SD)
    y_SD[plan.order] = y_sorted_SD
    weights_S1 = route.weights.to(y_SD.dtype).unsqueeze(-1)
    y_SD = torch.where(route.kept.unsqueeze(-1), y_SD * weights_S1, 0.0)
    k = route.slots_per_token
    if k is not None:
        return y_SD.view(num_tokens, k, dim).sum(dim=1)
    out_ND = y_SD.new_zeros(num_tokens, dim)
    return out_ND.index_add_(0, route.token_ids, y_SD)
