"""What every router shares: the :class:`RouterOutput` it returns and the :class:`Router` base
whose ``forward`` runs the one preamble (validate, flatten, mask) before the routing step.

Shape legend (tensor names carry their shape): B batch, T sequence, N = B*T tokens, D model dim,
E experts, K slots per token (top-k), C per-expert capacity, S routed slots (N*K for token
choice, B*E*C for expert choice).

Router math runs in float32 even under autocast: low-precision softmax and top-k flip expert
choices and inflate the z-loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import (
    check_capacity_factor,
    check_features,
    check_int,
    check_mask,
    check_nonnegative_float,
)
from .capacity import capacity_ratio

if TYPE_CHECKING:
    from .replay import ReplayState

__all__ = ["Decision", "Router", "RouterOutput", "token_major_output"]


def _in_autograd_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread.

    Activation checkpointing (reentrant or not) recomputes the forward inside backward; state
    that must change once per real forward (expert-load counts) skips those recomputations.
    """
    current_task = getattr(torch._C, "_current_graph_task_id", None)
    if current_task is None or torch.compiler.is_compiling():
        return False
    return bool(current_task() != -1)


@dataclass(frozen=True)
class RouterOutput:
    """Routing decisions for N tokens, as S slots.

    Attributes:
        logits: ``[N, E]`` router logits, float32 (float64 for float64 input).
        probs: ``[N, E]`` scores (softmax or sigmoid of ``logits``), same dtype.
        token_ids: ``[S]`` int64, the token (row of the flattened ``[N, D]`` input) each slot reads.
        expert_ids: ``[S]`` int64, the expert each slot goes to.
        weights: ``[S]`` the slot's combine weight, same dtype as ``logits``.
        kept: ``[S]`` bool; False for slots dropped by capacity and for padding tokens' slots.
            A slot that is not kept contributes zero to its token's output.
        token_mask: ``[N]`` bool, False for padding, or None when there is no padding.
        slots_per_token: K when slots are token-major (slot ``n*K + k`` is token n's k-th choice,
            as for top-k routing), None otherwise (expert choice).
        capacity: per-expert capacity C used for dropping (0-dim int64 tensor, or an int), or
            None when dropless.
        aux_losses: unweighted auxiliary losses by name (0-dim float32 tensors).
        aux_loss: their weighted sum, the router's contribution to the training loss.
    """

    logits: Tensor
    probs: Tensor
    token_ids: Tensor
    expert_ids: Tensor
    weights: Tensor
    kept: Tensor
    token_mask: Tensor | None
    slots_per_token: int | None
    capacity: Tensor | int | None
    aux_losses: Mapping[str, Tensor] = field(default_factory=lambda: MappingProxyType({}))
    aux_loss: Tensor = field(default_factory=lambda: torch.zeros(()))

    @property
    def num_tokens(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.logits.shape[-1])


@dataclass(frozen=True)
class Decision:
    """A router's decode-path routing of N tokens (:meth:`Router.decide`): what running the
    experts needs, and the logits from which :meth:`Router.complete` builds the full
    :class:`RouterOutput` (aux losses, statistics) only when someone asks.

    Attributes:
        logits: ``[N, E]`` router logits, float32.
        expert_ids: ``[N, K]`` int64, the chosen experts.
        gates: ``[N, K]`` the chosen experts' scores (renormalised when the router does).
        weights: ``[N, K]`` the combine weights (gates times the routed scaling factor).
    """

    logits: Tensor
    expert_ids: Tensor
    gates: Tensor
    weights: Tensor


def token_major_output(
    logits_NE: Tensor,
    probs_NE: Tensor,
    expert_ids_NK: Tensor,
    weights_NK: Tensor,
    kept_NK: Tensor,
    mask_N: Tensor | None,
    capacity: Tensor | int | None,
    aux_losses: dict[str, Tensor],
    aux_loss: Tensor,
) -> RouterOutput:
    """The :class:`RouterOutput` of a token-choice routing: slot ``n*K + k`` is token n's k-th."""
    num_tokens, top_k = expert_ids_NK.shape
    token_ids_S = torch.arange(num_tokens, device=expert_ids_NK.device).repeat_interleave(top_k)
    return RouterOutput(
        logits=logits_NE,
        probs=probs_NE,
        token_ids=token_ids_S,
        expert_ids=expert_ids_NK.reshape(-1),
        weights=weights_NK.reshape(-1),
        kept=kept_NK.reshape(-1),
        token_mask=mask_N,
        slots_per_token=top_k,
        capacity=capacity,
        aux_losses=MappingProxyType(aux_losses),
        aux_loss=aux_loss,
    )


class Router(nn.Module):
    """Common base of routers: a float32 linear gate ``logits = x @ W^T`` over E experts.

    ``forward(x, attention_mask=None)`` validates ``x`` (``[B, T, D]``, or ``[N, D]`` as one
    sequence) and the mask (``[B, T]``, 1 = real token), flattens them, and calls the one
    method subclasses implement: ``route(x_BTD, mask_BT, token_ids) -> RouterOutput`` with
    ``mask_BT`` bool or None.

    ``is_causal`` says whether a token's routing depends only on that token (safe for
    autoregressive models); ``MoELayer(causal=True)`` warns when it does not.
    """

    is_causal: bool = True
    #: routers that route on token ids (``HashRouter``) take ``forward(..., token_ids=...)``
    uses_token_ids: bool = False
    #: routers without a learned gate (hash, uniform) set this False: no unused parameters
    has_gate: bool = True
    #: routers whose selection :func:`pytorch_mixtures.record_routing` can record and replay
    supports_routing_replay: bool = False
    #: set on the instance only while a record / replay context is open (routing/replay.py)
    _routing_replay: ReplayState | None = None
    gate: nn.Linear

    def __init__(self, dim: int, num_experts: int, init_std: float | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.num_experts = check_int("num_experts", num_experts)
        self.capacity_factor = None
        if self.has_gate:
            self.gate = nn.Linear(dim, num_experts, bias=False)
            # small init: unit-variance logits make the first steps pick experts by noise and
            # collapse
            std = 0.02 if init_std is None else check_nonnegative_float("init_std", init_std)
            nn.init.normal_(self.gate.weight, mean=0.0, std=std)

    @property
    def capacity_factor(self) -> float | None:
        """None (dropless) or the capacity factor; setting it validates it and keeps its exact
        ratio (:func:`~pytorch_mixtures.routing.capacity.capacity_ratio`)."""
        return self._capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        factor = check_capacity_factor(value)
        self._capacity_factor = factor
        self._capacity_ratio = None if factor is None else capacity_ratio(factor)

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, *, token_ids: Tensor | None = None
    ) -> RouterOutput:
        """Route ``x`` ``[B, T, D]`` or ``[N, D]``; ``attention_mask`` ``[B, T]`` (1 = real);
        ``token_ids`` of shape ``x.shape[:-1]`` for routers that route on ids."""
        check_features(x, self.dim, (3, 2), f"[B, T, {self.dim}] or [N, {self.dim}]")
        if self.has_gate and x.device != self.gate.weight.device:
            raise ValueError(
                f"x: expected a tensor on {self.gate.weight.device} (the router's weights), got "
                f"one on {x.device}"
            )
        x_BTD = x if x.dim() == 3 else x.unsqueeze(0)
        mask = check_mask(attention_mask, x, (tuple(x.shape[:-1]), tuple(x_BTD.shape[:2])))
        mask_BT = None if mask is None else mask.reshape(x_BTD.shape[:2])
        if token_ids is not None and not self.uses_token_ids:
            raise TypeError(f"token_ids: {type(self).__name__} does not route on token ids")
        if isinstance(token_ids, Tensor) and tuple(token_ids.shape) == tuple(x.shape[:-1]):
            token_ids = token_ids.reshape(x_BTD.shape[:2])  # [N] ids of [N, D] input
        return self.route(x_BTD, mask_BT, token_ids)

    def route(
        self, x_BTD: Tensor, mask_BT: Tensor | None, token_ids: Tensor | None
    ) -> RouterOutput:
        """The routing step, on validated input: ``x_BTD`` ``[B, T, D]``, ``mask_BT`` ``[B, T]``
        bool or None, ``token_ids`` as the caller gave them (None unless ``uses_token_ids``)."""
        raise NotImplementedError

    def decide(self, x_ND: Tensor) -> Decision | None:
        """The decode path's routing of checked ``x_ND`` ``[N, D]``: no aux losses, capacity or
        statistics, or None when this router cannot decide so (the caller then runs
        :meth:`forward`). Equals ``forward``'s slots in eval mode; the default is None."""
        return None

    def complete(
        self, decision: Decision, batch_shape: tuple[int, int], mask_BT: Tensor | None
    ) -> RouterOutput:
        """What :meth:`forward` returns for the tokens of ``decision`` (``batch_shape`` ``(B, T)``,
        padding ``mask_BT``): for routers whose :meth:`decide` returns decisions."""
        raise NotImplementedError(f"{type(self).__name__} makes no decisions to complete")

    def _logits(self, x_ND: Tensor) -> Tensor:
        """Router logits ``[N, E]`` in float32 (float64 for float64 input), also under autocast."""
        dtype = torch.promote_types(x_ND.dtype, torch.float32)
        if not torch.is_autocast_enabled(x_ND.device.type):  # (the context costs microseconds)
            return F.linear(x_ND.to(dtype), self.gate.weight.to(dtype))
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            return F.linear(x_ND.to(dtype), self.gate.weight.to(dtype))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        *args: object,
        **kwargs: object,
    ) -> None:
        # torch's own message ("size mismatch for gate.weight") does not say what is wrong
        saved = state_dict.get(prefix + "gate.weight")
        if isinstance(saved, Tensor) and saved.dim() == 2:
            if saved.shape[0] != self.num_experts:
                raise ValueError(
                    f"state_dict: expected a router over {self.num_experts} experts, got a state "
                    f"dict with {saved.shape[0]} experts ({prefix}gate.weight of shape "
                    f"{tuple(saved.shape)})"
                )
            if saved.shape[1] != self.dim:
                raise ValueError(
                    f"state_dict: expected a router for dim={self.dim}, got a state dict for "
                    f"dim={saved.shape[1]} ({prefix}gate.weight of shape {tuple(saved.shape)})"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}"
