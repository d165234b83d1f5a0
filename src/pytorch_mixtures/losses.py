"""Auxiliary losses of sparse layers, and the plumbing that brings them to the optimizer.

Shape legend: N tokens, E experts, K slots per token (top-k), B batch, T sequence.

* :func:`load_balancing_loss`: the Switch Transformer / GShard balance loss (Fedus et al. 2021,
  eq. 4; Lepikhin et al. 2020) with Hugging Face's normalisation, so values match
  ``transformers``' ``load_balancing_loss_func`` for the same logits.
* :func:`router_z_loss`: the ST-MoE z-loss (Zoph et al. 2022, eq. 5).
* :func:`sequence_balance_loss`: the per-sequence balance loss of DeepSeek-V3 (Liu et al. 2024,
  eq. 17-20).
* :func:`importance_loss`, :func:`noisy_top_k_load`, :func:`cv_squared`: the noisy top-k
  gating losses of Shazeer et al. 2017 ("Outrageously Large Neural Networks", section 4 and
  appendix A).
* :func:`aux_loss`: the one call a training loop needs: the sum of every library layer's
  weighted auxiliary loss from its last forward.

Every loss is computed in float32, whatever the logits' dtype, and excludes padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_int, check_mask_values, check_nonnegative_float

__all__ = [
    "AuxLossModule",
    "aux_loss",
    "balance_loss_from_assignments",
    "cv_squared",
    "importance_loss",
    "load_balancing_loss",
    "noisy_top_k_load",
    "router_z_loss",
    "sequence_balance_loss",
]


def _flatten_logits(router_logits: Tensor | Sequence[Tensor]) -> Tensor:
    """[..., E] tensor or a per-layer sequence of them (Hugging Face's tuple) -> [N, E] float32."""
    if isinstance(router_logits, Tensor):
        logits = router_logits
    elif isinstance(router_logits, (list, tuple)) and router_logits:
        if not all(isinstance(t, Tensor) for t in router_logits):
            raise TypeError("router_logits: expected a Tensor or a sequence of Tensors")
        widths = sorted({t.shape[-1] if t.dim() else 0 for t in router_logits})
        if len(widths) != 1:
            raise ValueError(
                f"router_logits: expected every layer's logits over the same experts, got "
                f"last dimensions {widths}"
            )
        logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in router_logits], dim=0)
    else:
        raise TypeError(
            f"router_logits: expected a Tensor [..., num_experts] or a non-empty sequence of "
            f"them, got {type(router_logits).__name__}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"router_logits: expected a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(
            f"router_logits: expected [tokens, num_experts] (or more leading dims), got shape "
            f"{tuple(logits.shape)}"
        )
    return logits.reshape(-1, logits.shape[-1]).float()


def _token_mask(attention_mask: Tensor | None, num_rows: int) -> Tensor | None:
    """A [B, T] (or [N]) padding mask -> bool [num_rows], repeated over stacked layers.

    Hugging Face concatenates the logits of L layers, so ``num_rows`` may be L times the mask's
    size; the mask is then repeated once per layer, as ``transformers`` does.
    """
    if attention_mask is None:
        return None
    check_mask_values(attention_mask)
    mask = attention_mask.reshape(-1).bool()
    if mask.numel() == 0 or num_rows % mask.numel() != 0:
        raise ValueError(
            f"attention_mask: expected {num_rows} entries (or a divisor of it, one per layer), "
            f"got shape {tuple(attention_mask.shape)}"
        )
    return mask.repeat(num_rows // mask.numel())


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over dim 0 of ``values`` [N, ...], counting only rows where ``mask`` [N] is True."""
    if mask is None:
        # zero tokens: 0, not the NaN of an empty mean
        return values.mean(dim=0) if values.shape[0] else values.sum(dim=0)
    mask = mask.reshape(-1, *([1] * (values.dim() - 1)))
    # where, not multiply: NaN/inf in a padding row must not leak; clamp: all-padding gives 0
    return torch.where(mask, values, 0.0).sum(dim=0) / mask.sum().clamp_min(1).to(values.dtype)


def _check_scores(name: str, scores: object, ndim: int) -> None:
    """A floating-point tensor of ``ndim`` dimensions (losses' score and logit inputs)."""
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        kind = scores.dtype if isinstance(scores, Tensor) else type(scores).__name__
        raise TypeError(f"{name}: expected a floating-point Tensor, got {kind}")
    if scores.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(scores.shape)}")


def balance_loss_from_assignments(
    probs: Tensor, expert_ids: Tensor, token_mask: Tensor | None = None
) -> Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * P_e`` from routing probabilities and choices.

    Args:
        probs: ``[N, E]`` float, each row a distribution over experts (``P`` is its mean).
        expert_ids: ``[N, K]`` int64, the experts each token chose (before any capacity drop).
        token_mask: optional ``[N]`` bool, False for padding (excluded from both means).

    Returns:
        0-dim float32 tensor. ``f_e`` is the fraction of the N tokens' K slots sent to expert e
        (so ``sum_e f_e = K``), hence the loss is ``K`` (= top_k) at perfect balance, not 1.
    """
    num_experts = probs.shape[-1]
    probs = probs.float()
    # [N, K, E] one-hot is N*K*E: the same size Hugging Face builds, and only for the loss
    slots_NKE = F.one_hot(expert_ids, num_experts).float()
    f_KE = _masked_mean(slots_NKE, token_mask)
    p_E = _masked_mean(probs, token_mask)
    return num_experts * (f_KE * p_E.unsqueeze(0)).sum()


def load_balancing_loss(
    router_logits: Tensor | Sequence[Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Switch/GShard load-balancing loss, as Hugging Face's ``load_balancing_loss_func``.

    ``num_experts * sum_e f_e * P_e`` where ``P_e`` is the mean softmax probability of expert
    ``e`` and ``f_e`` the fraction of top-k slots that chose ``e`` (counted per token over its
    ``top_k`` slots). At perfect balance the loss equals ``top_k`` (not 1): users often misread
    this. It is minimised by uniform routing and grows to ``num_experts`` under full collapse
    (``top_k = 1``).

    Args:
        router_logits: ``[..., E]`` logits, or a sequence of per-layer ``[N_l, E]`` logits
            (concatenated, as ``transformers`` passes them).
        num_experts: E, must equal the logits' last dimension.
        top_k: slots per token, in ``[1, num_experts]``.
        attention_mask: optional ``[B, T]`` (1 = real token, 0 = padding); padding is excluded.
            With L stacked layers' logits the mask is repeated per layer.

    Returns:
        0-dim float32 tensor.
    """
    check_int("num_experts", num_experts)
    logits = _flatten_logits(router_logits)
    if logits.shape[-1] != num_experts:
        raise ValueError(
            f"num_experts: expected the logits' last dimension {logits.shape[-1]}, "
            f"got {num_experts}"
        )
    check_int("top_k", top_k, 1, num_experts)
    probs = logits.softmax(dim=-1)
    expert_ids = probs.topk(top_k, dim=-1).indices
    return balance_loss_from_assignments(probs, expert_ids, _token_mask(attention_mask, len(probs)))


def router_z_loss(
    router_logits: Tensor | Sequence[Tensor], attention_mask: Tensor | None = None
) -> Tensor:
    """ST-MoE router z-loss: ``mean over tokens of logsumexp(logits)^2`` (Zoph et al. 2022).

    Penalises large logits, which keeps the router's softmax in a numerically safe range.
    For all-zero logits over E experts it equals ``log(E)^2``.

    Args:
        router_logits: ``[..., E]`` logits or a sequence of per-layer ``[N_l, E]`` logits.
        attention_mask: optional ``[B, T]`` padding mask (padding excluded).

    Returns:
        0-dim float32 tensor.
    """
    logits = _flatten_logits(router_logits)
    z_N = torch.logsumexp(logits, dim=-1).square()
    return _masked_mean(z_N, _token_mask(attention_mask, len(z_N)))


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
    _check_scores("probs_BTE", probs_BTE, 3)
    if not isinstance(expert_ids_BTK, Tensor) or expert_ids_BTK.is_floating_point():
        kind = expert_ids_BTK.dtype if isinstance(expert_ids_BTK, Tensor) else type(expert_ids_BTK)
        raise TypeError(f"expert_ids_BTK: expected an int64 tensor [B, T, K], got {kind}")
    if expert_ids_BTK.dim() != 3 or expert_ids_BTK.shape[:2] != probs_BTE.shape[:2]:
        raise ValueError(
            f"expert_ids_BTK: expected shape [{probs_BTE.shape[0]}, {probs_BTE.shape[1]}, K] (as "
            f"probs_BTE), got {tuple(expert_ids_BTK.shape)}"
        )
    num_experts = probs_BTE.shape[-1]
    if expert_ids_BTK.numel() and not torch.compiler.is_compiling():
        low, high = int(expert_ids_BTK.min()), int(expert_ids_BTK.max())
        if low < 0 or high >= num_experts:
            raise ValueError(
                f"expert_ids_BTK: expected experts in [0, {num_experts - 1}], got [{low}, {high}]"
            )
    return _sequence_balance_loss(probs_BTE, expert_ids_BTK, token_mask_BT)


def _sequence_balance_loss(
    probs_BTE: Tensor, expert_ids_BTK: Tensor, token_mask_BT: Tensor | None
) -> Tensor:
    """:func:`sequence_balance_loss` on inputs known to be valid (the router's own, every
    training forward: no checks, so no host sync for the ids' range)."""
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


def _global_balance_loss(
    probs_NE: Tensor, token_mask_N: Tensor | None, freq_E: Tensor, scale: Tensor
) -> Tensor:
    """The global-batch balance loss of one rank's micro-batch (``TopKRouter(balance="global")``):
    ``E * sum_e freq_E[e] * (sum of e's probability over the real tokens) * scale``.

    ``freq_E`` ``[E]`` (no gradient) are the global frequencies (slots per real token, summing
    to K) and ``scale`` (0-dim) is ``W / G``, the group size over the group's real tokens of the
    micro-batch, so the mean over W ranks is the loss of one process on their concatenated
    batch, ``E * sum_e f_e * P_e``. For one process ``freq_E`` = the batch's ``f_e`` and
    ``scale`` = 1 / N: the batch form of :func:`balance_loss_from_assignments`.
    """
    num_experts = probs_NE.shape[-1]
    sum_E = _masked_sum(probs_NE.float(), token_mask_N)
    return num_experts * (freq_E.to(sum_E.device) * sum_E).sum() * scale.to(sum_E.device)


def cv_squared(values_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``var(v) / (mean(v)^2 + eps)`` of ``values_E`` ``[E]``.

    Population variance (divide by E), as the authors' tensor2tensor code computes it. Zero for
    a single expert.
    """
    check_nonnegative_float("eps", eps)
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
    _check_scores("gates_NE", gates_NE, 2)
    if token_mask_N is not None and tuple(token_mask_N.shape) != (gates_NE.shape[0],):
        raise ValueError(
            f"token_mask_N: expected shape ({gates_NE.shape[0]},), got {tuple(token_mask_N.shape)}"
        )
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
    for name, scores in (
        ("clean_logits_NE", clean_logits_NE),
        ("noisy_logits_NE", noisy_logits_NE),
        ("noise_std_NE", noise_std_NE),
    ):
        _check_scores(name, scores, 2)
        if scores.shape != clean_logits_NE.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(clean_logits_NE.shape)} (as clean_logits_NE), "
                f"got {tuple(scores.shape)}"
            )
    num_experts = clean_logits_NE.shape[-1]
    check_int("top_k", top_k, 1, num_experts)
    if not torch.compiler.is_compiling() and bool((noise_std_NE <= 0).any()):
        raise ValueError(
            f"noise_std_NE: expected standard deviations > 0, got min {float(noise_std_NE.min())}"
        )
    return _noisy_top_k_load(clean_logits_NE, noisy_logits_NE, noise_std_NE, top_k, token_mask_N)


def _noisy_top_k_load(
    clean_logits_NE: Tensor,
    noisy_logits_NE: Tensor,
    noise_std_NE: Tensor,
    top_k: int,
    token_mask_N: Tensor | None,
) -> Tensor:
    """:func:`noisy_top_k_load` on inputs known to be valid (the router's own, every training
    forward: no checks, so no host sync for the std's sign)."""
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


class AuxLossModule(nn.Module):
    """Base of every library layer that produces an auxiliary loss.

    Subclasses call :meth:`_set_aux` in ``forward``. ``aux_loss`` is the weighted scalar that
    goes to the optimizer (it carries gradient); ``aux_losses`` holds the unweighted parts for
    logging. Both describe the *last* forward, so read them after each micro-batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self._aux_loss: Tensor | None = None
        self._aux_losses: dict[str, Tensor] = {}

    def _set_aux(self, weighted: Tensor, parts: dict[str, Tensor]) -> None:
        self._aux_loss = weighted
        self._aux_losses = dict(parts)

    def __getstate__(self) -> dict[str, object]:
        # the last forward's losses hang on its autograd graph, which cannot be copied or
        # pickled: a copy starts with none, as a fresh layer does
        state = dict(super().__getstate__())
        state["_aux_loss"] = None
        state["_aux_losses"] = {}
        return state

    @property
    def aux_loss(self) -> Tensor:
        """0-dim float32: this layer's weighted auxiliary loss from its last forward (0 before)."""
        if self._aux_loss is None:
            return torch.zeros((), device=_module_device(self))
        return self._aux_loss

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        """Unweighted auxiliary losses of the last forward, by name (for logging)."""
        return dict(self._aux_losses)


def _module_device(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every library layer (MoE, MoD, ...) inside ``model``.

    The one call a training loop needs::

        loss = task_loss + pm.aux_loss(model)

    Returns:
        0-dim float32 tensor on the model's device; zero when no layer has run forward yet.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    total = torch.zeros((), device=_module_device(model))
    for module in model.modules():
        if isinstance(module, AuxLossModule):
            total = total + module.aux_loss.to(total.device)
    return total
