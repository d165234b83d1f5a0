"""Mixture-of-Depths (Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating compute in
transformer-based language models", arXiv:2404.02258).

A scalar router ``r = w.x`` scores every token; only the chosen tokens run through the wrapped
block, the rest pass through unchanged. What this module guarantees:

* Training (``mod.train()``): each sequence keeps its top ``k = ceil(capacity * n_real)`` tokens
  by router score (ties to the lower index; padding never selected, ``k`` counted over real
  tokens). They are gathered *in their original order* with their *original position ids*, and
  the block runs on ``[B, k, D]`` only, so compute is actually saved.
* Output: ``x + g(r) * (block(x_sel) - x_sel)`` for a processed token (``g`` multiplies the
  block's delta, never the residual, so the router learns from the task loss), ``x`` bit-exact
  for every other token.
* Causal inference (``mod.eval()`` with a causal router, the default): top-k over a sequence is
  non-causal, so in eval a token is processed iff ``sigmoid(s) > threshold``, where ``s`` is the
  logit of a small MLP predictor on ``x.detach()`` (paper §3.5 method b, default) or the router
  logit itself trained by BCE (method a). Each decision depends on that token alone, so a causal
  block stays causal and KV-cache decoding matches the full forward pass. Both are trained by a
  binary cross-entropy against the training top-k membership (targets built per sequence), which
  reaches the optimizer through ``mod.aux_loss`` / ``pytorch_mixtures.aux_loss(model)``.
* Invalid slots (padding of the gathered ``[B, K, D]`` batch, or a row that selected nothing)
  are zeroed with ``torch.where``, never by multiplication, so a block's NaN rows cannot leak.

Blocks: any ``nn.Module`` mapping ``[B, K, D] -> [B, K, D]``. A block whose ``forward`` accepts
``attention_mask`` and/or ``position_ids`` receives the validity ``[B, K]`` (True = real token)
and the gathered true positions ``[B, K]``; a block that builds its attention mask by the rule
"attend iff ``pos_k <= pos_q`` and key valid" is then exactly right. Blocks with other
conventions go through an adapter (:class:`~pytorch_mixtures.depth.BlockAdapter`):
:class:`~pytorch_mixtures.depth.MaskAdapter` for blocks that take a full ``[B, K, K]`` mask,
:class:`~pytorch_mixtures.HFDecoderLayerAdapter` for Hugging Face Llama-style decoder layers.

Shape legend: B batch, T sequence, K gathered slots per row (max over rows), D model dim.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import (
    call_user_module,
    check_features,
    check_flag,
    check_input_matches,
    check_int,
    check_mask,
    check_nonnegative_float,
    check_shape,
)
from ..losses import AuxLossModule
from ..routing.capacity import capacity_ratio, ceil_scaled
from ..routing.replay import ReplayState
from .adapters import BlockAdapter

__all__ = [
    "CausalRouterName",
    "GateName",
    "MixtureOfDepths",
    "MoDLayer",
    "MoDStats",
    "calibrate_thresholds",
]

GateName = Literal["sigmoid", "identity", "tanh", "none"]
CausalRouterName = Literal["predictor", "router_bce", "none"]

_GATES: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "identity": lambda r: r,
    "tanh": torch.tanh,
    "none": torch.ones_like,
}
_CAUSAL_ROUTERS = ("predictor", "router_bce", "none")


@dataclass(frozen=True)
class MoDStats:
    """What a Mixture-of-Depths layer did in its last forward.

    Attributes:
        num_tokens: 0-dim int64, real (non-padding) tokens seen.
        processed_tokens: 0-dim int64, tokens the block processed.
        processed_per_row: ``[B]`` int64, tokens processed in each sequence.
        capacity: the configured capacity ``c``.
        causal: True when decisions were per token (eval with a causal router), False for
            per-sequence top-k.
        predictor_agreement: 0-dim float, in training with a causal router the fraction of real
            tokens on which the causal decision (``sigmoid(s) > threshold``) equals top-k
            membership; None otherwise.
    """

    num_tokens: Tensor
    processed_tokens: Tensor
    processed_per_row: Tensor
    capacity: float
    causal: bool
    predictor_agreement: Tensor | None = None

    @property
    def realized_capacity(self) -> Tensor:
        """0-dim float: processed tokens / real tokens (the capacity actually used)."""
        return self.processed_tokens.float() / self.num_tokens.clamp_min(1).float()


class MixtureOfDepths(AuxLossModule):
    """Route each sequence's top tokens through ``block``; the rest skip it (Raposo et al. 2024).

    ``forward(x, attention_mask=None, position_ids=None, **block_kwargs)``:

    * ``x``: ``[B, T, D]`` floating tensor.
    * ``attention_mask``: optional ``[B, T]`` (1/True = real token, 0 = padding). Padding is
      never processed, never counted in ``k``, excluded from losses, and returned unchanged.
    * ``position_ids``: optional ``[B, T]`` int64 true positions (default ``0..T-1``); the
      processed tokens' positions are gathered and passed on.
    * ``block_kwargs``: passed to the block unchanged (e.g. a KV ``cache``).

    Returns ``[B, T, D]`` of ``x``'s dtype: ``x + g(r) * (block(x_sel) - x_sel)`` at processed
    tokens (``x + g(r) * block(x_sel)`` with ``block_returns_residual=False``), ``x`` bit-exact
    elsewhere.

    After each forward: ``aux_loss`` (weighted BCE of the causal router, with gradient),
    ``aux_losses`` (``{"mod_bce": ...}``, unweighted) and ``stats`` (:class:`MoDStats`).

    Args:
        block: ``nn.Module`` ``[B, K, D] -> [B, K, D]``, or a :class:`BlockAdapter`.
        dim: model dimension D.
        capacity: fraction ``c`` in (0, 1] of each sequence's real tokens processed in training.
        gate: ``"sigmoid"`` (default), ``"identity"`` (the paper's ``r`` itself), ``"tanh"``,
            or ``"none"`` (``g = 1``: the router then learns nothing from the task loss; for
            ablations).
        causal_router: how eval mode decides: ``"predictor"`` (default; an MLP on
            ``x.detach()``), ``"router_bce"`` (the router logit, trained by BCE), or ``"none"``
            (eval uses top-k too: non-causal, fine for encoders, wrong for decoding).
        threshold: eval decision threshold on ``sigmoid(score)``, in [0, 1); see
            :meth:`calibrate_threshold` and :func:`calibrate_thresholds`.
        block_returns_residual: True when the block returns ``x + f(x)`` (a transformer block),
            False when it returns ``f(x)`` only.
        aux_loss_coef: weight of the BCE loss in ``aux_loss``. For the predictor it only scales
            the predictor's own gradient (with Adam this barely matters); for ``router_bce`` it
            trades the BCE against the task loss's gradient on the router.
        predictor_hidden: hidden width of the predictor MLP (default ``max(8, dim // 8)``).

    Example::

        mod = pm.MixtureOfDepths(block, dim=512, capacity=0.125)
        y = mod(x)                                   # training: top-k per sequence
        loss = task_loss + pm.aux_loss(model)        # trains the causal predictor
        mod.eval(); y = mod(x)                       # causal, per-token decisions
    """

    #: :func:`pytorch_mixtures.record_routing` records and replays the ``[B, T]`` selection
    supports_routing_replay = True
    #: set on the instance only while a record / replay context is open (routing/replay.py)
    _routing_replay: ReplayState | None = None

    def __init__(
        self,
        block: nn.Module,
        dim: int,
        capacity: float = 0.125,
        *,
        gate: GateName = "sigmoid",
        causal_router: CausalRouterName = "predictor",
        threshold: float = 0.5,
        block_returns_residual: bool = True,
        aux_loss_coef: float = 0.01,
        predictor_hidden: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block: expected an nn.Module, got {type(block).__name__}")
        check_int("dim", dim)
        if isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
            raise TypeError(f"capacity: expected a float in (0, 1], got {capacity!r}")
        if not (0.0 < capacity <= 1.0):
            raise ValueError(f"capacity: expected a value in (0, 1], got {capacity}")
        if gate not in _GATES:
            raise ValueError(f"gate: expected one of {sorted(_GATES)}, got {gate!r}")
        if causal_router not in _CAUSAL_ROUTERS:
            raise ValueError(
                f"causal_router: expected one of {list(_CAUSAL_ROUTERS)}, got {causal_router!r}"
            )
        check_nonnegative_float("aux_loss_coef", aux_loss_coef)
        self.dim = dim
        self.capacity = float(capacity)
        self.gate = gate
        self.causal_router = causal_router
        self.threshold = _check_threshold(threshold)
        self.block_returns_residual = check_flag("block_returns_residual", block_returns_residual)
        self.aux_loss_coef = float(aux_loss_coef)
        self.block = block
        params = inspect.signature(block.forward).parameters
        self._pass_mask = "attention_mask" in params
        self._pass_positions = "position_ids" in params
        self.router = nn.Linear(dim, 1, bias=False)
        nn.init.normal_(self.router.weight, mean=0.0, std=dim**-0.5)
        self.predictor: nn.Module | None = None
        if causal_router == "predictor":
            hidden = max(8, dim // 8) if predictor_hidden is None else predictor_hidden
            check_int("predictor_hidden", hidden)
            self.predictor = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self._stats: MoDStats | None = None
        # the last forward's (real, selected, agreement, causal), turned into stats when read
        self._pending_stats: tuple[Tensor, Tensor, Tensor | None, bool] | None = None

    @property
    def stats(self) -> MoDStats | None:
        """Statistics of the last forward (None before the first); computed when first read."""
        if self._pending_stats is not None:
            real_BT, selected_BT, agreement, causal = self._pending_stats
            self._pending_stats = None
            processed_B = selected_BT.sum(-1)
            self._stats = MoDStats(
                num_tokens=real_BT.sum(),
                processed_tokens=processed_B.sum(),
                processed_per_row=processed_B,
                capacity=self.capacity,
                causal=causal,
                predictor_agreement=agreement,
            )
        return self._stats

    @property
    def capacity(self) -> float:
        """The capacity ``c`` in (0, 1]; setting it keeps its exact ratio for ``ceil(c * n)``."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"capacity: expected a float in (0, 1], got {value!r}")
        if not 0.0 < value <= 1.0:
            raise ValueError(f"capacity: expected a value in (0, 1], got {value}")
        self._capacity = float(value)
        self._capacity_ratio = capacity_ratio(self._capacity)

    @property
    def uses_causal_decisions(self) -> bool:
        """True when this forward would decide per token (eval with a causal router)."""
        return not self.training and self.causal_router != "none"

    def router_logits(self, x: Tensor) -> Tensor:
        """Router scores ``r`` ``[B, T]``: float32 (float64 for float64 input), even autocast."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with _autocast_off(x):
            return F.linear(x.to(dtype), self.router.weight.to(dtype)).squeeze(-1)

    def causal_logits(self, x: Tensor, router_logits: Tensor | None = None) -> Tensor:
        """The per-token decision logits ``[B, T]`` float32 used in eval (needs a causal router).

        The predictor sees ``x.detach()``: its loss never reaches the main path, and the main
        loss never reaches it.
        """
        if self.causal_router == "router_bce":
            return self.router_logits(x) if router_logits is None else router_logits
        if self.predictor is None:
            raise ValueError("causal_router: 'none' has no causal decision logits")
        dtype = torch.promote_types(x.dtype, torch.float32)
        with _autocast_off(x):
            logits: Tensor = self.predictor(x.detach().to(dtype)).squeeze(-1)
        return logits

    def forward(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        **block_kwargs: Any,
    ) -> Tensor:
        valid_BT = self._check_input(x, attention_mask, position_ids)
        batch, seq_len, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=x.device).expand(batch, -1)
        r_BT = self.router_logits(x)
        real_BT = torch.ones_like(r_BT, dtype=torch.bool) if valid_BT is None else valid_BT

        causal = self.uses_causal_decisions
        if causal:
            prob_BT = torch.sigmoid(self.causal_logits(x, r_BT))
            selected_BT = (prob_BT > self.threshold) & real_BT
        else:
            selected_BT = self._topk_membership(r_BT, real_BT, real_BT.sum(-1))
        replay = self._routing_replay
        if replay is not None:  # routing replay: record this selection, or use the recorded one
            if replay.replaying:
                selected_BT = replay.take(tuple(r_BT.shape), torch.bool, x.device) & real_BT
            else:
                replay.record(selected_BT)

        agreement = None
        if self.training and self.causal_router != "none":
            bce, agreement = self._bce(x, r_BT, selected_BT, real_BT)
            self._set_aux(self.aux_loss_coef * bce, {"mod_bce": bce.detach()})
        else:
            self._aux_loss, self._aux_losses = None, {}  # zero (aux_loss makes it when read)
        self._pending_stats = (real_BT, selected_BT, agreement, causal)

        if seq_len == 1 and (self.block_kwargs_hold_state(block_kwargs) or batch == 1):
            return self._decode_step(
                x, r_BT, selected_BT, position_ids, valid_BT is None, block_kwargs
            )
        return self._route(x, r_BT, selected_BT, position_ids, valid_BT is None, block_kwargs)

    @staticmethod
    def block_kwargs_hold_state(block_kwargs: dict[str, Any]) -> bool:
        """Whether the block gets per-row state (a KV cache): then every row must be passed."""
        return any(v is not None for v in block_kwargs.values())

    def _decode_step(
        self,
        x_B1D: Tensor,
        r_B1: Tensor,
        selected_B1: Tensor,
        position_ids: Tensor,
        no_padding: bool,
        block_kwargs: dict[str, Any],
    ) -> Tensor:
        """One token per row (decoding): what :meth:`_route` computes, without its sort, gather
        and scatter. A step no row selects costs only the router (and one host sync to know)."""
        if torch.compiler.is_compiling():  # static shapes: the block always runs, masked
            valid_B1: Tensor | None = selected_B1
        else:
            count = int(selected_B1.sum())  # the one host sync: whether the block runs at all
            if count == 0:
                return x_B1D
            valid_B1 = None if no_padding and count == selected_B1.numel() else selected_B1
        x_sel_B1D = x_B1D if valid_B1 is None else torch.where(valid_B1[..., None], x_B1D, 0.0)
        y_B1D = self._run_block(x_sel_B1D, position_ids, valid_B1, **block_kwargs).to(x_B1D.dtype)
        if valid_B1 is not None:
            y_B1D = torch.where(valid_B1[..., None], y_B1D, 0.0)
        delta_B1D = y_B1D - x_sel_B1D if self.block_returns_residual else y_B1D
        update_B1D = x_sel_B1D + (_GATES[self.gate](r_B1)[..., None] * delta_B1D).to(x_B1D.dtype)
        return (
            update_B1D if valid_B1 is None else torch.where(valid_B1[..., None], update_B1D, x_B1D)
        )

    def _slot_bound(self, seq_len: int) -> int:
        """A static bound on the tokens any row selects: ``ceil(c * T)`` for top-k routing, all
        ``T`` for per-token causal decisions."""
        if self.uses_causal_decisions:
            return seq_len
        p, q = self._capacity_ratio
        return min(seq_len, (seq_len * p + q - 1) // q)

    def _topk_membership(self, r_BT: Tensor, real_BT: Tensor, num_real_B: Tensor) -> Tensor:
        """Per row, the top ``ceil(c * n_real)`` real tokens by score; ties to the lower index."""
        p, q = self._capacity_ratio  # exact: 0.7 of 10 tokens is 7, not the float's 8
        k_B = (num_real_B * p + q - 1) // q
        score_BT = torch.where(real_BT, r_BT.detach(), float("-inf"))
        # stable descending sort: equal scores keep index order, so ties go to the lower index
        order_BT = torch.argsort(score_BT, dim=-1, descending=True, stable=True)
        ranks = torch.arange(r_BT.shape[1], device=r_BT.device).expand_as(order_BT)
        rank_BT = torch.empty_like(order_BT).scatter_(1, order_BT, ranks)
        return (rank_BT < k_B[:, None]) & real_BT

    def _bce(
        self, x: Tensor, r_BT: Tensor, selected_BT: Tensor, real_BT: Tensor
    ) -> tuple[Tensor, Tensor]:
        """BCE of the causal logits against this forward's top-k membership, real tokens only.

        Targets are the ``[B, T]`` membership of each row's own top-k (never flat indices over
        the batch). Returns the loss and the decision agreement (both 0-dim float32).
        """
        logits_BT = self.causal_logits(x, r_BT).float()
        target_BT = selected_BT.float()
        per_token = F.binary_cross_entropy_with_logits(logits_BT, target_BT, reduction="none")
        weight_BT = real_BT.float()
        denom = weight_BT.sum().clamp_min(1.0)
        bce = (per_token * weight_BT).sum() / denom
        decided_BT = torch.sigmoid(logits_BT.detach()) > self.threshold
        agree = ((decided_BT == selected_BT).float() * weight_BT).sum() / denom
        return bce, agree

    def _route(
        self,
        x: Tensor,
        r_BT: Tensor,
        selected_BT: Tensor,
        position_ids: Tensor,
        no_padding: bool,
        block_kwargs: dict[str, Any],
    ) -> Tensor:
        """Gather the selected tokens in order, run the block on them, scatter the update back."""
        count_B = selected_BT.sum(-1)
        if count_B.numel() == 0:
            return x
        fewest: int | None = None
        if torch.compiler.is_compiling():
            # static shapes (fullgraph): a bound on every row's count, not the counts' maximum
            num_slots = self._slot_bound(x.shape[1])
        else:
            # the one host sync: the gathered width is a shape
            stats = torch.stack([count_B.max(), count_B.min()]).tolist()
            num_slots, fewest = int(stats[0]), int(stats[1])
            if num_slots == 0:
                return x  # nothing to process: the block is not called (a KV cache does not grow)
        # selected tokens first, each group in original order (stable sort on "not selected")
        order_BT = torch.argsort((~selected_BT).to(torch.uint8), dim=-1, stable=True)
        idx_BK = order_BT[:, :num_slots]
        valid_BK = torch.arange(num_slots, device=x.device)[None, :] < count_B[:, None]
        pos_BK = position_ids.gather(1, idx_BK)
        # Invalid slots sit after the row's real ones, at the row's last processed position, so
        # under "attend iff pos_k <= pos_q" they still see a real key (no all-masked softmax
        # row, whose NaN would reach the gradient of a naive block through 0 * NaN).
        last_B1 = (count_B - 1).clamp_min(0)[:, None]
        pos_BK = torch.where(valid_BK, pos_BK, pos_BK.gather(1, last_B1))
        idx_BKD = idx_BK[..., None].expand(-1, -1, x.shape[-1])
        x_gathered_BKD = x.gather(1, idx_BKD)
        x_sel_BKD = torch.where(valid_BK[..., None], x_gathered_BKD, 0.0)

        all_valid = no_padding and fewest == num_slots
        rows_R = None
        per_row_state = self.block_kwargs_hold_state(block_kwargs)  # e.g. a KV cache
        if not per_row_state and fewest == 0:  # (unknown under compile: all rows run)
            # a row with nothing to process skips the block entirely: a naive attention block
            # would give its all-masked softmax NaN, and NaN * 0 reaches the gradients
            rows_R = (count_B > 0).nonzero().squeeze(-1)
        if rows_R is None:
            y_BKD = self._run_block(
                x_sel_BKD, pos_BK, None if all_valid else valid_BK, **block_kwargs
            )
        else:
            y_RKD = self._run_block(
                x_sel_BKD[rows_R], pos_BK[rows_R], valid_BK[rows_R], **block_kwargs
            )
            y_BKD = x_sel_BKD.to(y_RKD.dtype).index_copy(0, rows_R, y_RKD)
        y_BKD = torch.where(valid_BK[..., None], y_BKD.to(x.dtype), 0.0)
        delta_BKD = y_BKD - x_sel_BKD if self.block_returns_residual else y_BKD
        g_BK = _GATES[self.gate](r_BT.gather(1, idx_BK))
        update_BKD = x_sel_BKD + (g_BK[..., None] * delta_BKD).to(x.dtype)
        # invalid slots write back the original rows (a permutation: no index repeats)
        src_BKD = torch.where(valid_BK[..., None], update_BKD, x_gathered_BKD)
        return x.scatter(1, idx_BKD, src_BKD)

    def _run_block(
        self, x_BKD: Tensor, pos_BK: Tensor, valid_BK: Tensor | None, **kwargs: Any
    ) -> Tensor:
        """Call the block (or adapter) with the keyword arguments it names; check the shape."""
        if isinstance(self.block, BlockAdapter):
            out = self.block(x_BKD, pos_BK, valid_BK, **kwargs)
        else:
            if self._pass_mask:
                kwargs["attention_mask"] = valid_BK
            if self._pass_positions:
                kwargs["position_ids"] = pos_BK
            mapping = f"[B, K, {self.dim}] -> [B, K, {self.dim}] (this layer's dim)"
            out = call_user_module("block", self.block, mapping, x_BKD, **kwargs)
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, Tensor) or out.shape != x_BKD.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"block: expected an output of shape {tuple(x_BKD.shape)} (the gathered "
                f"[B, K, D] input), got {got}"
            )
        return out

    def _check_input(
        self, x: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None
    ) -> Tensor | None:
        check_features(x, self.dim, (3,), f"[B, T, {self.dim}]")
        check_input_matches(x, self)  # the router's (and the block's) device and dtype
        check_shape("position_ids", position_ids, tuple(x.shape[:2]))
        if position_ids is not None and position_ids.is_floating_point():
            raise TypeError(f"position_ids: expected an integer tensor, got {position_ids.dtype}")
        return check_mask(attention_mask, x, (tuple(x.shape[:2]),))

    @torch.no_grad()
    def calibrate_threshold(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        capacity: float | None = None,
    ) -> float:
        """Set ``threshold`` so that a fraction ``capacity`` (default ``self.capacity``) of the
        real tokens of ``x`` ``[B, T, D]`` (this layer's inputs) passes ``sigmoid(s) > threshold``.

        Returns the new threshold.
        """
        valid_BT = self._check_input(x, attention_mask, None)
        if self.causal_router == "none":
            raise ValueError("causal_router: 'none' has no threshold to calibrate")
        probs = torch.sigmoid(self.causal_logits(x)).flatten()
        if valid_BT is not None:
            probs = probs[valid_BT.flatten()]
        self.threshold = _threshold_for(probs, self.capacity if capacity is None else capacity)
        return self.threshold

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, capacity={self.capacity}, gate={self.gate!r}, "
            f"causal_router={self.causal_router!r}, threshold={self.threshold:.4g}"
        )


MoDLayer = MixtureOfDepths


def _autocast_off(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast disabled for router math; a no-op context when it is off anyway (decoding calls
    this per token, and entering autocast costs microseconds)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def _check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold: expected a float in [0, 1), got {threshold!r}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold: expected a value in [0, 1), got {threshold}")
    return float(threshold)


def _threshold_for(probs: Tensor, capacity: float) -> float:
    """A threshold t with exactly ``ceil(capacity * n)`` of ``probs`` above it (ties aside)."""
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity: expected a value in (0, 1], got {capacity}")
    if probs.numel() == 0:
        raise ValueError("x: expected at least one real token to calibrate on, got none")
    sorted_probs = probs.double().sort(descending=True).values
    k = ceil_scaled(capacity, probs.numel())
    if k >= probs.numel():
        return 0.0
    # midpoint between the k-th and (k+1)-th largest: exactly k lie above it
    return float((sorted_probs[k - 1] + sorted_probs[k]) / 2)


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module, run: Callable[[], object] | Iterable[Any], capacity: float | None = None
) -> list[float]:
    """Calibrate every :class:`MixtureOfDepths` in ``model`` to a target eval capacity.

    Layers are calibrated in order, each on the inputs it sees with the earlier layers already
    calibrated (a layer's inputs depend on what the layers before it processed). ``run`` is a
    zero-argument callable that runs the model on calibration data, or an iterable of inputs
    passed as ``model(batch)``. Runs in eval mode (restored afterwards).

    Returns the thresholds, in module order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not callable(run) and (isinstance(run, (str, bytes)) or not isinstance(run, Iterable)):
        raise TypeError(
            f"run: expected a callable or an iterable of model inputs, got {type(run).__name__}"
        )
    layers = [m for m in model.modules() if isinstance(m, MixtureOfDepths)]
    if not layers:
        raise ValueError("model: expected at least one MixtureOfDepths layer, found none")
    if callable(run):
        run_fn: Callable[[], object] = run
    else:
        batches = list(run)

        def run_fn() -> object:
            return [model(batch) for batch in batches]

    was_training = model.training
    model.eval()
    thresholds = []
    try:
        for layer in layers:
            probs = _collect_causal_probs(layer, run_fn)
            target = layer.capacity if capacity is None else capacity
            layer.threshold = _threshold_for(probs, target)
            thresholds.append(layer.threshold)
    finally:
        model.train(was_training)
    return thresholds


def _collect_causal_probs(layer: MixtureOfDepths, run_fn: Callable[[], object]) -> Tensor:
    """``sigmoid`` of the causal logits of every real token ``layer`` sees while ``run_fn`` runs."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["x"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        probs = torch.sigmoid(layer.causal_logits(x)).flatten()
        seen.append(probs if mask is None else probs[mask.bool().flatten()])

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_fn()
    finally:
        handle.remove()
    if not seen:
        raise ValueError("run: the model never called one of its MixtureOfDepths layers")
    return torch.cat(seen)
