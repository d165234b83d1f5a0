"""Naive references for the routing frontier: drop policies, zero-computation experts (MoE++)
and REAP expert scores. Python loops over tokens, written from the papers' definitions, and
deliberately slow: they exist only to be obviously correct.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from reference.moe import ExpertFn, token_choices


def dropped_slots(
    choices: list[list[tuple[int, Tensor]]],
    num_experts: int,
    capacity_factor: float,
    drop_policy: str,
    real: Sequence[bool],
) -> set[tuple[int, int]]:
    """The (token, k) slots an overfull expert drops, by GShard position or by score."""
    num_tokens, top_k = len(choices), len(choices[0])
    capacity = math.ceil(capacity_factor * sum(real) * top_k / num_experts)
    dropped: set[tuple[int, int]] = set()
    for e in range(num_experts):
        # priority order: all first choices by token position, then all second choices, ...
        slots = [
            (k, n)
            for k in range(top_k)
            for n in range(num_tokens)
            if real[n] and choices[n][k][0] == e
        ]
        if drop_policy == "probs":  # highest weight first; ties keep priority order
            slots = sorted(slots, key=lambda kn: -float(choices[kn[1]][kn[0]][1].detach()))
        for k, n in slots[capacity:]:
            dropped.add((n, k))
    return dropped


def naive_frontier_moe(
    x_ND: Tensor,
    gate_weight_ED: Tensor,
    fns: Sequence[ExpertFn],
    top_k: int,
    *,
    score_func: str = "softmax",
    normalize: bool = True,
    capacity_factor: float | None = None,
    drop_policy: str = "position",
    token_mask: Sequence[bool] | None = None,
    zero: int = 0,
    copy: int = 0,
    constant_gates: Sequence[Tensor] = (),
    constants: Sequence[Tensor] = (),
) -> tuple[Tensor, set[tuple[int, int]], dict[str, int]]:
    """Top-k MoE over real experts then ``zero`` zero, ``copy`` copy and constant experts
    (MoE++: ``E(x) = a1 x + a2 v`` with ``[a1, a2] = softmax(W_c x)``), one token at a time.

    Returns (output [N, D], dropped (n, k) set, kept slots per zero-computation kind).
    """
    num_tokens, num_routes = x_ND.shape[0], gate_weight_ED.shape[0]
    real = [True] * num_tokens if token_mask is None else [bool(m) for m in token_mask]
    choices = token_choices(x_ND, gate_weight_ED, top_k, score_func, normalize)
    dropped = (
        set()
        if capacity_factor is None
        else dropped_slots(choices, num_routes, capacity_factor, drop_policy, real)
    )
    num_real = len(fns)

    def expert(e: int, v: Tensor) -> Tensor:
        if e < num_real:
            return fns[e](v)
        e -= num_real
        if e < zero:
            return torch.zeros_like(v)
        e -= zero
        if e < copy:
            return v
        e -= copy
        a = (constant_gates[e] @ v).softmax(-1)
        return a[0] * v + a[1] * constants[e]

    kinds = {"zero": 0, "copy": 0, "constant": 0}
    rows = []
    for n in range(num_tokens):
        out = torch.zeros_like(x_ND[n])
        if real[n]:
            for k, (e, w) in enumerate(choices[n]):
                if (n, k) in dropped:
                    continue
                out = out + w * expert(e, x_ND[n])
                if e >= num_real:
                    j = e - num_real
                    kind = "zero" if j < zero else "copy" if j < zero + copy else "constant"
                    kinds[kind] += 1
        rows.append(out)
    return torch.stack(rows), dropped, kinds


def naive_reap_scores(
    batches: Sequence[Tensor],
    gate_weight_ED: Tensor,
    fns: Sequence[ExpertFn],
    top_k: int,
    *,
    score_func: str = "softmax",
    normalize: bool = True,
) -> tuple[list[float], list[int]]:
    """REAP (Lasby et al. 2025): ``S_j = mean over tokens routed to j of g_j(x) ||f_j(x)||``
    over every token of every batch; 0 for an expert never selected. Also the slot counts."""
    num_real = len(fns)
    sums, counts = [0.0] * num_real, [0] * num_real
    for batch in batches:
        x_ND = batch.reshape(-1, batch.shape[-1])
        choices = token_choices(x_ND, gate_weight_ED, top_k, score_func, normalize)
        for n, choice in enumerate(choices):
            for e, w in choice:
                if e >= num_real:
                    continue
                sums[e] += float(w) * float(fns[e](x_ND[n]).norm())
                counts[e] += 1
    return [s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)], counts


def naive_relu_moe(
    x_ND: Tensor,
    gate_weight_ED: Tensor,
    fns: Sequence[ExpertFn],
    token_mask: Sequence[bool] | None = None,
) -> tuple[Tensor, list[list[int]]]:
    """ReMoE (Wang et al. 2025): each token's weights are relu(logits); its output is the sum of
    the weighted outputs of the experts with a nonzero weight. Returns (output [N, D], each
    token's active experts)."""
    rows, active = [], []
    for n in range(x_ND.shape[0]):
        out = torch.zeros_like(x_ND[n])
        used: list[int] = []
        if token_mask is None or token_mask[n]:
            weights = torch.relu(gate_weight_ED @ x_ND[n])
            for e in range(gate_weight_ED.shape[0]):
                if float(weights[e].detach()) > 0:
                    used.append(e)
                    out = out + weights[e] * fns[e](x_ND[n])
        rows.append(out)
        active.append(used)
    return torch.stack(rows), active


def naive_relu_l1(
    x_ND: Tensor, gate_weight_ED: Tensor, target_k: int, load_balance: bool
) -> Tensor:
    """ReMoE's L1 term: (1/T) sum_t sum_e f_e R_te, f_e = E/(kT) sum_t 1[R_te > 0] (f_e = 1
    without load balancing)."""
    num_tokens, num_experts = x_ND.shape[0], gate_weight_ED.shape[0]
    weights = [torch.relu(gate_weight_ED @ x_ND[n]) for n in range(num_tokens)]
    total = torch.zeros((), dtype=x_ND.dtype)
    for e in range(num_experts):
        count = sum(1 for n in range(num_tokens) if float(weights[n][e].detach()) > 0)
        f_e = num_experts * count / (target_k * num_tokens) if load_balance else 1.0
        for n in range(num_tokens):
            total = total + f_e * weights[n][e]
    return total / num_tokens


def naive_replayed_topk_moe(
    x_ND: Tensor,
    gate_weight_ED: Tensor,
    fns: Sequence[ExpertFn],
    expert_ids_NK: Tensor,
    score_func: str,
    normalize: bool,
    scaling: float = 1.0,
) -> Tensor:
    """Top-k MoE with the experts forced to recorded ids (routing replay, dropless): each token's
    weights are its current scores at those ids, renormalised when asked, times ``scaling``."""
    rows = []
    for n in range(x_ND.shape[0]):
        logits = gate_weight_ED @ x_ND[n]
        scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
        experts = [int(e) for e in expert_ids_NK[n]]
        weights = [scores[e] for e in experts]
        if normalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        out = torch.zeros_like(x_ND[n])
        for e, w in zip(experts, weights, strict=True):
            out = out + scaling * w * fns[e](x_ND[n])
        rows.append(out)
    return torch.stack(rows)
