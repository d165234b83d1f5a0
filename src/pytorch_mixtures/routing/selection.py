"""Selection rules: which experts a token may pick, before the top-k.

* :func:`group_limited_scores`: DeepSeek-V3 group-limited (node-limited) routing: tokens may
  only pick experts from their ``topk_groups`` best expert groups (DeepSeek-V2 uses the
  groups' best score, DeepSeek-V3 the sum of their two best).
* :func:`softplus_noise_std`: the learned noise scale of noisy top-k gating (Shazeer et al.
  2017, "Outrageously Large Neural Networks", eq. 4).

Shape legend: N tokens, E experts, G groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["group_limited_scores", "softplus_noise_std"]


def group_limited_scores(
    scores_NE: Tensor, num_groups: int, topk_groups: int, group_score: str
) -> Tensor:
    """Mask the experts outside each token's ``topk_groups`` best groups (DeepSeek-V3).

    The E experts are split into ``num_groups`` contiguous groups of ``E / num_groups``.
    A group's score is ``"top2_sum"``: the sum of its two best expert scores (DeepSeek-V3, with
    sigmoid scores; the best one when a group has one expert), or ``"max"``: its best score
    (DeepSeek-V2's group-limited greedy, with softmax scores). Ties go to the lower group.

    Args:
        scores_NE: ``[N, E]`` selection scores.
        num_groups: G, dividing E.
        topk_groups: groups kept per token, in ``[1, G]``.
        group_score: ``"top2_sum"`` or ``"max"``.

    Returns:
        ``[N, E]`` the scores with experts of the other groups set to ``-inf``.
    """
    num_tokens, num_experts = scores_NE.shape
    group_size = num_experts // num_groups
    grouped_NGS = scores_NE.reshape(num_tokens, num_groups, group_size)
    if group_score == "top2_sum":
        group_scores_NG = grouped_NGS.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
    else:
        group_scores_NG = grouped_NGS.max(dim=-1).values
    best_groups_NG = group_scores_NG.topk(topk_groups, dim=-1).indices
    keep_NG = torch.zeros_like(group_scores_NG, dtype=torch.bool)
    keep_NG.scatter_(1, best_groups_NG, True)
    keep_NE = keep_NG.unsqueeze(-1).expand(num_tokens, num_groups, group_size)
    return scores_NE.masked_fill(~keep_NE.reshape(num_tokens, num_experts), -math.inf)


def softplus_noise_std(noise_logits_NE: Tensor, min_std: float) -> Tensor:
    """``softplus(x @ W_noise) + min_std``: the learned noise scale of noisy top-k gating."""
    return F.softplus(noise_logits_NE) + min_std
