"""MoELayer: router -> dispatch -> experts -> combine, as a drop-in for an MLP.

Also here: the layer options that change the data path but not the router, namely
zero-computation experts (MoE++, :class:`ConstantExperts`) and pad-to-capacity dispatch.

Shape legend: B batch, T sequence, N = B*T tokens, D model dim, E experts, S routed slots,
J constant experts, C rows per expert in padded dispatch, P = E*C padded rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from . import dispatch
from .backends import DECODE_MAX_SLOTS, use_decode_path, use_static_decode_path
from .checks import (
    call_user_module,
    check_capacity_factor,
    check_features,
    check_flag,
    check_input_matches,
    check_int,
    check_mask,
    check_token_ids,
    raise_if_nonfinite,
)
from .experts import ExpertsBase, as_experts
from .losses import AuxLossModule
from .routing import Decision, Router, RouterOutput
from .stats import RoutingStats, routing_stats_from

__all__ = ["ZERO_COMPUTATION_KINDS", "ConstantExperts", "MoELayer", "ZeroComputationKind"]

ZeroComputationKind = Literal["zero", "copy", "constant"]
#: the zero-computation expert kinds, in the order their ids follow the real experts
ZERO_COMPUTATION_KINDS: tuple[ZeroComputationKind, ...] = ("zero", "copy", "constant")


class ConstantExperts(nn.Module):
    """J constant experts of MoE++ (Jin et al. 2024, arXiv 2410.07348, section 3.1).

    Expert j maps a token ``x`` to ``a1 * x + a2 * v_j`` with ``[a1, a2] = softmax(W_j x)``:
    a learned vector ``v_j`` ``[D]`` mixed with the token by a 2-way gate ``W_j`` ``[2, D]``.
    No expert matmul: the gate is a ``[D] -> [2]`` projection per expert.

    Parameters: ``gate_weight`` ``[J, 2, D]`` (initialised as ``nn.Linear(D, 2)`` would) and
    ``constant`` ``[J, D]`` (standard normal, as in the MoE++ reference code).

    Args:
        num_experts: J, >= 1.
        dim: D.
    """

    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts)
        self.dim = check_int("dim", dim)
        self.gate_weight = nn.Parameter(torch.empty(num_experts, 2, dim))
        self.constant = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.dim)  # nn.Linear's default init, per expert
        nn.init.uniform_(self.gate_weight, -bound, bound)
        nn.init.normal_(self.constant)

    def forward(self, x_ND: Tensor, weights_NJ: Tensor) -> Tensor:
        """``sum_j weights[n, j] * (a1_nj * x_n + a2_nj * v_j)``: ``[N, D]`` in ``x``'s dtype.

        Args:
            x_ND: ``[N, D]`` tokens (floating).
            weights_NJ: ``[N, J]`` combine weight of each token's slot to each constant expert
                (zero where it sent none), in the router's dtype.
        """
        # the 2-way gate in float32 (at least), also under autocast, as the router's math:
        # a low-precision softmax would flip the mix as it flips expert choices
        dtype = torch.promote_types(weights_NJ.dtype, torch.float32)
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            mix_NJ2 = torch.einsum("nd,jcd->njc", x_ND.to(dtype), self.gate_weight.to(dtype))
        mix_NJ2 = mix_NJ2.softmax(dim=-1)
        weights_NJ = weights_NJ.to(dtype)
        copy_N1 = (weights_NJ * mix_NJ2[..., 0]).sum(dim=-1, keepdim=True)
        const_ND = (weights_NJ * mix_NJ2[..., 1]) @ self.constant.to(dtype)
        return (copy_N1 * x_ND.to(dtype) + const_ND).to(x_ND.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}"


def _zero_computation_spans(
    num_real: int, counts: Mapping[ZeroComputationKind, int]
) -> dict[str, tuple[int, int]]:
    """kind -> ``[start, end)`` of its expert ids: zero, copy, constant after the real ones."""
    spans: dict[str, tuple[int, int]] = {}
    start = num_real
    for kind in ZERO_COMPUTATION_KINDS:
        spans[kind] = (start, start + counts[kind])
        start += counts[kind]
    return spans


def _check_zero_computation(
    zero_computation_experts: object, num_noop_experts: int
) -> dict[ZeroComputationKind, int]:
    """Counts per kind (every kind present, ``num_noop_experts`` read as ``"zero"``)."""
    counts: dict[ZeroComputationKind, int] = dict.fromkeys(ZERO_COMPUTATION_KINDS, 0)
    counts["zero"] = num_noop_experts
    if zero_computation_experts is None:
        return counts
    if not isinstance(zero_computation_experts, Mapping):
        raise TypeError(
            "zero_computation_experts: expected a dict of kind -> count (kinds "
            f"{', '.join(map(repr, ZERO_COMPUTATION_KINDS))}), got "
            f"{type(zero_computation_experts).__name__}"
        )
    for kind, count in zero_computation_experts.items():
        if kind not in ZERO_COMPUTATION_KINDS:
            raise ValueError(
                f"zero_computation_experts: expected kinds among "
                f"{', '.join(map(repr, ZERO_COMPUTATION_KINDS))}, got {kind!r}"
            )
        counts[kind] = check_int(f"zero_computation_experts[{kind!r}]", count, low=0)
    if num_noop_experts and zero_computation_experts.get("zero"):
        raise ValueError(
            f"num_noop_experts: it is the 'zero' kind; give num_noop_experts={num_noop_experts} "
            f"or zero_computation_experts={{'zero': {zero_computation_experts['zero']}}}, "
            "not both"
        )
    return counts


class MoELayer(AuxLossModule):
    """A sparse Mixture-of-Experts layer: ``x [..., D] -> y [..., D]`` (same shape and dtype).

    The router assigns each token to experts (or experts to tokens), dispatch sorts the slots
    by expert, the experts run on contiguous slices, and each token's slot outputs are summed
    with the router's weights. Like an MLP it returns only the update: add your residual.

    After each forward:

    * ``aux_loss``: 0-dim float32, the router's weighted aux losses, with gradient. Add
      ``pm.aux_loss(model)`` to the training loss to collect it from every layer.
    * ``aux_losses``: the unweighted parts by name, for logging.
    * ``stats``: :class:`~pytorch_mixtures.stats.RoutingStats` (tokens per expert, dropped
      fraction, ...).

    Eval calls of at most ``decode_max_slots`` routed slots (decoding) take the decode path:
    the router's :meth:`~pytorch_mixtures.routing.Router.decide` and a plain loop over the
    chosen experts, no sort plan, no aux losses or statistics. The output equals the full
    path's; ``aux_loss``, ``aux_losses`` and ``stats`` are then computed when first read, from
    the decision the forward kept (its logits and choices: the full path's values).

    Args:
        dim: model dimension D; may be omitted (None) and is then taken from the router.
        router: a :class:`~pytorch_mixtures.routing.Router` (``TopKRouter``,
            ``ExpertChoiceRouter``, ...).
        experts: ``MLPExperts`` / ``SwiGLUExperts`` (stacked weights), or any list of
            ``nn.Module`` mapping ``[n, D] -> [n, D]``.
        capacity_factor: if given, overrides the router's capacity factor (sets
            ``router.capacity_factor``).
        num_experts: optional, checked against the experts and the router.
        causal: set True inside an autoregressive model: warns if the router is not causal
            (expert choice looks at the whole sequence).
        shared_experts: optional always-on module ``[N, D] -> [N, D]`` (DeepSeekMoE, Qwen2-MoE)
            whose output is added to the routed output of every real token (zero on padding).
        shared_expert_gate: scale the shared output by ``sigmoid(x @ w)``, ``w`` ``[D]`` learned
            (Qwen2-MoE's ``shared_expert_gate``, ``nn.Linear(D, 1, bias=False)``).
        check_finite: raise ``FloatingPointError``, naming the layer, when the input or the
            output holds NaN or inf (costs a host sync per forward). Without it, non-finite
            input tokens are counted in ``stats.nonfinite_tokens`` and the forward goes on.
        num_noop_experts: n extra "no-op" experts (integrated MoDE, Raposo et al. 2024 §3.6):
            the router scores ``len(experts) + n`` experts, the last n of which do nothing, so a
            slot routed to one skips compute and adds zero (the caller's residual carries the
            token). ``stats.tokens_per_expert`` then has ``E + n`` entries, no-ops last.
        decode_max_slots: eval calls of at most this many slots (tokens * top_k) take the
            decode path (default :data:`pytorch_mixtures.backends.DECODE_MAX_SLOTS`, measured);
            0 turns it off.
        zero_computation_experts: MoE++'s zero-computation experts (Jin et al. 2024, arXiv
            2410.07348; AdaMoE's null experts are the ``"zero"`` kind), as a dict kind -> count:
            ``"zero"`` (outputs 0: the same as ``num_noop_experts``, give one of the two),
            ``"copy"`` (outputs the token ``x``) and ``"constant"`` (``a1 * x + a2 * v`` with
            ``[a1, a2] = softmax(W_c x)`` and a learned ``v``, per expert:
            :class:`ConstantExperts`, the layer's ``constant_experts``). The router scores
            ``len(experts) + sum(counts)`` experts; ids follow the real experts in the order
            zero, copy, constant. Their slots are weighted by the router like any other, cost
            no expert matmul, and are counted in ``stats.zero_computation_slots`` (and as the
            last entries of ``stats.tokens_per_expert``).
        pad_to_capacity: Megatron-Core's ``moe_pad_expert_input_to_capacity``: in capacity
            mode every real expert receives exactly C rows (``min(C, N)`` for top-k, where an
            expert holds at most one slot per token; ``B * C`` for expert choice), the unused
            ones zero rows whose outputs are discarded, so the experts' input has the static
            shape ``[E * C, D]``. Outputs equal the unpadded path's. The ``bmm`` backend
            already pads each expert to C rows inside its grouped matmul, so with ``bmm`` this
            changes only the dispatched tensor's shape, not the compute; with ``loop`` /
            ``grouped_mm`` the padding rows are real extra work. Needs a capacity (a
            ``capacity_factor``, or an expert-choice router); with an ``attention_mask`` the
            top-k capacity counts real tokens, so C is read on the host (one sync).

    Example::

        router = pm.TopKRouter(512, num_experts=8, top_k=2)
        moe = pm.MoELayer(512, router, pm.SwiGLUExperts(8, 512, 1024))
        y = x + moe(x)
        loss = task_loss + pm.aux_loss(model)
    """

    def __init__(
        self,
        dim: int | None = None,
        router: Router | None = None,
        experts: ExpertsBase | Iterable[nn.Module] | None = None,
        capacity_factor: float | None = None,
        *,
        num_experts: int | None = None,
        causal: bool = False,
        shared_experts: nn.Module | None = None,
        shared_expert_gate: bool = False,
        check_finite: bool = False,
        num_noop_experts: int = 0,
        decode_max_slots: int | None = None,
        zero_computation_experts: Mapping[ZeroComputationKind, int] | None = None,
        pad_to_capacity: bool = False,
    ) -> None:
        super().__init__()
        if router is None or experts is None:
            raise TypeError("MoELayer: both `router` and `experts` are required")
        if not isinstance(router, Router):
            raise TypeError(
                f"router: expected a pytorch_mixtures Router (TopKRouter, ExpertChoiceRouter, "
                f"...), got {type(router).__name__}"
            )
        if dim is None:
            dim = router.dim
        check_int("dim", dim)
        if dim != router.dim:
            raise ValueError(f"dim: the router was built for dim={router.dim}, got dim={dim}")
        expert_module = as_experts(experts, dim)
        _check_same_device(router, expert_module)
        if expert_module.dim != dim:
            raise ValueError(f"experts: built for dim={expert_module.dim}, expected dim={dim}")
        check_int("num_noop_experts", num_noop_experts, low=0)
        if not 0 <= num_noop_experts < router.num_experts:
            raise ValueError(
                f"num_noop_experts: expected an integer in [0, {router.num_experts - 1}] (the "
                f"router's experts minus at least one real one), got {num_noop_experts}"
            )
        zc_counts = _check_zero_computation(zero_computation_experts, num_noop_experts)
        num_zc = sum(zc_counts.values())
        if zero_computation_experts is not None and num_zc >= router.num_experts:
            raise ValueError(
                f"zero_computation_experts: expected fewer than {router.num_experts} in all "
                f"(the router's experts minus at least one real one), got {num_zc} "
                f"({dict(zc_counts)})"
            )
        if expert_module.num_experts + num_zc != router.num_experts:
            of_them = (
                f"{num_noop_experts} of them no-op"
                if zero_computation_experts is None
                else f"{num_zc} of them zero-computation"
            )
            raise ValueError(
                f"experts: the router routes to {router.num_experts} experts "
                f"({of_them}), got {expert_module.num_experts} experts"
            )
        if num_experts is not None and num_experts != expert_module.num_experts:
            raise ValueError(
                f"num_experts: expected {expert_module.num_experts} (the experts' count), "
                f"got {num_experts}"
            )
        if capacity_factor is not None:
            router.capacity_factor = check_capacity_factor(capacity_factor)
        if causal and not router.is_causal:
            warnings.warn(
                f"{type(router).__name__} is not causal: a token's routing depends on later "
                "tokens, so an autoregressive model sees different routing when generating",
                stacklevel=2,
            )
        self.dim = dim
        self.num_experts = expert_module.num_experts
        self.num_noop_experts = zc_counts["zero"]  # the "zero" kind, under its first name
        self.zero_computation_experts: dict[ZeroComputationKind, int] = zc_counts
        self._zc_spans = _zero_computation_spans(expert_module.num_experts, zc_counts)
        self.constant_experts = (
            ConstantExperts(zc_counts["constant"], dim) if zc_counts["constant"] else None
        )
        if self.constant_experts is not None:
            param = next(router.parameters(), None)
            if param is not None:
                self.constant_experts.to(param.device)
        self.pad_to_capacity = check_flag("pad_to_capacity", pad_to_capacity)
        dropless = router.capacity_factor is None
        if pad_to_capacity and dropless and getattr(router, "expert_capacity", None) is None:
            raise ValueError(
                "pad_to_capacity: True needs a per-expert capacity (a capacity_factor on "
                "the router or the layer, or an expert-choice router), got "
                "capacity_factor=None (dropless)"
            )
        self.router = router
        self.experts = expert_module
        self._stats: RoutingStats | None = None
        # the decode path's decision and input, completed into aux losses and stats when read
        self._pending: tuple[Decision, Tensor, Tensor | None] | None = None
        self.decode_max_slots = (
            DECODE_MAX_SLOTS
            if decode_max_slots is None
            else check_int("decode_max_slots", decode_max_slots, low=0)
        )
        if shared_experts is not None and not isinstance(shared_experts, nn.Module):
            raise TypeError(
                f"shared_experts: expected an nn.Module, got {type(shared_experts).__name__}"
            )
        check_flag("causal", causal)
        if check_flag("shared_expert_gate", shared_expert_gate) and shared_experts is None:
            raise ValueError("shared_expert_gate: True needs shared_experts, got None")
        self.shared_experts = shared_experts
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_expert_gate else None
        self.check_finite = check_flag("check_finite", check_finite)
        # qualified name for error messages; set by pytorch_mixtures.checks.name_layers(model)
        self.layer_name: str | None = None

    @property
    def stats(self) -> RoutingStats | None:
        """Routing statistics of the last forward (None before the first)."""
        self._materialize()
        return self._stats

    @property
    def aux_loss(self) -> Tensor:
        self._materialize()
        return super().aux_loss

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        self._materialize()
        return super().aux_losses

    def _materialize(self) -> None:
        """Complete the decode path's decision into the full path's aux losses and stats."""
        if self._pending is None:
            return
        decision, x_BTD, mask_BT = self._pending
        self._pending = None
        route = self.router.complete(decision, (x_BTD.shape[0], x_BTD.shape[1]), mask_BT)
        self._set_aux(route.aux_loss, dict(route.aux_losses))
        plan = dispatch.plan_dispatch(route)
        self._stats = routing_stats_from(
            route, plan, x_BTD.flatten(0, 1), zero_computation=self._stats_spans()
        )

    def _set_num_experts(self, num_experts: int) -> None:
        """After the experts and router were replaced by ones with ``num_experts`` real
        experts (:func:`pytorch_mixtures.pruning.prune_experts`): renumber the
        zero-computation experts and forget the last forward."""
        self.num_experts = check_int("num_experts", num_experts)
        self._zc_spans = _zero_computation_spans(num_experts, self.zero_computation_experts)
        self._stats = None
        self._pending = None

    def _stats_spans(self) -> dict[str, tuple[int, int]] | None:
        """The zero-computation id spans for the stats, None when the layer has none (the
        stats then carry no per-kind counts, as before)."""
        if not any(self.zero_computation_experts.values()):
            return None
        return self._zc_spans

    def _decode_decision(self, x_ND: Tensor) -> Decision | None:
        """The router's decode-path routing when this call takes the decode path, else None."""
        top_k = getattr(self.router, "top_k", None)
        if self.training or top_k is None or self.pad_to_capacity:
            return None
        num_slots = x_ND.shape[0] * top_k
        if torch.compiler.is_compiling():
            if not self.experts.static_chosen_calls or not use_static_decode_path(
                num_slots, self.experts.num_experts, self.decode_max_slots
            ):
                return None
        elif not self.experts.single_expert_calls or not use_decode_path(
            num_slots, x_ND.device, self.decode_max_slots
        ):
            return None
        if self.experts._forward_hooks or self.experts._forward_pre_hooks:
            return None  # hooks (pruning, ...) run only through the experts' __call__
        return self.router.decide(x_ND)

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, token_ids: Tensor | None = None
    ) -> Tensor:
        """Apply the layer.

        Args:
            x: ``[..., D]`` floating tensor (``[B, T, D]``, ``[N, D]``, ...). Leading
                dimensions other than the last two are flattened into the batch.
            attention_mask: optional mask of shape ``x.shape[:-1]`` (1 = token, 0 = padding).
                Padding tokens are not routed (output zero) and are excluded from aux losses.
            token_ids: optional integer tensor of shape ``x.shape[:-1]``, for routers that
                route on token ids (``HashRouter``, which requires it); others ignore it.

        Returns:
            ``[..., D]`` tensor of ``x``'s dtype: the sum of each token's weighted expert
            outputs (zero for tokens whose slots were all dropped).
        """
        check_features(x, self.dim, None, f"[..., {self.dim}]")
        mask = check_mask(attention_mask, x, (tuple(x.shape[:-1]),))
        check_input_matches(x, self.experts)
        if self.check_finite:
            raise_if_nonfinite(self, "input x", x, mask)
        if x.numel() == 0:
            return self._empty_forward(x)

        seq_len = x.shape[-2] if x.dim() >= 2 else 1
        x_BTD = x.reshape(-1, seq_len, self.dim)
        mask_BT = None if mask is None else mask.reshape(x_BTD.shape[:2])
        x_ND = x_BTD.reshape(-1, self.dim)
        decision = None if self.router.uses_token_ids else self._decode_decision(x_ND)
        if decision is not None:
            y_ND = dispatch.run_chosen_experts(
                self.experts, x_ND, decision.expert_ids, decision.weights
            )
            extra_ND = self._zero_computation_output(
                x_ND, decision.expert_ids.reshape(-1), decision.weights.reshape(-1), None,
                decision.expert_ids.shape[1],
            )  # fmt: skip
            if extra_ND is not None:
                y_ND = y_ND + extra_ND.to(y_ND.dtype)
            if mask_BT is not None:
                y_ND = torch.where(mask_BT.reshape(-1, 1), y_ND, 0.0)
            # plain attributes set through __dict__: nn.Module.__setattr__'s bookkeeping costs
            # microseconds per call, a visible share of a decode step
            self.__dict__.update(
                _aux_loss=None, _aux_losses={}, _pending=(decision, x_BTD, mask_BT)
            )
        else:
            if self.router.uses_token_ids:
                if isinstance(token_ids, Tensor) and token_ids.shape == x.shape[:-1]:
                    token_ids = token_ids.reshape(x_BTD.shape[:2])  # as x was flattened
                else:  # the router names what is wrong against x's own leading shape
                    check_token_ids(token_ids, tuple(x.shape[:-1]))
                route = self.router(x_BTD, mask_BT, token_ids=token_ids)
            else:
                route = self.router(x_BTD, mask_BT)
            if self.pad_to_capacity:
                y_ND, plan = self._run_padded(x_ND, route)
            else:
                y_ND, plan = dispatch.run_experts(self.experts, x_ND, route)
            # kept slots only: dropped and padding slots add nothing, as for real experts
            extra_ND = self._zero_computation_output(
                x_ND, route.expert_ids, torch.where(route.kept, route.weights, 0.0),
                route.token_ids, route.slots_per_token,
            )  # fmt: skip
            if extra_ND is not None:
                y_ND = y_ND + extra_ND.to(y_ND.dtype)
            self._set_aux(route.aux_loss, dict(route.aux_losses))
            self._stats = routing_stats_from(
                route, plan, x_ND, zero_computation=self._stats_spans()
            )
            self._pending = None
        if self.shared_experts is not None:
            y_ND = y_ND + self._shared_forward(x_ND, mask_BT)
        y = y_ND.reshape(x.shape).to(x.dtype)
        if self.check_finite:
            raise_if_nonfinite(self, "output", y, mask)
        return y

    def _slot_weights(
        self,
        expert_ids_S: Tensor,
        weights_S: Tensor,
        token_ids_S: Tensor | None,
        top_k: int | None,
        num_tokens: int,
        span: tuple[int, int],
    ) -> Tensor:
        """``[N, J]``: each token's summed slot weight to each expert of ``span`` (J ids)."""
        start, end = span
        if top_k is not None:  # token-major slots: a sum over a [N, K, J] view, no atomics
            ids_NK1 = expert_ids_S.view(num_tokens, top_k, 1)
            targets_J = torch.arange(start, end, device=expert_ids_S.device)
            hit_NKJ = ids_NK1 == targets_J
            weights_NK1 = weights_S.view(num_tokens, top_k, 1)
            return torch.where(hit_NKJ, weights_NK1, 0.0).sum(dim=1)
        assert token_ids_S is not None
        count = end - start
        inside_S = (expert_ids_S >= start) & (expert_ids_S < end)
        rows_S = torch.where(inside_S, token_ids_S * count + (expert_ids_S - start), 0)
        out = weights_S.new_zeros(num_tokens * count)
        out.index_add_(0, rows_S, torch.where(inside_S, weights_S, 0.0))
        return out.view(num_tokens, count)

    def _zero_computation_output(
        self,
        x_ND: Tensor,
        expert_ids_S: Tensor,
        weights_S: Tensor,
        token_ids_S: Tensor | None,
        top_k: int | None,
    ) -> Tensor | None:
        """The copy and constant experts' weighted outputs ``[N, D]`` (None when the layer has
        neither; zero experts add nothing by definition).

        ``expert_ids_S`` / ``weights_S`` ``[S]`` are the slots (weights zero for slots not
        kept); ``token_ids_S`` ``[S]`` their tokens, or None for token-major slots (``top_k``
        per token, slot ``n*K + k``).
        """
        copies, constants = self.zero_computation_experts["copy"], self.constant_experts
        if not copies and constants is None:
            return None
        num_tokens = x_ND.shape[0]
        out_ND: Tensor | None = None
        if copies:
            copy_NJ = self._slot_weights(
                expert_ids_S, weights_S, token_ids_S, top_k, num_tokens, self._zc_spans["copy"]
            )
            out_ND = copy_NJ.sum(dim=-1, keepdim=True).to(x_ND.dtype) * x_ND
        if constants is not None:
            const_NJ = self._slot_weights(
                expert_ids_S, weights_S, token_ids_S, top_k, num_tokens,
                self._zc_spans["constant"],
            )  # fmt: skip
            const_ND = constants(x_ND, const_NJ)
            out_ND = const_ND if out_ND is None else out_ND + const_ND
        return out_ND

    def _run_padded(
        self, x_ND: Tensor, route: RouterOutput
    ) -> tuple[Tensor, dispatch.DispatchPlan]:
        """Dispatch with every real expert receiving exactly C rows (``pad_to_capacity``).

        The usual plan is built first (the statistics and the combine use it, so outputs are
        the unpadded path's); its kept rows of real experts are then scattered into a padded
        ``[E * C, D]`` block (expert e's rows at ``e*C .. e*C + count_e``, the rest zero
        rows), the experts run on the block with every count C, and their outputs are
        gathered back into the plan's row order for the one combine.
        """
        if route.capacity is None:
            raise ValueError(
                "pad_to_capacity: True needs a per-expert capacity, got a dropless routing "
                f"(the router's capacity_factor is {self.router.capacity_factor})"
            )
        experts = self.experts
        plan = dispatch.plan_dispatch(route)
        real = experts.num_experts
        rows = dispatch.max_rows_per_expert(route)
        if rows is None:  # a capacity counted over real tokens: only known on the device
            rows = min(int(route.capacity), route.num_tokens)
        rows = max(rows, 1)  # a zero-row block would leave the experts nothing to shape
        num_rows = real * rows
        # the expert of each sorted row (routed experts, then the zero-computation and
        # dropped rows, which the padded block leaves out)
        key_S = torch.where(route.kept, route.expert_ids, route.num_experts)[plan.order]
        real_S = key_S < real
        counts_E = plan.tokens_per_expert[:real]
        starts_E = torch.cumsum(counts_E, dim=0) - counts_E
        expert_S = key_S.clamp(max=real - 1)
        rank_S = torch.arange(key_S.numel(), device=key_S.device) - starts_E[expert_S]
        # row num_rows is a sentinel that collects the rows left out, then is cut off
        dest_S = torch.where(real_S, expert_S * rows + rank_S, num_rows)
        token_rows_P = plan.token_rows.new_zeros(num_rows + 1).scatter_(0, dest_S, plan.token_rows)
        valid_P = real_S.new_zeros(num_rows + 1).scatter_(0, dest_S, real_S)[:num_rows]
        weights_P = plan.weights.new_zeros(num_rows + 1).scatter_(0, dest_S, plan.weights)
        x_PD = x_ND.index_select(0, token_rows_P[:num_rows])
        x_PD = torch.where(valid_P.unsqueeze(-1), x_PD, 0.0)
        full_E = torch.full_like(counts_E, rows)
        if type(experts).forward is not ExpertsBase.forward:  # the 0.2 interface
            y_PD = experts(x_PD, full_E, max_rows_per_expert=rows)
        else:
            padded = dispatch.DispatchPlan(
                order=torch.arange(num_rows, device=x_ND.device),
                tokens_per_expert=full_E,
                token_rows=token_rows_P[:num_rows],
                weights=weights_P[:num_rows],
                num_tokens=route.num_tokens,
                slots_per_token=None,
                max_rows_per_expert=rows,
                backend=experts.resolve_backend(x_PD, rows),
                fuse_combine=False,  # the padding rows must be dropped before the combine
            )
            y_PD = experts(x_PD, full_E, plan=padded)
        # padding rows contribute nothing: their outputs are discarded, not merely weighted 0
        y_PD = torch.where(valid_P.unsqueeze(-1), y_PD, 0.0)
        y_sorted_SD = torch.cat([y_PD, y_PD.new_zeros(1, y_PD.shape[-1])]).index_select(0, dest_S)
        return dispatch.combine(y_sorted_SD, plan), plan

    def _shared_forward(self, x_ND: Tensor, mask_BT: Tensor | None) -> Tensor:
        assert self.shared_experts is not None
        mapping = f"[N, {self.dim}] -> [N, {self.dim}] of this layer's dtype"
        shared_ND = call_user_module("shared_experts", self.shared_experts, mapping, x_ND)
        if not isinstance(shared_ND, Tensor) or shared_ND.shape != x_ND.shape:
            got = tuple(shared_ND.shape) if isinstance(shared_ND, Tensor) else type(shared_ND)
            raise ValueError(
                f"shared_experts: expected an output of shape {tuple(x_ND.shape)}, got {got}"
            )
        if self.shared_expert_gate is not None:
            shared_ND = torch.sigmoid(self.shared_expert_gate(x_ND)) * shared_ND
        if mask_BT is not None:
            shared_ND = torch.where(mask_BT.reshape(-1, 1).bool(), shared_ND, 0.0)
        return shared_ND

    def __getstate__(self) -> dict[str, object]:
        state = dict(super().__getstate__())
        state["_pending"] = None  # a copy starts with no last forward, as a fresh layer does
        return state

    def _empty_forward(self, x: Tensor) -> Tensor:
        self._pending = None
        zero = torch.zeros((), device=x.device)
        num_routes = self.num_experts + sum(self.zero_computation_experts.values())
        empty = torch.zeros(num_routes, dtype=torch.long, device=x.device)
        self._set_aux(zero, {})
        spans = self._stats_spans() or {}
        self._stats = RoutingStats(
            empty, zero.long(), zero.long(), zero.long(), zero.long(),
            zero_computation_slots={kind: zero.long() for kind in spans},
        )  # fmt: skip
        # keep the graph connected so backward on an empty batch still works
        return x * 0

    def extra_repr(self) -> str:
        extra = ""
        zc = {kind: n for kind, n in self.zero_computation_experts.items() if n}
        if zc:
            extra += f", zero_computation_experts={zc}"
        if self.pad_to_capacity:
            extra += ", pad_to_capacity=True"
        return f"dim={self.dim}, num_experts={self.num_experts}{extra}"


def _check_same_device(router: Router, experts: nn.Module) -> None:
    router_param = next(router.parameters(), None)
    expert_param = next(experts.parameters(), None)
    if router_param is None or expert_param is None:
        return
    if router_param.device != expert_param.device:
        raise ValueError(
            f"experts: expected parameters on {router_param.device} (the router's device), "
            f"got parameters on {expert_param.device}"
        )
