"""Deliberately naive reference implementations: Python loops over tokens, no cleverness.

They exist only to be obviously correct; the library is tested against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import pytorch_mixtures as pm

ExpertFn = Callable[[Tensor], Tensor]


def expert_fns(experts: torch.nn.Module) -> list[ExpertFn]:
    """One function per expert, written from the parameters, mapping a [D] row to a [D] row."""
    fns: list[ExpertFn] = []
    if isinstance(experts, pm.MLPExperts):
        act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[experts.activation]
        for e in range(experts.num_experts):

            def mlp(v: Tensor, e: int = e) -> Tensor:
                h = v @ experts.w_in[e]
                if experts.b_in is not None:
                    h = h + experts.b_in[e]
                y = act(h) @ experts.w_out[e]
                if experts.b_out is not None:
                    y = y + experts.b_out[e]
                return y

            fns.append(mlp)
    elif isinstance(experts, pm.SwiGLUExperts):
        hidden = experts.hidden_dim
        for e in range(experts.num_experts):

            def swiglu(v: Tensor, e: int = e) -> Tensor:
                gate = v @ experts.w_gate_up[e][:, :hidden]
                up = v @ experts.w_gate_up[e][:, hidden:]
                return (F.silu(gate) * up) @ experts.w_down[e]

            fns.append(swiglu)
    else:  # a list of modules (or ModuleListExperts holding one)
        modules = experts.experts if isinstance(experts, pm.ModuleListExperts) else experts
        for module in modules:
            fns.append(lambda v, m=module: m(v.unsqueeze(0)).squeeze(0))
    return fns


def ranked(scores: Tensor, k: int) -> list[int]:
    """The k best indices by score, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda e: (-float(scores[e].detach()), e))[:k]


def token_choices(
    x_ND: Tensor, gate_weight_ED: Tensor, top_k: int, score_func: str, normalize: bool
) -> list[list[tuple[int, Tensor]]]:
    """Each token's (expert, weight) choices, in rank order."""
    choices = []
    for n in range(x_ND.shape[0]):
        logits = gate_weight_ED @ x_ND[n]
        scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
        experts = ranked(scores, top_k)
        weights = [scores[e] for e in experts]
        if normalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        choices.append(list(zip(experts, weights, strict=True)))
    return choices


def naive_topk_moe(
    x_ND: Tensor,
    gate_weight_ED: Tensor,
    fns: Sequence[ExpertFn],
    top_k: int,
    *,
    score_func: str = "softmax",
    normalize: bool = True,
    capacity_factor: float | None = None,
    token_mask: Sequence[bool] | None = None,
) -> tuple[Tensor, set[tuple[int, int]]]:
    """Token-choice top-k MoE, one token at a time. Returns (output [N, D], dropped (n, k) set).

    Capacity fills GShard-style: all first choices in token order, then second choices, ...
    """
    num_tokens, num_experts = x_ND.shape[0], gate_weight_ED.shape[0]
    real = [True] * num_tokens if token_mask is None else [bool(m) for m in token_mask]
    choices = token_choices(x_ND, gate_weight_ED, top_k, score_func, normalize)

    dropped: set[tuple[int, int]] = set()
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * sum(real) * top_k / num_experts)
        used = [0] * num_experts
        for k in range(top_k):
            for n in range(num_tokens):
                if not real[n]:
                    continue
                e = choices[n][k][0]
                if used[e] < capacity:
                    used[e] += 1
                else:
                    dropped.add((n, k))

    rows = []
    for n in range(num_tokens):
        out = torch.zeros_like(x_ND[n])
        if real[n]:
            for k, (e, w) in enumerate(choices[n]):
                if (n, k) not in dropped:
                    out = out + w * fns[e](x_ND[n])
        rows.append(out)
    return torch.stack(rows), dropped


def naive_expert_choice_moe(
    x_BTD: Tensor, gate_weight_ED: Tensor, fns: Sequence[ExpertFn], capacity_factor: float
) -> tuple[Tensor, int]:
    """Expert-choice MoE per sequence. Returns (output [B, T, D], tokens picked by no expert)."""
    batch, seq_len, _ = x_BTD.shape
    num_experts = gate_weight_ED.shape[0]
    capacity = min(math.ceil(capacity_factor * seq_len / num_experts), seq_len)
    out = [[torch.zeros_like(x_BTD[b, t]) for t in range(seq_len)] for b in range(batch)]
    picked = [[False] * seq_len for _ in range(batch)]
    for b in range(batch):
        probs = [(gate_weight_ED @ x_BTD[b, t]).softmax(-1) for t in range(seq_len)]
        for e in range(num_experts):
            column = torch.stack([probs[t][e] for t in range(seq_len)])
            for t in ranked(column, capacity):
                out[b][t] = out[b][t] + probs[t][e] * fns[e](x_BTD[b, t])
                picked[b][t] = True
    unrouted = sum(not p for row in picked for p in row)
    return torch.stack([torch.stack(row) for row in out]), unrouted
