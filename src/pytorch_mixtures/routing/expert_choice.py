"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Shape legend: B batch, T sequence, N = B*T tokens, D model dim, E experts, C tokens per expert.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_capacity_factor, check_int, check_nonnegative_float
from ..losses import router_z_loss
from .base import Router, RouterOutput
from .capacity import check_drop_policy, expert_choice_capacity

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

    Scores are a softmax over experts per token; then, *within each sequence*, expert e takes
    the ``C = min(ceil(capacity_factor * T / E), T)`` tokens with the highest score for e, with
    that score as the combine weight. A token may be picked by several experts or by none; a
    token picked by none gets zero from the layer (the caller's residual carries it) and is
    counted in the layer's stats as unrouted. Load is balanced by construction, so there is no
    balance loss (``z_loss_coef`` adds the z-loss if wanted).

    **Non-causal**: whether a token is picked depends on the other tokens of its sequence,
    including later ones. Do not use it in an autoregressive decoder (``MoELayer(causal=True)``
    warns) unless you accept train/inference mismatch.

    Padding (``attention_mask``) is never picked while real tokens remain (a padding slot
    picked in a sequence shorter than C is not kept); C is computed from the padded length T.

    The per-expert capacity C is set by one of ``capacity_factor`` (C = ceil(cf * T / E)) or
    ``capacity``: an int is a count of tokens per expert and sequence, a float in (0, 1] a
    fraction of the sequence (C = ceil(capacity * T)); C never exceeds T. A capacity factor
    given later to ``MoELayer`` replaces ``capacity``.

    Args:
        dim: model dimension D.
        num_experts: E.
        capacity_factor: average number of experts per token (C*E/T); the paper's EC-CF2 is 2.
            Default 1.0 when ``capacity`` is not given either.
        capacity: per-expert capacity as an int count or a float fraction of T (exclusive with
            ``capacity_factor``).
        z_loss_coef: weight of the z-loss in ``aux_loss`` (default 0).
        init_std: std of the router weight init (default 0.02).
        drop_policy: only ``"probs"``, accepted so code written for both routers can pass it:
            each expert keeps its C highest-scoring tokens by construction (which tokens no
            expert keeps depends on the scores, never on position). ``"position"`` is refused.
    """

    is_causal = False
    #: an expert keeps its highest-scoring tokens: the "probs" policy, by construction
    drop_policy: Literal["probs"] = "probs"

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: float | None = None,
        *,
        capacity: int | float | None = None,
        z_loss_coef: float = 0.0,
        init_std: float | None = None,
        drop_policy: Literal["probs"] = "probs",
    ) -> None:
        super().__init__(dim, num_experts, init_std)
        if check_drop_policy(drop_policy) != "probs":
            raise ValueError(
                f"drop_policy: expected 'probs' for ExpertChoiceRouter (each expert keeps its "
                f"highest-scoring tokens; position-based dropping is a token-choice policy), "
                f"got {drop_policy!r}"
            )
        self.expert_capacity: int | float | None = None
        if capacity is None:
            factor = 1.0 if capacity_factor is None else capacity_factor
            self.capacity_factor = check_capacity_factor(factor, allow_none=False)
        elif capacity_factor is not None:
            raise ValueError(
                f"capacity: give either capacity={capacity!r} or "
                f"capacity_factor={capacity_factor!r}, not both"
            )
        elif isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
            raise TypeError(
                f"capacity: expected an int count or a float fraction in (0, 1], got {capacity!r}"
            )
        elif isinstance(capacity, int):
            self.expert_capacity = check_int("capacity", capacity)
        elif not 0 < capacity <= 1:
            raise ValueError(f"capacity: expected a fraction in (0, 1] as a float, got {capacity}")
        else:
            self.expert_capacity = float(capacity)
        self.z_loss_coef = check_nonnegative_float("z_loss_coef", z_loss_coef)

    def capacity(self, seq_len: int) -> int:
        """Tokens each expert takes from a sequence of ``seq_len`` tokens."""
        return expert_choice_capacity(
            seq_len, self.num_experts, self.capacity_factor, self.expert_capacity,
            self._capacity_ratio,
        )  # fmt: skip

    def route(
        self, x_BTD: Tensor, mask_BT: Tensor | None, token_ids: Tensor | None
    ) -> RouterOutput:
        device = x_BTD.device
        batch, seq_len, _ = x_BTD.shape
        num_experts = self.num_experts
        capacity = self.capacity(seq_len)

        logits_NE = self._logits(x_BTD.reshape(-1, self.dim))
        probs_NE = logits_NE.softmax(dim=-1)
        probs_BET = probs_NE.reshape(batch, seq_len, num_experts).transpose(1, 2)
        select_BET = probs_BET
        if mask_BT is not None:
            # -1 < any probability: padding is never picked while real tokens remain
            select_BET = probs_BET.masked_fill(~mask_BT.unsqueeze(1), -1.0)
        _, token_idx_BEC = select_BET.topk(capacity, dim=-1)
        weights_BEC = probs_BET.gather(-1, token_idx_BEC)

        row_offset_B11 = (torch.arange(batch, device=device) * seq_len).view(batch, 1, 1)
        token_ids_BEC = token_idx_BEC + row_offset_B11
        expert_ids_BEC = torch.arange(num_experts, device=device).view(1, -1, 1)
        expert_ids_BEC = expert_ids_BEC.expand_as(token_ids_BEC)
        mask_N = None if mask_BT is None else mask_BT.reshape(-1)
        if mask_N is None:
            kept_BEC = torch.ones_like(token_ids_BEC, dtype=torch.bool)
        else:
            kept_BEC = mask_N[token_ids_BEC]

        aux_losses = {"router_z": router_z_loss(logits_NE, mask_N)}
        return RouterOutput(
            logits=logits_NE,
            probs=probs_NE,
            token_ids=token_ids_BEC.reshape(-1),
            expert_ids=expert_ids_BEC.reshape(-1),
            weights=weights_BEC.reshape(-1),
            kept=kept_BEC.reshape(-1),
            token_mask=mask_N,
            slots_per_token=None,
            capacity=capacity,
            aux_losses=MappingProxyType(aux_losses),
            aux_loss=self.z_loss_coef * aux_losses["router_z"],
        )

    def extra_repr(self) -> str:
        if self.capacity_factor is None:
            return f"{super().extra_repr()}, capacity={self.expert_capacity}"
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"
