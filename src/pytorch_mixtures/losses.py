"""Auxiliary losses of sparse layers, and the plumbing that brings them to the optimizer.

Shape legend: N tokens, E experts, K slots per token (top-k), B batch, T sequence.

* :func:`load_balancing_loss`: the Switch Transformer / GShard balance loss (Fedus et al. 2021,
  eq. 4; Lepikhin et al. 2020) with Hugging Face's normalisation, so values match
  ``transformers``' ``load_balancing_loss_func`` for the same logits.
* :func:`router_z_loss`: the ST-MoE z-loss (Zoph et al. 2022, eq. 5).
* :func:`aux_loss`: the one call a training loop needs: the sum of every library layer's
  weighted auxiliary loss from its last forward.

Every loss is computed in float32, whatever the logits' dtype, and excludes padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AuxLossModule",
    "aux_loss",
    "balance_loss_from_assignments",
    "load_balancing_loss",
    "router_z_loss",
]


def _flatten_logits(router_logits: Tensor | Sequence[Tensor]) -> Tensor:
    """[..., E] tensor or a per-layer sequence of them (Hugging Face's tuple) -> [N, E] float32."""
    if isinstance(router_logits, Tensor):
        logits = router_logits
    elif isinstance(router_logits, (list, tuple)) and router_logits:
        if not all(isinstance(t, Tensor) for t in router_logits):
            raise TypeError("router_logits: expected a Tensor or a sequence of Tensors")
        logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in router_logits], dim=0)
    else:
        raise TypeError(
            f"router_logits: expected a Tensor [..., num_experts] or a non-empty sequence of "
            f"them, got {type(router_logits).__name__}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"router_logits: expected a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("router_logits: expected at least one dimension [..., num_experts]")
    return logits.reshape(-1, logits.shape[-1]).float()


def _token_mask(attention_mask: Tensor | None, num_rows: int) -> Tensor | None:
    """A [B, T] (or [N]) padding mask -> bool [num_rows], repeated over stacked layers.

    Hugging Face concatenates the logits of L layers, so ``num_rows`` may be L times the mask's
    size; the mask is then repeated once per layer, as ``transformers`` does.
    """
    if attention_mask is None:
        return None
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
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    logits = _flatten_logits(router_logits)
    if logits.shape[-1] != num_experts:
        raise ValueError(
            f"num_experts: expected the logits' last dimension {logits.shape[-1]}, "
            f"got {num_experts}"
        )
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an integer in [1, {num_experts}], got {top_k}")
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
