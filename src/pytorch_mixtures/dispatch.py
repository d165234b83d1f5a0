"""Dispatch: route -> expert-sorted rows -> experts -> weighted sum per token.

:func:`run_experts` is the whole data path of a sparse layer after the router::

    plan = plan_dispatch(route, ...)         # sort slots by expert, backend resolved once
    y_SD = experts(permute(x_ND, plan), ...)  # experts run on contiguous slices
    y_ND = combine(y_SD, plan)                # the combine weights are applied here

No ``[tokens, experts, capacity]`` one-hot tensors: slots are argsorted by expert (stable, so
rows keep token order within an expert), experts run on contiguous slices, and outputs are
scattered back and summed per token. Everything is deterministic on CPU.

The combine weights live on the plan (``plan.weights``, computed once here) and are applied in
:func:`combine`. The one exception is an experts module that fuses the combine into its kernel
(``experts.fuses_combine``: SwiGLU experts on CPU's loop backend, ScatterMoE's idea): it then
reads token rows itself and applies ``plan.weights`` inside the kernel, so neither the gathered
``[S, D]`` input nor the per-slot output exists.

For a few tokens (decoding) a plan costs more than the experts' matmuls: there
:func:`run_chosen_experts` runs each chosen expert on its tokens with plain matmuls and adds the
weighted outputs, the same sum in another order (``MoELayer`` picks it in eval below
``decode_max_slots``; see :func:`pytorch_mixtures.backends.use_decode_path`).

Shape legend: N tokens, D model dim, E experts, K slots per token, S slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import ConcreteBackend
from .experts import ExpertsBase
from .routing import RouterOutput

__all__ = [
    "DispatchPlan",
    "combine",
    "max_rows_per_expert",
    "permute",
    "plan_dispatch",
    "run_chosen_experts",
    "run_experts",
    "sorted_weights",
]


@dataclass(frozen=True)
class DispatchPlan:
    """Where each slot goes in the expert-sorted layout, and how outputs come back.

    Attributes:
        order: ``[S]`` int64; ``order[i]`` is the slot at sorted row i. Kept slots come first,
            grouped by expert in increasing expert id; dropped slots follow.
        tokens_per_expert: ``[E]`` int64, kept rows per expert (row counts of the groups).
        token_rows: ``[S]`` int64, the token each sorted row reads (and adds its output into).
        weights: ``[S]`` combine weight of each sorted row (the router's dtype), zero for
            dropped slots.
        num_tokens: N.
        slots_per_token: K for token-major routings (top-k), else None.
        max_rows_per_expert: a static upper bound on every ``tokens_per_expert`` entry when the
            routing has a fixed capacity (top-k with an int capacity: ``min(C, N)``; expert
            choice: ``S // E``), else None. Lets experts use padded ``[E, C, D]`` batches.
        backend: the concrete grouped-matmul backend the experts run with (resolved once by
            :func:`run_experts`); None lets the experts resolve their own.
        fuse_combine: True when the experts read token rows and apply the combine themselves.
    """

    order: Tensor
    tokens_per_expert: Tensor
    token_rows: Tensor
    weights: Tensor
    num_tokens: int
    slots_per_token: int | None
    max_rows_per_expert: int | None = None
    backend: ConcreteBackend | None = None
    fuse_combine: bool = False


def plan_dispatch(
    route: RouterOutput, *, backend: ConcreteBackend | None = None, fuse_combine: bool = False
) -> DispatchPlan:
    """Sort the router's slots by expert; dropped and padding slots go last."""
    if not isinstance(route, RouterOutput):
        raise TypeError(f"route: expected a RouterOutput, got {type(route).__name__}")
    num_experts = route.num_experts
    sort_key_S = torch.where(route.kept, route.expert_ids, num_experts)
    order_S = torch.argsort(sort_key_S, stable=True)
    # scatter_add, not bincount: a static output shape keeps torch.compile graphs whole
    ones_S = torch.ones_like(sort_key_S)
    counts_E1 = sort_key_S.new_zeros(num_experts + 1).scatter_add_(0, sort_key_S, ones_S)
    return DispatchPlan(
        order=order_S,
        tokens_per_expert=counts_E1[:num_experts],
        token_rows=route.token_ids[order_S],
        weights=torch.where(route.kept, route.weights, 0.0)[order_S],
        num_tokens=route.num_tokens,
        slots_per_token=route.slots_per_token,
        max_rows_per_expert=max_rows_per_expert(route),
        backend=backend,
        fuse_combine=fuse_combine,
    )


def max_rows_per_expert(route: RouterOutput) -> int | None:
    """A static bound on any expert's row count, known when the capacity is a Python int."""
    if not isinstance(route.capacity, int):
        return None  # dropless, or a capacity only known on the device
    if route.slots_per_token is None:  # expert choice: exactly S / E slots per expert
        return int(route.token_ids.shape[0]) // route.num_experts
    # top-k picks distinct experts, so an expert holds at most one slot per token
    return min(route.capacity, route.num_tokens)


def sorted_weights(route: RouterOutput, plan: DispatchPlan, dtype: torch.dtype) -> Tensor:
    """0.2's name for ``plan.weights`` (the combine weight of each sorted row) in ``dtype``."""
    del route  # the plan carries the weights
    return plan.weights.to(dtype)


def permute(x_ND: Tensor, plan: DispatchPlan) -> Tensor:
    """Gather token rows into expert-sorted slot order: ``[N, D] -> [S, D]``.

    Rows past ``tokens_per_expert.sum()`` belong to dropped slots; experts treat them as padding.
    """
    # index_select, not x[idx]: the same gather, measurably faster on CPU
    return x_ND.index_select(0, plan.token_rows)


def combine(y_sorted_SD: Tensor, plan: DispatchPlan) -> Tensor:
    """Weight the expert outputs and sum each token's slots: ``[S, D] -> [N, D]``.

    Dropped slots contribute exactly zero: their weight is zero and their rows, which experts
    treat as padding, are zero by the experts' contract.

    On CPU the weighted sorted rows are added straight into their tokens with ``index_add_``
    (deterministic there, and several times faster than un-permuting ``[S, D]`` first: random
    row gathers over S rows miss the cache, adds into N rows do not). Elsewhere token-major
    routings (top-k) are un-permuted and summed over a ``[N, K, D]`` view, which is
    deterministic on every device; other routings use ``index_add_``.
    """
    num_tokens, dim = plan.num_tokens, y_sorted_SD.shape[-1]
    weights_S1 = plan.weights.to(y_sorted_SD.dtype).unsqueeze(-1)
    k = plan.slots_per_token
    if k is None or y_sorted_SD.device.type == "cpu":
        out_ND = y_sorted_SD.new_zeros(num_tokens, dim)
        return out_ND.index_add_(0, plan.token_rows, y_sorted_SD * weights_S1)
    y_SD = torch.empty_like(y_sorted_SD)
    y_SD[plan.order] = y_sorted_SD * weights_S1
    # a sum over a [N, K, D] view, not a [N,1,K] @ [N,K,D] bmm: bmm's backward loops per token
    return y_SD.view(num_tokens, k, dim).sum(dim=1)


def run_experts(
    experts: ExpertsBase, x_ND: Tensor, route: RouterOutput
) -> tuple[Tensor, DispatchPlan]:
    """Dispatch ``x_ND`` ``[N, D]`` by ``route``, run ``experts``, combine: ``[N, D]`` out.

    The experts' backend is resolved once here for this call shape and carried on the plan.
    Slots routed past ``experts.num_experts`` (no-op experts, which sort last) run nothing and
    add zero. Returns the output (in the experts' compute dtype) and the plan (for statistics).
    """
    max_rows = max_rows_per_expert(route)
    if type(experts).forward is not ExpertsBase.forward:
        # a subclass with its own forward (the 0.2 interface) gets sorted rows and the bound
        plan = plan_dispatch(route)
        counts_E = plan.tokens_per_expert[: experts.num_experts]
        y_SD = experts(permute(x_ND, plan), counts_E, max_rows_per_expert=max_rows)
        return combine(y_SD, plan), plan
    backend = experts.resolve_backend(x_ND, max_rows)
    fuse = experts.fuses_combine(x_ND, backend)
    plan = plan_dispatch(route, backend=backend, fuse_combine=fuse)
    counts_E = plan.tokens_per_expert[: experts.num_experts]
    # through __call__, so hooks (and parametrizations such as pruning) still apply
    if plan.fuse_combine:
        return experts(x_ND, counts_E, plan=plan), plan
    y_sorted_SD = experts(permute(x_ND, plan), counts_E, plan=plan)
    return combine(y_sorted_SD, plan), plan


def _run_chosen_static(
    experts: ExpertsBase, x_ND: Tensor, expert_ids_NK: Tensor, weights_NK: Tensor
) -> Tensor:
    """:func:`run_chosen_experts` for ``torch.compile`` (and CUDA graphs): the experts'
    ``chosen_forward`` on every slot, no-op experts' slots masked to weight 0."""
    real_NK = expert_ids_NK < experts.num_experts
    y_NKD = experts.chosen_forward(x_ND, torch.where(real_NK, expert_ids_NK, 0))
    weights_NK = torch.where(real_NK, weights_NK, 0.0).to(y_NKD.dtype)
    return (y_NKD * weights_NK[..., None]).sum(1)


def run_chosen_experts(
    experts: ExpertsBase, x_ND: Tensor, expert_ids_NK: Tensor, weights_NK: Tensor
) -> Tensor:
    """The decode path: ``y_n = sum_k weights[n, k] * expert_{ids[n, k]}(x_n)``, ``[N, D]``.

    No sort plan and no statistics: the chosen experts' ids are read on the host (free on CPU),
    each chosen expert runs once on its tokens (``experts.expert_forward``, plain matmuls on the
    stacked weights' views, never an indexed copy of them), and its weighted output is added
    into its tokens' rows. Ids past ``experts.num_experts`` (no-op experts) add nothing.
    """
    num_tokens, top_k = expert_ids_NK.shape
    real = experts.num_experts
    if torch.compiler.is_compiling():  # static shapes, the ids never read on the host
        return _run_chosen_static(experts, x_ND, expert_ids_NK, weights_NK)
    if num_tokens == 1:  # one token: no gathers, the k outputs summed directly
        chosen = expert_ids_NK[0].tolist()
        if not torch.is_grad_enabled():  # plain-float weights: one add per expert
            y_1D: Tensor | None = None
            for expert, weight in zip(chosen, weights_NK[0].tolist(), strict=True):
                if expert >= real:
                    continue
                out_1D = experts.expert_forward(expert, x_ND)
                if y_1D is None:  # w * out as out + (w - 1) * out: add_ with alpha is 3x
                    y_1D = out_1D.add_(out_1D, alpha=weight - 1.0)  # faster than mul_(float)
                else:
                    y_1D = y_1D.add_(out_1D, alpha=weight)
            return x_ND * 0 if y_1D is None else y_1D
        outs = [
            experts.expert_forward(expert, x_ND) * weights_NK[:, k : k + 1]
            for k, expert in enumerate(chosen)
            if expert < real
        ]
        return sum(outs[1:], outs[0]) if outs else x_ND * 0
    slots_by_expert: dict[int, list[int]] = {}
    for slot, expert in enumerate(expert_ids_NK.reshape(-1).tolist()):
        if expert < real:
            slots_by_expert.setdefault(expert, []).append(slot)
    if not slots_by_expert:
        return x_ND * 0
    order = [slot for expert in sorted(slots_by_expert) for slot in slots_by_expert[expert]]
    slots_S = torch.tensor(order, device=x_ND.device)
    tokens_S = slots_S // top_k
    x_sorted_SD = x_ND.index_select(0, tokens_S)
    outs, start = [], 0
    for expert in sorted(slots_by_expert):
        end = start + len(slots_by_expert[expert])
        outs.append(experts.expert_forward(expert, x_sorted_SD[start:end]))
        start = end
    y_sorted_SD = torch.cat(outs) * weights_NK.reshape(-1)[slots_S].unsqueeze(-1).to(outs[0].dtype)
    return y_sorted_SD.new_zeros(num_tokens, y_sorted_SD.shape[-1]).index_add_(
        0, tokens_S, y_sorted_SD
    )
