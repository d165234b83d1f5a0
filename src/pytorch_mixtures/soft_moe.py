"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Every expert processes ``slots_per_expert`` *slots*; each slot is a convex combination of all
the tokens of a sequence, and each token's output is a convex combination of all the slots'
outputs. Nothing is dropped and nothing is discrete, so there is no balance loss.

**Non-causal**: a slot mixes every token of the sequence, later ones included, so a token's
output depends on the whole sequence. Use it in encoders (the paper's ViTs), not in
autoregressive decoders.

Shape legend: B batch, T sequence, D model dim, E experts, S slots per expert, P = E*S slots.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_features, check_flag, check_input_matches, check_int, check_mask
from .experts import ExpertsBase, as_experts
from .losses import AuxLossModule

__all__ = ["SoftMoE"]


class SoftMoE(AuxLossModule):
    """Soft Mixture of Experts layer: ``x [B, T, D] -> y [B, T, D]`` (or ``[T, D]``).

    With ``logits = x @ phi`` (``[B, T, P]``, ``phi`` ``[D, P]``, slot p belongs to expert
    ``p // S``):

    * dispatch weights ``softmax(logits, dim=T)``: each slot's input is a weighted average of
      the sequence's tokens (eq. 1);
    * each expert runs on its S slots (of every sequence);
    * combine weights ``softmax(logits, dim=P)``: each token's output is a weighted average of
      the P slot outputs (eq. 2).

    With ``normalize=True`` (section 2.3, advised for large D) the logits are
    ``scale * l2norm(x) @ l2norm_columns(phi)`` with a learned scalar ``scale`` (init 1).
    Weights and logits are computed in float32 (float64 for float64 input); the slot mixing
    runs in ``x``'s dtype. Padding (``attention_mask`` 0) gets no dispatch weight and a zero
    output. ``aux_loss`` is always zero (a layer for ``pm.aux_loss`` like the others).

    Args:
        dim: model dimension D.
        num_experts: E.
        slots_per_expert: S.
        experts: ``MLPExperts`` / ``SwiGLUExperts`` or a list of E modules ``[n, D] -> [n, D]``.
        normalize: the paper's normalisation of the logits.
    """

    is_causal = False

    def __init__(
        self,
        dim: int,
        num_experts: int,
        slots_per_expert: int,
        experts: ExpertsBase | Iterable[nn.Module],
        *,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.num_experts = check_int("num_experts", num_experts)
        self.slots_per_expert = check_int("slots_per_expert", slots_per_expert)
        self.experts = as_experts(experts, dim)
        if self.experts.num_experts != num_experts or self.experts.dim != dim:
            raise ValueError(
                f"experts: expected {num_experts} experts of dim {dim}, got "
                f"{self.experts.num_experts} experts of dim {self.experts.dim}"
            )
        # LeCun normal, as the paper's code initialises phi
        self.phi = nn.Parameter(torch.randn(dim, num_experts * slots_per_expert) / math.sqrt(dim))
        self.normalize = check_flag("normalize", normalize)
        self.scale = nn.Parameter(torch.ones(())) if self.normalize else None

    def routing_weights(
        self, x: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Dispatch and combine weights, both ``[B, T, P]`` float32 (float64 for float64 x).

        ``dispatch[b, :, p]`` sums to 1 over the real tokens of sequence b (zero on padding);
        ``combine[b, t, :]`` sums to 1 over the P slots.
        """
        x_BTD, mask_BT = self._check(x, attention_mask)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_BTD = x_BTD.to(dtype)
            phi_DP = self.phi.to(dtype)
            if self.scale is not None:
                x_BTD = F.normalize(x_BTD, dim=-1) * self.scale.to(dtype)
                phi_DP = F.normalize(phi_DP, dim=0)
            logits_BTP = x_BTD @ phi_DP
        dispatch_logits_BTP = logits_BTP
        if mask_BT is not None:
            # finite fill: an all-padding sequence gets uniform (unused) weights, not NaN
            fill = torch.finfo(dtype).min
            dispatch_logits_BTP = logits_BTP.masked_fill(~mask_BT.unsqueeze(-1), fill)
        dispatch_BTP = dispatch_logits_BTP.softmax(dim=1)
        combine_BTP = logits_BTP.softmax(dim=-1)
        return dispatch_BTP, combine_BTP

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``x`` ``[B, T, D]`` or ``[T, D]``; ``attention_mask`` of shape ``x.shape[:-1]``."""
        x_BTD, mask_BT = self._check(x, attention_mask)
        check_input_matches(x, self)
        if x.numel() == 0:  # an empty batch (or empty sequences): an empty output, no slots
            self._set_aux(torch.zeros((), device=x.device), {})
            return x * 0
        batch, _, dim = x_BTD.shape
        num_experts, slots = self.num_experts, self.slots_per_expert
        dispatch_BTP, combine_BTP = self.routing_weights(x, attention_mask)
        if mask_BT is not None:  # where, not the zero weight: 0 * NaN in padding would leak
            x_BTD = torch.where(mask_BT.unsqueeze(-1), x_BTD, 0.0)
        slots_in_BPD = dispatch_BTP.to(x.dtype).transpose(1, 2) @ x_BTD
        # expert-major rows: expert e's S slots of every sequence are contiguous
        rows_EBSD = slots_in_BPD.view(batch, num_experts, slots, dim).transpose(0, 1)
        rows_RD = rows_EBSD.reshape(-1, dim)
        per_expert_E = torch.full((num_experts,), batch * slots, dtype=torch.long, device=x.device)
        out_rows_RD: Tensor = self.experts(rows_RD, per_expert_E)
        slots_out_BPD = (
            out_rows_RD.view(num_experts, batch, slots, dim).transpose(0, 1).reshape(batch, -1, dim)
        )
        y_BTD: Tensor = combine_BTP.to(x.dtype) @ slots_out_BPD.to(x.dtype)
        if mask_BT is not None:
            y_BTD = torch.where(mask_BT.unsqueeze(-1), y_BTD, 0.0)
        self._set_aux(torch.zeros((), device=x.device), {})
        return y_BTD.reshape(x.shape)

    def _check(self, x: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        check_features(x, self.dim, (3, 2), f"[B, T, {self.dim}] or [T, {self.dim}]")
        x_BTD = x if x.dim() == 3 else x.unsqueeze(0)
        mask = check_mask(attention_mask, x, (tuple(x.shape[:-1]),))
        return x_BTD, None if mask is None else mask.reshape(x_BTD.shape[:2])

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, "
            f"slots_per_expert={self.slots_per_expert}, normalize={self.normalize}"
        )
