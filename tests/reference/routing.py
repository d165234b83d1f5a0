"""Naive references for the routing schemes: Python loops over tokens and experts.

They follow the papers' definitions literally (kth_excluding, per-slot softmaxes, ...) and
exist only to be obviously correct.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.moe import ExpertFn, ranked


def naive_scheme_topk(
    x_ND: Tensor,
    gate_weight_ED: Tensor,
    fns: Sequence[ExpertFn],
    top_k: int,
    *,
    score_func: str = "softmax",
    normalize: bool = True,
    bias_E: Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int | None = None,
    group_score: str = "max",
    scaling: float = 1.0,
    noise_NE: Tensor | None = None,
    noise_weight_ED: Tensor | None = None,
    min_std: float = 1e-2,
    token_mask: Sequence[bool] | None = None,
) -> tuple[Tensor, list[list[int]]]:
    """Top-k with noise, bias, group limits and scaling, one token at a time (dropless).

    Returns (output [N, D], chosen experts per token).
    """
    num_tokens, num_experts = x_ND.shape[0], gate_weight_ED.shape[0]
    group_size = num_experts // num_groups
    topk_groups = num_groups if topk_groups is None else topk_groups
    rows, chosen = [], []
    for n in range(num_tokens):
        logits = gate_weight_ED @ x_ND[n]
        if noise_NE is not None and noise_weight_ED is not None:
            std = F.softplus(noise_weight_ED @ x_ND[n]) + min_std
            logits = logits + noise_NE[n] * std
        scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
        bias = [0.0] * num_experts if bias_E is None else bias_E.tolist()
        select = [float(scores[e].detach()) + bias[e] for e in range(num_experts)]
        group_values = []
        for g in range(num_groups):
            members = sorted(select[g * group_size : (g + 1) * group_size], reverse=True)
            group_values.append(sum(members[:2]) if group_score == "top2_sum" else members[0])
        groups = ranked(torch.tensor(group_values), topk_groups)
        allowed = [e for e in range(num_experts) if e // group_size in groups]
        experts = sorted(allowed, key=lambda e: (-select[e], e))[:top_k]
        weights = [scores[e] for e in experts]
        if normalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        out = torch.zeros_like(x_ND[n])
        if token_mask is None or token_mask[n]:
            for e, w in zip(experts, weights, strict=True):
                out = out + scaling * w * fns[e](x_ND[n])
        rows.append(out)
        chosen.append(experts)
    return torch.stack(rows), chosen


def std_normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def naive_noisy_losses(
    x_ND: Tensor,
    gate_weight_ED: Tensor,
    noise_weight_ED: Tensor,
    noise_NE: Tensor,
    top_k: int,
    min_std: float = 1e-2,
    token_mask: Sequence[bool] | None = None,
) -> tuple[Tensor, Tensor]:
    """Shazeer et al. 2017 importance and load losses (CV^2, population variance), by the book.

    ``G(x) = Softmax(KeepTopK(H(x), k))`` and
    ``P(x, i) = Phi((clean_i - kth_excluding(H(x), k, i)) / std_i)``.
    """
    num_tokens, num_experts = x_ND.shape[0], gate_weight_ED.shape[0]
    importance = [x_ND.new_zeros(()) for _ in range(num_experts)]
    load = [x_ND.new_zeros(()) for _ in range(num_experts)]
    for n in range(num_tokens):
        if token_mask is not None and not token_mask[n]:
            continue
        clean = gate_weight_ED @ x_ND[n]
        std = F.softplus(noise_weight_ED @ x_ND[n]) + min_std
        noisy = clean + noise_NE[n] * std
        top = ranked(noisy, top_k)
        kept = torch.stack([noisy[e] for e in top]).softmax(-1)
        for j, e in enumerate(top):
            importance[e] = importance[e] + kept[j]
        for i in range(num_experts):
            others = sorted((float(noisy[j].detach()), j) for j in range(num_experts) if j != i)[
                ::-1
            ]
            kth = noisy[others[top_k - 1][1]]
            load[i] = load[i] + std_normal_cdf((clean[i] - kth) / std[i])

    def cv2(values: list[Tensor]) -> Tensor:
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        return var / (mean**2 + 1e-10)

    return cv2(importance), cv2(load)


def naive_sequence_balance(
    probs_BTE: Tensor, chosen_BTK: Sequence[Sequence[Sequence[int]]], mask_BT: Tensor | None
) -> Tensor:
    """Per-sequence ``E * sum_e f_e P_e`` over real tokens, averaged over non-empty sequences."""
    batch, seq_len, num_experts = probs_BTE.shape
    losses = []
    for b in range(batch):
        real = [t for t in range(seq_len) if mask_BT is None or bool(mask_BT[b, t])]
        if not real:
            continue
        loss = probs_BTE.new_zeros(())
        for e in range(num_experts):
            f = sum(list(chosen_BTK[b][t]).count(e) for t in real) / len(real)
            p = sum(probs_BTE[b, t, e] for t in real) / len(real)
            loss = loss + num_experts * f * p
        losses.append(loss)
    return sum(losses) / len(losses)


def naive_expert_choice(
    x_BTD: Tensor, gate_weight_ED: Tensor, fns: Sequence[ExpertFn], capacity: int
) -> Tensor:
    """Expert choice with a given per-expert capacity per sequence."""
    batch, seq_len, _ = x_BTD.shape
    out = [[torch.zeros_like(x_BTD[b, t]) for t in range(seq_len)] for b in range(batch)]
    for b in range(batch):
        probs = [(gate_weight_ED @ x_BTD[b, t]).softmax(-1) for t in range(seq_len)]
        for e in range(len(fns)):
            column = torch.stack([probs[t][e] for t in range(seq_len)])
            for t in ranked(column, capacity):
                out[b][t] = out[b][t] + probs[t][e] * fns[e](x_BTD[b, t])
    return torch.stack([torch.stack(row) for row in out])


def naive_soft_moe(
    x_BTD: Tensor,
    phi_DP: Tensor,
    fns: Sequence[ExpertFn],
    slots_per_expert: int,
    scale: Tensor | None,
) -> Tensor:
    """Soft MoE (Puigcerver et al. 2023, eq. 1-2): per-slot and per-token loops."""
    batch, seq_len, _ = x_BTD.shape
    num_slots = phi_DP.shape[1]
    outputs = []
    for b in range(batch):
        tokens = [x_BTD[b, t] for t in range(seq_len)]
        if scale is not None:
            keys = [scale * v / v.norm() for v in tokens]
            columns = [phi_DP[:, p] / phi_DP[:, p].norm() for p in range(num_slots)]
        else:
            keys = tokens
            columns = [phi_DP[:, p] for p in range(num_slots)]
        logits = [[keys[t] @ columns[p] for p in range(num_slots)] for t in range(seq_len)]
        slot_out = []
        for p in range(num_slots):
            weights = torch.stack([logits[t][p] for t in range(seq_len)]).softmax(-1)
            slot_in = sum(weights[t] * tokens[t] for t in range(seq_len))
            slot_out.append(fns[p // slots_per_expert](slot_in))
        rows = []
        for t in range(seq_len):
            weights = torch.stack(logits[t]).softmax(-1)
            rows.append(sum(weights[p] * slot_out[p] for p in range(num_slots)))
        outputs.append(torch.stack(rows))
    return torch.stack(outputs)
