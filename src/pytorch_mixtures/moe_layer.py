"""MoELayer: router -> dispatch -> experts -> combine, as a drop-in for an MLP.

Shape legend: B batch, T sequence, N = B*T tokens, D model dim, E experts, S routed slots.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

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
from .routing import Decision, Router
from .stats import RoutingStats, routing_stats_from

__all__ = ["MoELayer"]


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
        if expert_module.num_experts + num_noop_experts != router.num_experts:
            raise ValueError(
                f"experts: the router routes to {router.num_experts} experts "
                f"({num_noop_experts} of them no-op), got {expert_module.num_experts} experts"
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
        self.num_noop_experts = num_noop_experts
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
        self._stats = routing_stats_from(route, dispatch.plan_dispatch(route), x_BTD.flatten(0, 1))

    def _decode_decision(self, x_ND: Tensor) -> Decision | None:
        """The router's decode-path routing when this call takes the decode path, else None."""
        top_k = getattr(self.router, "top_k", None)
        if self.training or top_k is None:
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
            y_ND, plan = dispatch.run_experts(self.experts, x_ND, route)
            self._set_aux(route.aux_loss, dict(route.aux_losses))
            self._stats = routing_stats_from(route, plan, x_ND)
            self._pending = None
        if self.shared_experts is not None:
            y_ND = y_ND + self._shared_forward(x_ND, mask_BT)
        y = y_ND.reshape(x.shape).to(x.dtype)
        if self.check_finite:
            raise_if_nonfinite(self, "output", y, mask)
        return y

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
        num_routes = self.num_experts + self.num_noop_experts
        empty = torch.zeros(num_routes, dtype=torch.long, device=x.device)
        self._set_aux(zero, {})
        self._stats = RoutingStats(empty, zero.long(), zero.long(), zero.long(), zero.long())
        # keep the graph connected so backward on an empty batch still works
        return x * 0

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}"


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
