"""Balancing losses and selection rules beyond the Switch/GShard loss.

* :func:`cv_squared`, :func:`importance_loss`, :func:`noisy_top_k_load`: the noisy top-k
  gating losses of Shazeer et al. 2017 ("Outrageously Large Neural Networks", section 4 and
  appendix A).
* :func:`sequence_balance_loss`: the per-sequence balance loss of DeepSeek-V3 (Liu et al. 2024,
  eq. 17-20), padding-aware.
* :func:`group_limited_scores`: DeepSeek-V3 group-limited (node-limited) routing: tokens may
  only pick experts from their ``topk_groups`` best expert groups.

Shape legend: B batch, T sequence, N = B*T tokens, E experts, K slots per token, G groups.
Every loss is computed in float32 (float64 for float64 input) and excludes padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "cv_squared",
    "group_limited_scores",
    "importance_loss",
    "noisy_top_k_load",
    "sequence_balance_loss",
    "softplus_noise_std",
]


def cv_squared(values_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``var(v) / (mean(v)^2 + eps)`` of ``values_E`` ``[E]``.

    Population variance (divide by E), as the authors' tensor2tensor code computes it. Zero for
    a single expert.
    """
    if values_E.numel() <= 1:
        return values_E.new_zeros(())
    mean = values_E.mean()
    return (values_E - mean).square().mean() / (mean.square() + eps)


def _masked_sum(values_NE: Tensor, token_mask_N: Tensor | None) -> Tensor:
    if token_mask_N is None:
        return values_NE.sum(dim=0)
    return torch.where(token_mask_N.unsqueeze(-1), values_NE, 0.0).sum(dim=0)


def importance_loss(gates_NE: Tensor, token_mask_N: Tensor | None = None) -> Tensor:
    """Shazeer et al. 2017, eq. 6: ``CV(Importance)^2`` with ``Importance_e = sum_x G(x)_e``.

    Args:
        gates_NE: ``[N, E]`` the sparse gate values (zero outside each token's top-k).
        token_mask_N: optional ``[N]`` bool, False for padding (excluded from the sums).

    Returns:
        0-dim tensor; zero when every expert has the same importance.
    """
    return cv_squared(_masked_sum(gates_NE, token_mask_N))


def noisy_top_k_load(
    clean_logits_NE: Tensor,
    noisy_logits_NE: Tensor,
    noise_std_NE: Tensor,
    top_k: int,
    token_mask_N: Tensor | None = None,
) -> Tensor:
    """The smooth load estimator of Shazeer et al. 2017, appendix A, eq. 8-10.

    ``P(x, e) = Phi((clean_e - kth_excluding(noisy, k, e)) / std_e)``, the probability that
    expert e stays in the top k when only its own noise is re-drawn; ``Load_e = sum_x P(x, e)``.
    ``kth_excluding(noisy, k, e)`` is the k-th largest noisy logit other than e's own: the
    (k+1)-th largest overall when e is in the top k, the k-th largest otherwise.

    Args:
        clean_logits_NE: ``[N, E]`` logits before noise.
        noisy_logits_NE: ``[N, E]`` logits after noise (the ones the top-k was taken on).
        noise_std_NE: ``[N, E]`` noise standard deviations, > 0.
        top_k: k, in ``[1, E]``.
        token_mask_N: optional ``[N]`` bool, False for padding.

    Returns:
        ``[E]`` the estimated load (differentiable in the clean logits and the noise std).
        With ``top_k == E`` every expert is always selected and the load is the token count.
    """
    num_experts = clean_logits_NE.shape[-1]
    if top_k >= num_experts:
        return _masked_sum(torch.ones_like(clean_logits_NE), token_mask_N)
    top_NK1 = noisy_logits_NE.topk(top_k + 1, dim=-1).values
    threshold_in_N1 = top_NK1[:, top_k : top_k + 1]  # (k+1)-th largest
    threshold_out_N1 = top_NK1[:, top_k - 1 : top_k]  # k-th largest
    is_in_NE = noisy_logits_NE >= threshold_out_N1
    prob_in_NE = torch.special.ndtr((clean_logits_NE - threshold_in_N1) / noise_std_NE)
    prob_out_NE = torch.special.ndtr((clean_logits_NE - threshold_out_N1) / noise_std_NE)
    return _masked_sum(torch.where(is_in_NE, prob_in_NE, prob_out_NE), token_mask_N)


def sequence_balance_loss(
    probs_BTE: Tensor, expert_ids_BTK: Tensor, token_mask_BT: Tensor | None = None
) -> Tensor:
    """Per-sequence balance loss (DeepSeek-V3, eq. 17-20), averaged over sequences.

    For each sequence b: ``E * sum_e f_be * P_be`` where ``f_be`` is the share of the sequence's
    real tokens' slots sent to e (summing to K over e) and ``P_be`` the mean score of e over the
    sequence's real tokens; then the mean over sequences that have at least one real token.
    This is the library's batch-level form (:func:`~pytorch_mixtures.losses.load_balancing_loss`)
    applied per sequence, so it also equals ``top_k`` at perfect balance. DeepSeek-V3's own
    normalisation (``f`` scaled by ``E / (K T)``) gives this value divided by ``top_k``: their
    coefficient ``alpha`` corresponds to ``balance_loss_coef = alpha / top_k``.

    Args:
        probs_BTE: ``[B, T, E]`` per-token distributions over experts (softmax scores, or
            sigmoid scores normalised to sum to 1, DeepSeek-V3's ``s'``).
        expert_ids_BTK: ``[B, T, K]`` int64, the experts each token chose.
        token_mask_BT: optional ``[B, T]`` bool, False for padding.

    Returns:
        0-dim tensor in the dtype of ``probs_BTE`` (zero when no sequence has a real token).
    """
    batch, seq_len, num_experts = probs_BTE.shape
    dtype = probs_BTE.dtype
    if token_mask_BT is None:
        token_mask_BT = torch.ones(batch, seq_len, dtype=torch.bool, device=probs_BTE.device)
    real_BT = token_mask_BT.to(dtype)
    real_B = real_BT.sum(dim=1)
    counts_BE = torch.zeros(batch, num_experts, dtype=dtype, device=probs_BTE.device)
    slot_weight_BTK = real_BT.unsqueeze(-1).expand(expert_ids_BTK.shape)
    counts_BE.scatter_add_(1, expert_ids_BTK.reshape(batch, -1), slot_weight_BTK.reshape(batch, -1))
    denom_B1 = real_B.clamp_min(1.0).unsqueeze(-1)
    f_BE = counts_BE / denom_B1
    p_BE = (probs_BTE * real_BT.unsqueeze(-1)).sum(dim=1) / denom_B1
    loss_B = num_experts * (f_BE * p_BE).sum(dim=-1)
    has_tokens_B = (real_B > 0).to(dtype)
    return (loss_B * has_tokens_B).sum() / has_tokens_B.sum().clamp_min(1.0)


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
