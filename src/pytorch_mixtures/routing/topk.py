"""Token-choice top-k routing and its optional schemes, and the aux-loss-free bias update.

Shape legend: B batch, T sequence, N = B*T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_capacity_factor, check_flag, check_int, check_nonnegative_float

# the unchecked forms: the router's own tensors are valid by construction, and the public
# functions' checks would cost a host sync per training forward
from ..losses import (
    _global_balance_loss,
    _noisy_top_k_load,
    _sequence_balance_loss,
    balance_loss_from_assignments,
    cv_squared,
    importance_loss,
    router_z_loss,
)
from .base import Decision, Router, RouterOutput, _in_autograd_backward, token_major_output
from .capacity import DropPolicy, check_drop_policy, token_choice_keep
from .selection import group_limited_scores, softplus_noise_std

__all__ = ["TopKRouter", "TopKSchemes", "TopkRouter", "end_balance_step", "update_expert_bias"]

ScoreFunc = Literal["softmax", "sigmoid"]
BalanceMode = Literal["batch", "sequence", "global"]
GroupScore = Literal["auto", "top2_sum", "max"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class TopKSchemes:
    """The optional routing schemes of a :class:`TopKRouter`, validated once (see its docstring).

    Build with :meth:`validated`, which checks every field against the router's
    ``num_experts``, ``top_k`` and ``score_func`` and resolves the defaults (``topk_groups``
    None -> ``num_groups``; ``group_score="auto"`` -> ``"top2_sum"`` for sigmoid scores,
    ``"max"`` for softmax).
    """

    noisy_gating: bool = False
    noise_min_std: float = 1e-2
    importance_loss_coef: float = 0.01
    load_loss_coef: float = 0.01
    expert_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = "max"
    routed_scaling_factor: float = 1.0
    balance: BalanceMode = "batch"
    balance_group: Any = None

    @property
    def group_limited(self) -> bool:
        return self.topk_groups < self.num_groups

    @classmethod
    def validated(
        cls,
        num_experts: int,
        top_k: int,
        score_func: ScoreFunc,
        *,
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
        balance_group: Any = None,
    ) -> TopKSchemes:
        min_std = check_nonnegative_float("noise_min_std", noise_min_std)
        if noisy_gating and min_std == 0:
            raise ValueError("noise_min_std: expected a value > 0 with noisy_gating, got 0")
        groups = check_int("num_groups", num_groups, 1, num_experts)
        if num_experts % groups != 0:
            raise ValueError(
                f"num_groups: expected a divisor of num_experts={num_experts}, got {num_groups}"
            )
        used_groups = check_int(
            "topk_groups", groups if topk_groups is None else topk_groups, 1, groups
        )
        reachable = used_groups * (num_experts // groups)
        if top_k > reachable:
            raise ValueError(
                f"topk_groups: {used_groups} groups of {num_experts // groups} "
                f"experts hold {reachable} experts, fewer than top_k={top_k}"
            )
        if group_score not in ("auto", "top2_sum", "max"):
            raise ValueError(
                f"group_score: expected 'auto', 'top2_sum' or 'max', got {group_score!r}"
            )
        if group_score == "auto":
            group_score = "top2_sum" if score_func == "sigmoid" else "max"
        scaling = check_nonnegative_float("routed_scaling_factor", routed_scaling_factor)
        if scaling == 0:
            raise ValueError("routed_scaling_factor: expected a value > 0, got 0")
        if noisy_gating and (expert_bias or used_groups < groups):
            # the smooth load estimate assumes the top-k of the noisy logits is the selection
            raise ValueError(
                "noisy_gating: cannot be combined with expert_bias or group-limited routing "
                f"(got expert_bias={expert_bias}, num_groups={groups}, "
                f"topk_groups={used_groups})"
            )
        if balance not in ("batch", "sequence", "global"):
            raise ValueError(f"balance: expected 'batch', 'sequence' or 'global', got {balance!r}")
        if balance_group is not None:
            process_group = getattr(torch.distributed, "ProcessGroup", None)
            if process_group is None or not isinstance(balance_group, process_group):
                raise TypeError(
                    "balance_group: expected None (the world) or a "
                    f"torch.distributed.ProcessGroup, got {type(balance_group).__name__}"
                )
            if balance != "global":
                raise ValueError(
                    f"balance_group: only used with balance='global', got balance={balance!r}"
                )
        return cls(
            noisy_gating=check_flag("noisy_gating", noisy_gating),
            noise_min_std=min_std,
            importance_loss_coef=check_nonnegative_float(
                "importance_loss_coef", importance_loss_coef
            ),
            load_loss_coef=check_nonnegative_float("load_loss_coef", load_loss_coef),
            expert_bias=check_flag("expert_bias", expert_bias),
            num_groups=groups,
            topk_groups=used_groups,
            group_score=group_score,
            routed_scaling_factor=scaling,
            balance=balance,
            balance_group=balance_group,
        )


class _Scheme(Generic[_T]):
    """Read-only router attribute showing one field of its :class:`TopKSchemes` (build a new
    router to change a scheme: they are validated together)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, router: Any, owner: type | None = None) -> _T:
        if router is None:
            return self  # type: ignore[return-value]  # class access: the descriptor itself
        value: _T = getattr(router.schemes, self.name)
        return value

    def __set__(self, router: Any, value: object) -> None:
        raise AttributeError(
            f"{self.name}: a TopKRouter's routing schemes are fixed at construction "
            f"(router.schemes); build a new router with {self.name}={value!r}"
        )


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
    and are counted in the layer's ``stats``. ``drop_policy`` says which slots an overfull
    expert keeps: ``"position"`` (the default, GShard: earlier slots in that priority order)
    or ``"probs"`` (Megatron-Core's ``moe_token_drop_policy="probs"``, DeepSpeed's
    ``drop_policy="probs"``: the C slots with the highest combine weight, so the
    lowest-scoring slots are dropped first; ties go to the earlier slot in priority order).

    Aux losses (``RouterOutput.aux_losses``): ``load_balancing`` (Switch/GShard form, equals
    ``top_k`` at perfect balance; for sigmoid scores the scores are normalised per token first)
    weighted by ``balance_loss_coef``, and ``router_z`` weighted by ``z_loss_coef``. With
    ``balance="sequence"`` the balance loss is computed per sequence and averaged (DeepSeek-V3's
    complementary sequence-wise loss, same normalisation as the batch form). With
    ``balance="global"`` the frequencies ``f_e`` are counted over the global batch (Qiu et al.
    2025, "Demons in the Detail", arXiv 2501.11873, used by Qwen3-MoE; Megatron-Core's
    ``global_aux_loss``), see *Global-batch balance* below.

    Global-batch balance (``balance="global"``, training only; in eval it is the batch form):

    * Across data-parallel ranks it is exact. Each training forward all-reduces the ``[E]``
      slot counts and the real-token count of its micro-batch over ``balance_group`` (default
      the world; only when ``torch.distributed`` is initialised), so ``f_e`` is the global
      micro-batch's. ``P_e`` stays local: rank r's loss is ``E * sum_e f_e * S_re * W / G``
      with ``S_re`` the sum of e's probability over r's real tokens, ``W`` the group size and
      ``G`` the group's real tokens. Its mean over ranks is the loss of one process on the
      concatenated batch, and so is the gradient once the data-parallel wrapper averages
      gradients over the same group (DDP / FSDP do): exact for unequal token counts per rank
      and padding. Each rank's value is not the global loss: their mean is.
    * Across the micro-batches of a gradient-accumulation step exactness is impossible (the
      gradient into micro-batch m would need the counts of later ones). Following the paper's
      buffer of ``f_e`` accumulated over micro-batches (and Megatron-Core's running
      ``global_tokens_per_expert``), micro-batch m uses the counts of micro-batches ``1..m``
      of the step, ``f_e = C_e(1..m) / tokens(1..m)`` (token-weighted), while ``S_re / G``
      stays that of micro-batch m. So the last micro-batch uses the whole step's counts, and
      averaging the micro-batches' losses (the usual ``loss / accumulation_steps``) gives
      exactly the one-big-batch loss and gradient when the micro-batches are identical.
      :func:`pytorch_mixtures.end_balance_step` (once per optimizer step, after the last
      micro-batch's backward) resets the counts; without it they keep accumulating. Every
      training forward is a collective over the group: all its ranks must run it. Recomputations
      inside backward (activation checkpointing) reuse the last forward's counts, with no
      all-reduce. The counts are in :attr:`balance_counts` / :attr:`balance_tokens`.

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
        bias_update_rate: with ``expert_bias``, move the bias by DeepSeek-V3's rule at this
            rate after every training forward (counts of that forward, all-reduced when
            ``torch.distributed`` is initialised), so no :func:`update_expert_bias` call is
            needed; None (default): only that call moves it. Per forward, not per optimizer
            step: with gradient accumulation it moves once per micro-batch.
        num_groups: expert groups G (dividing E) for group-limited routing; 1 disables it.
        topk_groups: groups each token may use, in ``[1, G]`` (default G: no limit).
        group_score: ``"auto"``, ``"top2_sum"`` or ``"max"``.
        routed_scaling_factor: > 0, multiplies the combine weights.
        balance: ``"batch"`` (Switch/GShard over all tokens), ``"sequence"`` (per sequence)
            or ``"global"`` (frequencies over the global batch: every data-parallel rank and
            every micro-batch of the step so far).
        balance_group: with ``balance="global"``, the ``torch.distributed.ProcessGroup``
            the counts are all-reduced over (the data-parallel group); None: the world.
        drop_policy: ``"position"`` or ``"probs"``: which slots an overfull expert keeps in
            capacity mode (no effect when dropless); may be reassigned later (validated).
    """

    is_causal = True
    supports_routing_replay = True
    expert_bias: Tensor | None
    noisy_gating = _Scheme[bool]()
    noise_min_std = _Scheme[float]()
    importance_loss_coef = _Scheme[float]()
    load_loss_coef = _Scheme[float]()
    num_groups = _Scheme[int]()
    topk_groups = _Scheme[int]()
    group_score = _Scheme[GroupScore]()
    routed_scaling_factor = _Scheme[float]()
    balance = _Scheme[BalanceMode]()
    balance_group = _Scheme[Any]()

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
        drop_policy: DropPolicy = "position",
        balance_group: Any = None,
        bias_update_rate: float | None = None,
    ) -> None:
        super().__init__(dim, num_experts, init_std)
        self.drop_policy = drop_policy
        self.top_k = top_k
        self.capacity_factor = check_capacity_factor(capacity_factor)
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func: expected 'softmax' or 'sigmoid', got {score_func!r}")
        self.score_func: ScoreFunc = score_func
        self.normalize_weights = check_flag("normalize_weights", normalize_weights)
        jitter = check_nonnegative_float("jitter_noise", jitter_noise)
        if jitter >= 1:
            raise ValueError(f"jitter_noise: expected a value in [0, 1), got {jitter_noise}")
        self.jitter_noise = jitter
        self.balance_loss_coef = check_nonnegative_float("balance_loss_coef", balance_loss_coef)
        self.z_loss_coef = check_nonnegative_float("z_loss_coef", z_loss_coef)
        if top_k == 1 and normalize_weights:  # one score divided by itself, softmax or sigmoid
            warnings.warn(
                "TopKRouter(top_k=1, normalize_weights=True): every weight is 1, so the router "
                f"learns only from the aux losses (score_func={score_func!r}); Switch-style "
                "top-1 uses normalize_weights=False",
                stacklevel=2,
            )
        self.schemes = TopKSchemes.validated(
            num_experts,
            self.top_k,
            score_func,
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
            balance_group=balance_group,
        )
        # W_noise starts at zero (Shazeer et al. 2017, appendix A): noise std softplus(0)
        self.noise_gate = nn.Linear(dim, num_experts, bias=False) if noisy_gating else None
        if self.noise_gate is not None:
            nn.init.zeros_(self.noise_gate.weight)
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        if bias_update_rate is not None:
            bias_update_rate = check_nonnegative_float("bias_update_rate", bias_update_rate)
            if not expert_bias:
                raise ValueError(
                    f"bias_update_rate: expected None without expert_bias=True (there is no "
                    f"bias to update), got {bias_update_rate}"
                )
        self.bias_update_rate = bias_update_rate
        # real-forward load counts since the last bias update; a plain attribute, not a buffer,
        # so DDP's buffer broadcast cannot overwrite one rank's counts with another's
        self._load_counts: Tensor | None = None
        # balance="global": int64 [E + 1] (slot counts, real tokens) over the group and the
        # step's training forwards so far; and the last forward's (f_E, scale) for recomputes
        self._balance_counts: Tensor | None = None
        self._balance_last: tuple[Tensor, Tensor] | None = None

    @property
    def drop_policy(self) -> DropPolicy:
        """``"position"`` or ``"probs"``: which slots an overfull expert keeps (validated when
        assigned)."""
        return self._drop_policy

    @drop_policy.setter
    def drop_policy(self, value: DropPolicy) -> None:
        self._drop_policy = check_drop_policy(value)

    @property
    def top_k(self) -> int:
        """Slots per token, in ``[1, num_experts]`` (checked again when assigned)."""
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        self._top_k = check_int("top_k", value, 1, self.num_experts)

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
        rate = check_nonnegative_float("rate", rate)
        check_flag("all_reduce", all_reduce)
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

    @property
    def balance_counts(self) -> Tensor | None:
        """``balance="global"``: ``[E]`` int64 slots sent to each expert by real tokens in the
        training forwards since the last :meth:`end_balance_step`, summed over
        ``balance_group`` (None before the first)."""
        counts = self._balance_counts
        return None if counts is None else counts[: self.num_experts]

    @property
    def balance_tokens(self) -> Tensor | None:
        """``balance="global"``: 0-dim int64, the real tokens behind :attr:`balance_counts`."""
        counts = self._balance_counts
        return None if counts is None else counts[self.num_experts]

    def end_balance_step(self) -> Tensor | None:
        """End the optimizer step of ``balance="global"``: reset the running counts.

        Returns:
            ``[E]`` int64 the step's counts (None when nothing was counted).
        """
        if self.balance != "global":
            raise ValueError(
                f"end_balance_step: expected a router with balance='global', got "
                f"balance={self.balance!r}"
            )
        counts = self.balance_counts
        self._balance_counts = None
        self._balance_last = None
        return counts

    def _global_balance(
        self, probs_NE: Tensor, expert_ids_NK: Tensor, mask_N: Tensor | None
    ) -> Tensor:
        """The ``balance="global"`` training loss of this micro-batch (see the class docs)."""
        num_experts = self.num_experts
        last = self._balance_last
        if last is None or not _in_autograd_backward():
            with torch.no_grad():
                ids_S = expert_ids_NK.reshape(-1)
                if mask_N is not None:  # padding slots go to the token-count bin, cut off
                    ids_S = torch.where(mask_N.repeat_interleave(self.top_k), ids_S, num_experts)
                stats = torch.zeros(num_experts + 1, dtype=torch.long, device=ids_S.device)
                stats.scatter_add_(0, ids_S, torch.ones_like(ids_S))
                real = ids_S.new_full((), probs_NE.shape[0]) if mask_N is None else mask_N.sum()
                stats[num_experts] = real  # (the bin of padding slots, overwritten)
                world = 1
                dist = torch.distributed
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(stats, group=self.balance_group)
                    world = dist.get_world_size(self.balance_group)
                running = self._balance_counts
                # .to() on the model does not move this plain attribute: follow the counts
                running = stats if running is None else running.to(stats.device) + stats
                self._balance_counts = running
                freq_E = running[:num_experts].float() / running[num_experts].clamp_min(1)
                scale = world / stats[num_experts].clamp_min(1).float()
            self._balance_last = (freq_E, scale)
        else:  # a checkpoint recomputation inside backward: the original forward's numbers
            freq_E, scale = last
        return _global_balance_loss(probs_NE, mask_N, freq_E, scale)

    def route(
        self, x_BTD: Tensor, mask_BT: Tensor | None, token_ids: Tensor | None
    ) -> RouterOutput:
        x_ND = x_BTD.reshape(-1, self.dim)
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(x_ND).uniform_(1 - self.jitter_noise, 1 + self.jitter_noise)
            x_ND = x_ND * noise
        clean_logits_NE = self._logits(x_ND)
        logits_NE, noise_std_NE = self._noisy_logits(x_ND, clean_logits_NE)
        probs_NE = self._scores(logits_NE)
        if self._routing_replay is None:
            expert_ids_NK, gates_NK = self._select(probs_NE)
        else:
            expert_ids_NK, gates_NK = self._replay_select(probs_NE)
        if self.expert_bias is not None and self.training and not _in_autograd_backward():
            self._count_loads(expert_ids_NK, None if mask_BT is None else mask_BT.reshape(-1))
            if self.bias_update_rate is not None:  # after this forward's selection, as a step
                self.update_expert_bias(self.bias_update_rate)
        return self._output(
            x_BTD.shape[:2], mask_BT, clean_logits_NE, logits_NE, noise_std_NE, probs_NE,
            expert_ids_NK, gates_NK,
        )  # fmt: skip

    def decide(self, x_ND: Tensor) -> Decision | None:
        """Eval routing for the decode path: the same experts and weights as :meth:`forward`'s
        (dropless, no noise, no jitter), without aux losses or load counting. None in training
        and with a capacity (drops depend on the whole batch)."""
        if self.training or self.capacity_factor is not None or self._routing_replay is not None:
            return None  # (under record / replay the full path runs: the same arithmetic)
        logits_NE = self._logits(x_ND)
        plain = self.expert_bias is None and not self.schemes.group_limited
        if plain and self.score_func == "softmax" and self.normalize_weights:
            # the renormalised top-k softmax scores are the softmax of the top-k logits
            top_logits_NK, expert_ids_NK = logits_NE.topk(self.top_k, dim=-1)
            gates_NK = top_logits_NK.softmax(dim=-1)
        else:
            expert_ids_NK, gates_NK = self._select(self._scores(logits_NE))
        return Decision(logits_NE, expert_ids_NK, gates_NK, self._scaled(gates_NK))

    def complete(
        self, decision: Decision, batch_shape: tuple[int, int], mask_BT: Tensor | None
    ) -> RouterOutput:
        """The :class:`RouterOutput` that :meth:`forward` gives for the decided tokens (eval)."""
        logits_NE = decision.logits
        return self._output(
            batch_shape, mask_BT, logits_NE, logits_NE, None, self._scores(logits_NE),
            decision.expert_ids, decision.gates,
        )  # fmt: skip

    def _scores(self, logits_NE: Tensor) -> Tensor:
        return logits_NE.softmax(dim=-1) if self.score_func == "softmax" else logits_NE.sigmoid()

    def _output(
        self,
        batch_shape: tuple[int, int] | torch.Size,
        mask_BT: Tensor | None,
        clean_logits_NE: Tensor,
        logits_NE: Tensor,
        noise_std_NE: Tensor | None,
        probs_NE: Tensor,
        expert_ids_NK: Tensor,
        gates_NK: Tensor,
    ) -> RouterOutput:
        """Capacity, aux losses and the token-major output of a selection."""
        mask_N = None if mask_BT is None else mask_BT.reshape(-1)
        if self.score_func == "softmax":
            balance_probs_NE = probs_NE
        else:
            balance_probs_NE = probs_NE / probs_NE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        # the "probs" policy ranks by the combine weights (before the routed scaling factor,
        # a constant that cannot change the order), as Megatron-Core does
        kept_NK, capacity = token_choice_keep(
            expert_ids_NK, mask_N, self.capacity_factor, self.num_experts, self._capacity_ratio,
            drop_policy=self.drop_policy, scores_NK=gates_NK,
        )  # fmt: skip
        aux_losses = self._aux_losses(
            batch_shape, clean_logits_NE, balance_probs_NE, expert_ids_NK, mask_BT
        )
        weighted = (
            self.balance_loss_coef * aux_losses["load_balancing"]
            + self.z_loss_coef * aux_losses["router_z"]
        )
        if self.noise_gate is not None:
            gates_NE = torch.zeros_like(probs_NE).scatter(-1, expert_ids_NK, gates_NK)
            aux_losses.update(
                self._noisy_gating_losses(
                    clean_logits_NE, logits_NE, noise_std_NE, gates_NE, mask_N
                )
            )
            weighted = (
                weighted
                + self.importance_loss_coef * aux_losses["importance"]
                + self.load_loss_coef * aux_losses["load"]
            )
        return token_major_output(
            logits_NE, probs_NE, expert_ids_NK, self._scaled(gates_NK), kept_NK, mask_N,
            capacity, aux_losses, weighted,
        )  # fmt: skip

    def _scaled(self, gates_NK: Tensor) -> Tensor:
        """The combine weights: the gates times ``routed_scaling_factor``."""
        if self.routed_scaling_factor == 1.0:
            return gates_NK
        return gates_NK * self.routed_scaling_factor

    def _noisy_logits(self, x_ND: Tensor, clean_logits_NE: Tensor) -> tuple[Tensor, Tensor | None]:
        """Noisy top-k gating: the logits the top-k is taken on, and the noise std (None
        without ``noisy_gating``). Noise is drawn in training only."""
        if self.noise_gate is None:
            return clean_logits_NE, None
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            noise_logits_NE = F.linear(
                x_ND.to(clean_logits_NE.dtype), self.noise_gate.weight.to(clean_logits_NE.dtype)
            )
        noise_std_NE = softplus_noise_std(noise_logits_NE, self.noise_min_std)
        if not self.training:
            return clean_logits_NE, noise_std_NE
        return clean_logits_NE + torch.randn_like(clean_logits_NE) * noise_std_NE, noise_std_NE

    def _select(self, probs_NE: Tensor) -> tuple[Tensor, Tensor]:
        """The top-k experts ``[N, K]`` and their gates ``[N, K]`` (renormalised if asked).

        The expert bias and group limits change which experts are selected, never the gates:
        those are always the unbiased scores.
        """
        select_NE = probs_NE
        if self.expert_bias is not None:
            select_NE = probs_NE.detach() + self.expert_bias.to(probs_NE.dtype)
        if self.schemes.group_limited:
            select_NE = group_limited_scores(
                select_NE, self.num_groups, self.topk_groups, self.group_score
            )
        if select_NE is probs_NE:
            gates_NK, expert_ids_NK = probs_NE.topk(self.top_k, dim=-1)
        else:
            expert_ids_NK = select_NE.topk(self.top_k, dim=-1).indices
            gates_NK = probs_NE.gather(-1, expert_ids_NK)
        if self.normalize_weights:
            gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return expert_ids_NK, gates_NK

    def _replay_select(self, probs_NE: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_select` under routing replay (routing/replay.py): recording, the selection
        is made and its ``[N, K]`` int64 ids recorded; replaying, the recorded ids are taken and
        the gates are the current scores ``probs_NE`` ``[N, E]`` there, renormalised as
        :meth:`_select` does (so the router gets gradient and same weights give the same bits).
        """
        state = self._routing_replay
        assert state is not None
        if not state.replaying:
            expert_ids_NK, gates_NK = self._select(probs_NE)
            state.record(expert_ids_NK)
            return expert_ids_NK, gates_NK
        shape = (probs_NE.shape[0], self.top_k)
        expert_ids_NK = state.take(shape, torch.long, probs_NE.device)
        gates_NK = probs_NE.gather(-1, expert_ids_NK)
        if self.normalize_weights:
            gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return expert_ids_NK, gates_NK

    def _aux_losses(
        self,
        batch_shape: tuple[int, int] | torch.Size,
        clean_logits_NE: Tensor,
        balance_probs_NE: Tensor,
        expert_ids_NK: Tensor,
        mask_BT: Tensor | None,
    ) -> dict[str, Tensor]:
        """The balance loss (per batch or per sequence) and the z-loss, unweighted."""
        mask_N = None if mask_BT is None else mask_BT.reshape(-1)
        if self.balance == "global" and self.training:
            balance_loss = self._global_balance(balance_probs_NE, expert_ids_NK, mask_N)
        elif self.balance != "sequence":  # "batch", and "global" outside training
            balance_loss = balance_loss_from_assignments(balance_probs_NE, expert_ids_NK, mask_N)
        else:
            batch, seq_len = batch_shape
            balance_loss = _sequence_balance_loss(
                balance_probs_NE.float().reshape(batch, seq_len, self.num_experts),
                expert_ids_NK.reshape(batch, seq_len, self.top_k),
                mask_BT,
            )
        return {"load_balancing": balance_loss, "router_z": router_z_loss(clean_logits_NE, mask_N)}

    def _noisy_gating_losses(
        self,
        clean_logits_NE: Tensor,
        logits_NE: Tensor,
        noise_std_NE: Tensor | None,
        gates_NE: Tensor,
        mask_N: Tensor | None,
    ) -> dict[str, Tensor]:
        """Shazeer et al. 2017's importance and load losses, unweighted."""
        if self.training:
            assert noise_std_NE is not None
            load_E = _noisy_top_k_load(clean_logits_NE, logits_NE, noise_std_NE, self.top_k, mask_N)
        else:  # no noise, no smooth estimate: the hard count (tensor2tensor's choice)
            load_E = (gates_NE > 0).to(gates_NE.dtype)
            if mask_N is not None:
                load_E = load_E * mask_N.unsqueeze(-1)
            load_E = load_E.sum(dim=0)
        return {
            "importance": importance_loss(gates_NE, mask_N).float(),
            "load": cv_squared(load_E).float(),
        }

    def extra_repr(self) -> str:
        extra = ""
        if self.noisy_gating:
            extra += ", noisy_gating=True"
        if self.expert_bias is not None:
            extra += ", expert_bias=True"
        if self.schemes.group_limited:
            extra += f", num_groups={self.num_groups}, topk_groups={self.topk_groups}"
        if self.routed_scaling_factor != 1.0:
            extra += f", routed_scaling_factor={self.routed_scaling_factor}"
        if self.balance != "batch":
            extra += f", balance={self.balance!r}"
        if self.balance_group is not None:
            extra += ", balance_group=<ProcessGroup>"
        if self.drop_policy != "position":
            extra += f", drop_policy={self.drop_policy!r}"
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"score_func={self.score_func!r}, normalize_weights={self.normalize_weights}{extra}"
        )


TopkRouter = TopKRouter
"""Alias of :class:`TopKRouter` (the seed package's spelling)."""


def update_expert_bias(
    model: nn.Module, rate: float = 1e-3, *, all_reduce: bool = True, group: object = None
) -> dict[str, Tensor]:
    """Apply DeepSeek-V3's aux-loss-free bias update to every bias-balanced router in ``model``.

    For each ``TopKRouter(expert_bias=True)``: ``bias += rate * sign(mean(load) - load)`` with
    ``load`` the experts chosen by real tokens in the training forwards since the last call,
    then the counts are reset. Call it once per optimizer step (after the last micro-batch of
    a gradient-accumulation step). Counts are all-reduced over ``group`` when
    ``torch.distributed`` is initialised (``all_reduce=True``), so ranks stay in sync.

    Args:
        model: any module containing the routers (or a router itself).
        rate: the bias update speed gamma (DeepSeek-V3: 1e-3), >= 0.
        all_reduce: sum the counts over ``group`` when distributed.
        group: the process group (default: the world).

    Returns:
        Module name -> ``[E]`` int64 loads used, for the routers that had counted forwards.

    Raises:
        ValueError: when ``model`` holds no router with ``expert_bias=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    found = False
    used: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, TopKRouter) and module.expert_bias is not None:
            found = True
            loads = module.update_expert_bias(rate, all_reduce=all_reduce, group=group)
            if loads is not None:
                used[name] = loads
    if not found:
        raise ValueError(
            "model: contains no TopKRouter(expert_bias=True); build the routers with "
            "expert_bias=True to use update_expert_bias"
        )
    return used


def end_balance_step(model: nn.Module) -> dict[str, Tensor]:
    """End the optimizer step for every ``TopKRouter(balance="global")`` in ``model``.

    Resets each router's running expert counts, so the next training forward starts a new
    global batch. Call it once per optimizer step, after the last micro-batch's backward (for
    example next to ``optimizer.step()``); without it the counts keep accumulating over steps.
    Every rank of the balance group must call it at the same point (the counts are the group's).

    Args:
        model: any module containing the routers (or a router itself).

    Returns:
        Module name -> ``[E]`` int64 the step's counts (summed over the balance group), for
        the routers that had counted forwards.

    Raises:
        ValueError: when ``model`` holds no router with ``balance="global"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    found = False
    used: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, TopKRouter) and module.balance == "global":
            found = True
            counts = module.end_balance_step()
            if counts is not None:
                used[name] = counts
    if not found:
        raise ValueError(
            "model: expected a model containing a TopKRouter(balance='global'), got none; "
            "build the routers with balance='global' to use end_balance_step"
        )
    return used
