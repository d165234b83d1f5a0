"""Routers: who goes where, with what weight.

A router maps tokens to *slots*: (token, expert, weight) assignments. Every router returns the
same small immutable :class:`RouterOutput`, so dispatch and experts never depend on the routing
scheme.

Shape legend (tensor names carry their shape): B batch, T sequence, N = B*T tokens, D model dim,
E experts, K slots per token (top-k), C per-expert capacity, S routed slots (N*K for token
choice, B*E*C for expert choice).

Router math runs in float32 even under autocast: low-precision softmax and top-k flip expert
choices and inflate the z-loss.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .balancing import (
    cv_squared,
    group_limited_scores,
    importance_loss,
    noisy_top_k_load,
    sequence_balance_loss,
    softplus_noise_std,
)
from .losses import balance_loss_from_assignments, router_z_loss

__all__ = [
    "ExpertChoiceRouter",
    "Router",
    "RouterOutput",
    "TopKRouter",
    "TopkRouter",
    "capacity_keep_mask",
    "token_choice_keep",
    "token_major_output",
]

ScoreFunc = Literal["softmax", "sigmoid"]
BalanceMode = Literal["batch", "sequence"]
GroupScore = Literal["auto", "top2_sum", "max"]


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


def _check_positive_int(name: str, value: object, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if value < low or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected an integer in {bounds}, got {value}")
    return value


def _check_capacity_factor(value: object, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"capacity_factor: expected a positive float or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"capacity_factor: expected a finite value > 0, got {value}")
    return float(value)


def _check_coef(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite float >= 0, got {value}")
    return float(value)


def capacity_keep_mask(expert_ids_KN: Tensor, capacity: Tensor | int, num_experts: int) -> Tensor:
    """Which slots fit in their expert's capacity, filling in priority order.

    Args:
        expert_ids_KN: ``[K, N]`` int64 expert per slot in priority order (row-major: all first
            choices by token position, then all second choices, as in GShard). Entries equal to
            ``num_experts`` mark slots that take no capacity (padding).
        capacity: per-expert capacity C.
        num_experts: E.

    Returns:
        ``[K, N]`` bool, True where the slot is among the first C of its expert.

    Sort-based (argsort by expert, rank within expert): O(S log S), no ``[S, E]`` one-hot.
    """
    ids_S = expert_ids_KN.reshape(-1)
    order_S = torch.argsort(ids_S, stable=True)
    # scatter_add, not bincount: a static output shape keeps torch.compile graphs whole
    counts = ids_S.new_zeros(num_experts + 1).scatter_add_(0, ids_S, torch.ones_like(ids_S))
    starts = torch.cumsum(counts, dim=0) - counts
    rank_sorted_S = torch.arange(ids_S.numel(), device=ids_S.device) - starts[ids_S[order_S]]
    rank_S = torch.empty_like(rank_sorted_S).scatter_(0, order_S, rank_sorted_S)
    keep_S = (rank_S < capacity) & (ids_S < num_experts)
    return keep_S.reshape(expert_ids_KN.shape)


def token_choice_keep(
    expert_ids_NK: Tensor, mask_N: Tensor | None, capacity_factor: float | None, num_experts: int
) -> tuple[Tensor, Tensor | int | None]:
    """Which token-choice slots are kept: padding never, overflow past GShard capacity not.

    Args:
        expert_ids_NK: ``[N, K]`` int64 chosen experts (k-th column = k-th choice).
        mask_N: ``[N]`` bool, False for padding, or None.
        capacity_factor: None (dropless) or ``cf``: capacity ``ceil(cf * real_tokens * K / E)``.
        num_experts: E.

    Returns:
        ``kept_NK`` ``[N, K]`` bool, and the capacity (an int, a 0-dim int64 tensor when it
        depends on the mask, or None when dropless).
    """
    num_tokens, top_k = expert_ids_NK.shape
    kept_NK = torch.ones_like(expert_ids_NK, dtype=torch.bool)
    if mask_N is not None:
        kept_NK = kept_NK & mask_N.unsqueeze(-1)
    if capacity_factor is None:
        return kept_NK, None
    capacity: Tensor | int
    if mask_N is None:
        capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    else:
        capacity = torch.ceil(capacity_factor * mask_N.sum() * top_k / num_experts).long()
    # padding slots take no capacity: give them the sentinel expert E
    prio_ids_KN = torch.where(kept_NK, expert_ids_NK, num_experts).T
    return capacity_keep_mask(prio_ids_KN, capacity, num_experts).T, capacity


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

    Subclasses implement ``forward(x, attention_mask=None) -> RouterOutput`` where ``x`` is
    ``[B, T, D]`` (or ``[N, D]``, one sequence) and ``attention_mask`` is ``[B, T]`` (1 = real).

    ``is_causal`` says whether a token's routing depends only on that token (safe for
    autoregressive models); ``MoELayer(causal=True)`` warns when it does not.
    """

    is_causal: bool = True
    #: routers that route on token ids (``HashRouter``) take ``forward(..., token_ids=...)``
    uses_token_ids: bool = False
    #: routers without a learned gate (hash, uniform) set this False: no unused parameters
    has_gate: bool = True
    gate: nn.Linear

    def __init__(self, dim: int, num_experts: int, init_std: float | None = None) -> None:
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        self.num_experts = _check_positive_int("num_experts", num_experts)
        self.capacity_factor: float | None = None
        if self.has_gate:
            self.gate = nn.Linear(dim, num_experts, bias=False)
            # small init: unit-variance logits make the first steps pick experts by noise and
            # collapse
            std = 0.02 if init_std is None else init_std
            nn.init.normal_(self.gate.weight, mean=0.0, std=std)

    def _logits(self, x_ND: Tensor) -> Tensor:
        """Router logits ``[N, E]`` in float32 (float64 for float64 input), also under autocast."""
        dtype = torch.promote_types(x_ND.dtype, torch.float32)
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            return F.linear(x_ND.to(dtype), self.gate.weight.to(dtype))

    def _check_input(
        self, x: Tensor, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Validate and return ``x`` as ``[B, T, D]`` and the mask as ``[B, T]`` bool or None."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim:
            raise ValueError(
                f"x: expected shape [B, T, {self.dim}] or [N, {self.dim}], got {tuple(x.shape)}"
            )
        x_BTD = x if x.dim() == 3 else x.unsqueeze(0)
        if attention_mask is None:
            return x_BTD, None
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"attention_mask: expected a Tensor, got {type(attention_mask).__name__}"
            )
        if attention_mask.shape not in (x.shape[:-1], x_BTD.shape[:2]):
            raise ValueError(
                f"attention_mask: expected shape {tuple(x.shape[:-1])} (1 = token, 0 = padding), "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.is_complex():
            raise TypeError(
                f"attention_mask: expected a bool, integer or float 0/1 tensor, "
                f"got {attention_mask.dtype}"
            )
        if attention_mask.device != x.device:
            raise ValueError(
                f"attention_mask: expected a tensor on {x.device} (as x), "
                f"got one on {attention_mask.device}"
            )
        return x_BTD, attention_mask.reshape(x_BTD.shape[:2]).bool()

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


class TopKRouter(Router):
    """Token-choice top-k routing (Shazeer et al. 2017; Switch, Fedus et al. 2021; GShard).

    Each token scores the E experts (``softmax`` or ``sigmoid`` of its logits) and goes to its
    ``top_k`` best. With ``normalize_weights`` the k weights are rescaled to sum to 1 (Mixtral);
    without, they are the raw scores (Switch top-1: then the router learns from the task loss;
    with ``top_k=1`` normalising makes every weight 1, so the router learns only from aux losses).

    ``capacity_factor=None`` is dropless. With a capacity factor ``cf`` each expert takes at most
    ``C = ceil(cf * tokens * top_k / num_experts)`` slots, filled as in GShard: all first choices
    in token order, then all second choices, and so on. Overflow slots are dropped for that
    expert only (the token's output gets zero from that slot; the caller's residual carries it)
    and are counted in the layer's ``stats``.

    Aux losses (``RouterOutput.aux_losses``): ``load_balancing`` (Switch/GShard form, equals
    ``top_k`` at perfect balance; for sigmoid scores the scores are normalised per token first)
    weighted by ``balance_loss_coef``, and ``router_z`` weighted by ``z_loss_coef``. With
    ``balance="sequence"`` the balance loss is computed per sequence and averaged (DeepSeek-V3's
    complementary sequence-wise loss, same normalisation as the batch form).

    Further routing schemes (keyword-only; the defaults give plain top-k routing):

    * ``noisy_gating`` (Shazeer et al. 2017): in training, Gaussian noise of learned std
      ``softplus(x @ W_noise) + noise_min_std`` is added to the logits before the top-k, and the
      paper's losses are added: ``importance`` (``CV(sum of gates)^2``, weighted by
      ``importance_loss_coef``) and ``load`` (``CV(smooth load estimate)^2``, weighted by
      ``load_loss_coef``; in eval, without noise, the load is the hard count). ``W_noise`` starts
      at zero as in the paper. The Switch balance loss stays: set ``balance_loss_coef=0`` for the
      paper's recipe.
    * ``expert_bias`` (DeepSeek-V3, aux-loss-free balancing; Wang et al. 2024): a float32 buffer
      ``expert_bias`` ``[E]`` is added to the scores for the *selection* only; the combine weights
      are the unbiased scores. While training, each real forward counts the experts chosen by
      real tokens (checkpoint recomputations inside backward are not counted again, so
      gradient accumulation and activation checkpointing are safe);
      :func:`pytorch_mixtures.update_expert_bias` (once per optimizer step) moves the bias by
      ``rate * sign(mean load - load)`` and resets the counts. Saved in the state dict.
    * ``num_groups`` / ``topk_groups`` (DeepSeek-V3 group-limited routing): experts form
      ``num_groups`` contiguous groups; each token picks its top-k only among its
      ``topk_groups`` best groups. A group's score (``group_score="auto"``) is the sum of its two
      best selection scores for sigmoid scoring (DeepSeek-V3) and its best score for softmax
      (DeepSeek-V2); ``"top2_sum"`` or ``"max"`` force one rule.
    * ``routed_scaling_factor``: multiplies the final combine weights (DeepSeek-V3's 2.5).

    Args:
        dim: model dimension D.
        num_experts: E.
        top_k: slots per token, in ``[1, num_experts]``.
        capacity_factor: None (dropless) or > 0.
        score_func: ``"softmax"`` or ``"sigmoid"``.
        normalize_weights: rescale the k chosen scores to sum to 1.
        jitter_noise: Switch's multiplicative input jitter ``U(1-eps, 1+eps)``, training only.
        balance_loss_coef: weight of the balance loss in ``aux_loss``.
        z_loss_coef: weight of the z-loss in ``aux_loss``.
        init_std: std of the router weight init (default 0.02).
        noisy_gating: add the learned-std noise of Shazeer et al. 2017 in training.
        noise_min_std: floor added to the learned noise std (tensor2tensor's 1e-2).
        importance_loss_coef: weight of the 2017 importance loss (noisy gating only).
        load_loss_coef: weight of the 2017 load loss (noisy gating only).
        expert_bias: aux-loss-free balancing bias on the selection scores.
        num_groups: expert groups G (dividing E) for group-limited routing; 1 disables it.
        topk_groups: groups each token may use, in ``[1, G]`` (default G: no limit).
        group_score: ``"auto"``, ``"top2_sum"`` or ``"max"``.
        routed_scaling_factor: > 0, multiplies the combine weights.
        balance: ``"batch"`` (Switch/GShard over all tokens) or ``"sequence"`` (per sequence).
    """

    is_causal = True
    expert_bias: Tensor | None

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        *,
        capacity_factor: float | None = None,
        score_func: ScoreFunc = "softmax",
        normalize_weights: bool = True,
        jitter_noise: float = 0.0,
        balance_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        init_std: float | None = None,
        noisy_gating: bool = False,
        noise_min_std: float = 1e-2,
        importance_loss_coef: float = 0.01,
        load_loss_coef: float = 0.01,
        expert_bias: bool = False,
        num_groups: int = 1,
        topk_groups: int | None = None,
        group_score: GroupScore = "auto",
        routed_scaling_factor: float = 1.0,
        balance: BalanceMode = "batch",
    ) -> None:
        super().__init__(dim, num_experts, init_std)
        self.top_k = _check_positive_int("top_k", top_k, 1, num_experts)
        self.capacity_factor = _check_capacity_factor(capacity_factor)
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func: expected 'softmax' or 'sigmoid', got {score_func!r}")
        self.score_func: ScoreFunc = score_func
        self.normalize_weights = bool(normalize_weights)
        jitter = _check_coef("jitter_noise", jitter_noise)
        if jitter >= 1:
            raise ValueError(f"jitter_noise: expected a value in [0, 1), got {jitter_noise}")
        self.jitter_noise = jitter
        self.balance_loss_coef = _check_coef("balance_loss_coef", balance_loss_coef)
        self.z_loss_coef = _check_coef("z_loss_coef", z_loss_coef)
        if top_k == 1 and normalize_weights and score_func == "softmax":
            warnings.warn(
                "TopKRouter(top_k=1, normalize_weights=True): every weight is 1, so the router "
                "learns only from the aux losses; Switch-style top-1 uses normalize_weights=False",
                stacklevel=2,
            )
        self._init_schemes(
            noisy_gating=noisy_gating,
            noise_min_std=noise_min_std,
            importance_loss_coef=importance_loss_coef,
            load_loss_coef=load_loss_coef,
            expert_bias=expert_bias,
            num_groups=num_groups,
            topk_groups=topk_groups,
            group_score=group_score,
            routed_scaling_factor=routed_scaling_factor,
            balance=balance,
        )

    def _init_schemes(
        self,
        *,
        noisy_gating: bool,
        noise_min_std: float,
        importance_loss_coef: float,
        load_loss_coef: float,
        expert_bias: bool,
        num_groups: int,
        topk_groups: int | None,
        group_score: GroupScore,
        routed_scaling_factor: float,
        balance: BalanceMode,
    ) -> None:
        """Validate and store the optional routing schemes (see the class docstring)."""
        num_experts = self.num_experts
        self.noisy_gating = bool(noisy_gating)
        self.noise_min_std = _check_coef("noise_min_std", noise_min_std)
        if self.noisy_gating and self.noise_min_std == 0:
            raise ValueError("noise_min_std: expected a value > 0 with noisy_gating, got 0")
        self.importance_loss_coef = _check_coef("importance_loss_coef", importance_loss_coef)
        self.load_loss_coef = _check_coef("load_loss_coef", load_loss_coef)
        # W_noise starts at zero (Shazeer et al. 2017, appendix A): noise std softplus(0)
        self.noise_gate = nn.Linear(self.dim, num_experts, bias=False) if noisy_gating else None
        if self.noise_gate is not None:
            nn.init.zeros_(self.noise_gate.weight)

        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        # real-forward load counts since the last bias update; a plain attribute, not a buffer,
        # so DDP's buffer broadcast cannot overwrite one rank's counts with another's
        self._load_counts: Tensor | None = None

        self.num_groups = _check_positive_int("num_groups", num_groups, 1, num_experts)
        if num_experts % self.num_groups != 0:
            raise ValueError(
                f"num_groups: expected a divisor of num_experts={num_experts}, got {num_groups}"
            )
        if topk_groups is None:
            topk_groups = self.num_groups
        self.topk_groups = _check_positive_int("topk_groups", topk_groups, 1, self.num_groups)
        reachable = self.topk_groups * (num_experts // self.num_groups)
        if self.top_k > reachable:
            raise ValueError(
                f"topk_groups: {self.topk_groups} groups of {num_experts // self.num_groups} "
                f"experts hold {reachable} experts, fewer than top_k={self.top_k}"
            )
        if group_score not in ("auto", "top2_sum", "max"):
            raise ValueError(
                f"group_score: expected 'auto', 'top2_sum' or 'max', got {group_score!r}"
            )
        if group_score == "auto":
            group_score = "top2_sum" if self.score_func == "sigmoid" else "max"
        self.group_score: GroupScore = group_score
        scaling = _check_coef("routed_scaling_factor", routed_scaling_factor)
        if scaling == 0:
            raise ValueError("routed_scaling_factor: expected a value > 0, got 0")
        self.routed_scaling_factor = scaling
        if self.noisy_gating and (expert_bias or self.topk_groups < self.num_groups):
            # the smooth load estimate assumes the top-k of the noisy logits is the selection
            raise ValueError(
                "noisy_gating: cannot be combined with expert_bias or group-limited routing "
                f"(got expert_bias={expert_bias}, num_groups={self.num_groups}, "
                f"topk_groups={self.topk_groups})"
            )
        if balance not in ("batch", "sequence"):
            raise ValueError(f"balance: expected 'batch' or 'sequence', got {balance!r}")
        self.balance: BalanceMode = balance

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> TopKRouter:
        # ``model.half()`` / ``.to(bfloat16)`` must not round the bias: +-1e-3 updates vanish
        # in bf16. Keep it float32, only following the device.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        moved = self.expert_bias
        if bias is not None and moved is not None and moved.dtype != torch.float32:
            self.expert_bias = bias.to(device=moved.device)
        return self

    @torch.no_grad()
    def _count_loads(self, expert_ids_NK: Tensor, mask_N: Tensor | None) -> None:
        ids_S = expert_ids_NK.reshape(-1)
        if mask_N is not None:
            # padding slots go to a sentinel bin that is cut off
            ids_S = torch.where(mask_N.repeat_interleave(self.top_k), ids_S, self.num_experts)
        counts_E = torch.bincount(ids_S, minlength=self.num_experts + 1)[: self.num_experts]
        if self._load_counts is None:
            self._load_counts = counts_E
        else:  # .to() on the model does not move this plain attribute: follow the counts
            self._load_counts = self._load_counts.to(counts_E.device) + counts_E

    @property
    def pending_loads(self) -> Tensor | None:
        """``[E]`` int64 experts chosen by real tokens in training forwards since the last
        :meth:`update_expert_bias` (None before the first; only counted with ``expert_bias``)."""
        return self._load_counts

    @torch.no_grad()
    def update_expert_bias(
        self, rate: float = 1e-3, *, all_reduce: bool = True, group: object = None
    ) -> Tensor | None:
        """DeepSeek-V3's bias update: ``bias += rate * sign(mean(load) - load)``, counts reset.

        Overloaded experts' bias goes down, underloaded ones' goes up. ``load`` is the counts
        since the last call; when ``torch.distributed`` is initialised and ``all_reduce`` is
        True they are summed over ``group`` first, so every rank applies the same update.

        Returns:
            ``[E]`` the loads used (None when nothing was counted; the bias is then unchanged).
        """
        if self.expert_bias is None:
            raise ValueError("update_expert_bias: this router was built with expert_bias=False")
        rate = _check_coef("rate", rate)
        loads = self._load_counts
        if loads is None:
            return None
        loads = loads.clone()
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loads, group=group)
        loads_E = loads.to(self.expert_bias.device, torch.float32)
        self.expert_bias += rate * torch.sign(loads_E.mean() - loads_E)
        self._load_counts = None
        return loads

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> RouterOutput:
        """Route ``x`` ``[B, T, D]`` or ``[N, D]``; ``attention_mask`` ``[B, T]`` (1 = real)."""
        x_BTD, mask_BT = self._check_input(x, attention_mask)
        x_ND = x_BTD.reshape(-1, self.dim)
        num_experts, top_k = self.num_experts, self.top_k
        mask_N = None if mask_BT is None else mask_BT.reshape(-1)

        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(x_ND).uniform_(1 - self.jitter_noise, 1 + self.jitter_noise)
            x_ND = x_ND * noise
        clean_logits_NE = self._logits(x_ND)
        logits_NE, noise_std_NE = clean_logits_NE, None
        if self.noise_gate is not None:
            with torch.autocast(device_type=x_ND.device.type, enabled=False):
                noise_logits_NE = F.linear(
                    x_ND.to(clean_logits_NE.dtype),
                    self.noise_gate.weight.to(clean_logits_NE.dtype),
                )
            noise_std_NE = softplus_noise_std(noise_logits_NE, self.noise_min_std)
            if self.training:
                noise_NE = torch.randn_like(clean_logits_NE)
                logits_NE = clean_logits_NE + noise_NE * noise_std_NE
        if self.score_func == "softmax":
            probs_NE = logits_NE.softmax(dim=-1)
            balance_probs_NE = probs_NE
        else:
            probs_NE = logits_NE.sigmoid()
            balance_probs_NE = probs_NE / probs_NE.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        select_NE = probs_NE
        if self.expert_bias is not None:
            select_NE = probs_NE.detach() + self.expert_bias.to(probs_NE.dtype)
        if self.topk_groups < self.num_groups:
            select_NE = group_limited_scores(
                select_NE, self.num_groups, self.topk_groups, self.group_score
            )
        if select_NE is probs_NE:
            topk_scores_NK, expert_ids_NK = probs_NE.topk(top_k, dim=-1)
        else:
            expert_ids_NK = select_NE.topk(top_k, dim=-1).indices
            topk_scores_NK = probs_NE.gather(-1, expert_ids_NK)
        gates_NK = topk_scores_NK
        if self.normalize_weights:
            gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        weights_NK = gates_NK
        if self.routed_scaling_factor != 1.0:
            weights_NK = gates_NK * self.routed_scaling_factor
        if self.expert_bias is not None and self.training and not _in_autograd_backward():
            self._count_loads(expert_ids_NK, mask_N)

        kept_NK, capacity = token_choice_keep(
            expert_ids_NK, mask_N, self.capacity_factor, num_experts
        )

        if self.balance == "batch":
            balance_loss = balance_loss_from_assignments(balance_probs_NE, expert_ids_NK, mask_N)
        else:
            batch, seq_len = x_BTD.shape[:2]
            balance_loss = sequence_balance_loss(
                balance_probs_NE.float().reshape(batch, seq_len, num_experts),
                expert_ids_NK.reshape(batch, seq_len, top_k),
                mask_BT,
            )
        aux_losses = {
            "load_balancing": balance_loss,
            "router_z": router_z_loss(clean_logits_NE, mask_N),
        }
        weighted = (
            self.balance_loss_coef * aux_losses["load_balancing"]
            + self.z_loss_coef * aux_losses["router_z"]
        )
        if noise_std_NE is not None:
            gates_NE = torch.zeros_like(probs_NE).scatter(-1, expert_ids_NK, gates_NK)
            if self.training:
                load_E = noisy_top_k_load(clean_logits_NE, logits_NE, noise_std_NE, top_k, mask_N)
            else:  # no noise, no smooth estimate: the hard count (tensor2tensor's choice)
                load_E = (gates_NE > 0).to(gates_NE.dtype)
                if mask_N is not None:
                    load_E = load_E * mask_N.unsqueeze(-1)
                load_E = load_E.sum(dim=0)
            aux_losses["importance"] = importance_loss(gates_NE, mask_N).float()
            aux_losses["load"] = cv_squared(load_E).float()
            weighted = (
                weighted
                + self.importance_loss_coef * aux_losses["importance"]
                + self.load_loss_coef * aux_losses["load"]
            )
        return token_major_output(
            logits_NE,
            probs_NE,
            expert_ids_NK,
            weights_NK,
            kept_NK,
            mask_N,
            capacity,
            aux_losses,
            weighted,
        )

    def extra_repr(self) -> str:
        extra = ""
        if self.noisy_gating:
            extra += ", noisy_gating=True"
        if self.expert_bias is not None:
            extra += ", expert_bias=True"
        if self.topk_groups < self.num_groups:
            extra += f", num_groups={self.num_groups}, topk_groups={self.topk_groups}"
        if self.routed_scaling_factor != 1.0:
            extra += f", routed_scaling_factor={self.routed_scaling_factor}"
        if self.balance != "batch":
            extra += f", balance={self.balance!r}"
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"score_func={self.score_func!r}, normalize_weights={self.normalize_weights}{extra}"
        )


TopkRouter = TopKRouter
"""Alias of :class:`TopKRouter` (the seed package's spelling)."""


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
    """

    is_causal = False

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: float | None = None,
        *,
        capacity: int | float | None = None,
        z_loss_coef: float = 0.0,
        init_std: float | None = None,
    ) -> None:
        super().__init__(dim, num_experts, init_std)
        self.expert_capacity: int | float | None = None
        if capacity is None:
            factor = 1.0 if capacity_factor is None else capacity_factor
            self.capacity_factor = _check_capacity_factor(factor, allow_none=False)
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
            self.expert_capacity = _check_positive_int("capacity", capacity)
        elif not 0 < capacity <= 1:
            raise ValueError(f"capacity: expected a fraction in (0, 1] as a float, got {capacity}")
        else:
            self.expert_capacity = float(capacity)
        self.z_loss_coef = _check_coef("z_loss_coef", z_loss_coef)

    def capacity(self, seq_len: int) -> int:
        """Tokens each expert takes from a sequence of ``seq_len`` tokens."""
        if self.capacity_factor is not None:
            count = math.ceil(self.capacity_factor * seq_len / self.num_experts)
        elif isinstance(self.expert_capacity, int):
            count = self.expert_capacity
        else:
            assert self.expert_capacity is not None
            count = math.ceil(self.expert_capacity * seq_len)
        return min(count, seq_len)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> RouterOutput:
        """Route ``x`` ``[B, T, D]`` (or ``[N, D]``: one sequence); mask ``[B, T]`` (1 = real)."""
        x_BTD, mask_BT = self._check_input(x, attention_mask)
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

        row_offset_B11 = (torch.arange(batch, device=x.device) * seq_len).view(batch, 1, 1)
        token_ids_BEC = token_idx_BEC + row_offset_B11
        expert_ids_BEC = torch.arange(num_experts, device=x.device).view(1, -1, 1)
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
