"""One-shot expert pruning of MoE layers: REAP or selection frequency.

REAP (Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE
Compression", arXiv 2510.13999) scores expert j on calibration tokens by its router-weighted
mean activation norm,

    S_j = 1/|X_j| * sum_{x in X_j} g_j(x) * ||f_j(x)||_2,

where X_j are the tokens routed to j (kept slots), g_j(x) the slot's combine weight and f_j(x)
the expert's output; the lowest-scoring experts are removed. ``criterion="frequency"`` scores
an expert by how many kept slots it received instead (the classic frequency baseline).

:func:`prune_experts` replaces each :class:`~pytorch_mixtures.MoELayer`'s experts and router by
ones holding only the kept experts: the router's gate rows (and noise-gate rows and DeepSeek
expert-bias entries) are selected and renumbered, the zero-computation experts' rows stay
after the kept ones. Routing over the remaining experts is unchanged for every token whose
choices were all kept (the removed rows only leave the scores of other experts; with softmax
scores and ``normalize_weights=False`` the remaining probabilities are renormalised over fewer
experts, so such tokens' weights grow by the removed experts' share).

Shape legend: N tokens, D model dim, E real experts, S routed slots.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from . import dispatch
from .checks import check_mask
from .experts import ExpertsBase, MLPExperts, ModuleListExperts, SwiGLUExperts
from .moe_layer import MoELayer
from .routing import TopKRouter
from .routing.capacity import ceil_scaled

__all__ = ["Criterion", "LayerPruning", "PruningReport", "expert_scores", "prune_experts"]

Criterion = Literal["reap", "frequency"]
_CRITERIA: tuple[Criterion, ...] = ("reap", "frequency")


@dataclass(frozen=True)
class LayerPruning:
    """What :func:`prune_experts` did to one layer.

    Attributes:
        kept: the original ids of the kept experts, increasing (new expert i is old
            ``kept[i]``).
        scores: ``[E]`` float64, the criterion's score of every original expert (REAP: the
            router-weighted mean output norm, 0 for an expert never selected; frequency: kept
            slots received).
        slots: ``[E]`` int64, kept calibration slots each original expert received.
        parameters_before: parameters of the layer's experts and router before pruning.
        parameters_after: the same after pruning.
    """

    kept: tuple[int, ...]
    scores: Tensor
    slots: Tensor
    parameters_before: int
    parameters_after: int

    @property
    def parameters_saved(self) -> int:
        return self.parameters_before - self.parameters_after


@dataclass(frozen=True)
class PruningReport:
    """The result of :func:`prune_experts`: per-layer details by module name and the total
    parameters saved."""

    criterion: Criterion
    layers: Mapping[str, LayerPruning] = field(default_factory=dict)

    @property
    def parameters_saved(self) -> int:
        """Parameters removed from the model, all layers together."""
        return sum(layer.parameters_saved for layer in self.layers.values())


def _check_criterion(criterion: object) -> Criterion:
    if not isinstance(criterion, str) or criterion not in _CRITERIA:
        raise ValueError(
            f"criterion: expected one of {', '.join(map(repr, _CRITERIA))}, got {criterion!r}"
        )
    return criterion  # narrowed to the literal by the membership test


def _moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = {
        name or "<root>": module
        for name, module in model.named_modules()
        if isinstance(module, MoELayer)
    }
    if not layers:
        raise ValueError("model: expected a module containing MoELayer layers, got none")
    return layers


def _run_batch(model: nn.Module, batch: object) -> None:
    """One calibration forward: a tensor is ``model(batch)``, a tuple or list
    ``model(*batch)``, a dict ``model(**batch)``."""
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        raise TypeError(
            "batches: expected each batch to be a Tensor, a tuple/list of positional "
            f"arguments or a dict of keyword arguments, got {type(batch).__name__}"
        )


@torch.no_grad()
def _accumulate(
    layer: MoELayer,
    criterion: Criterion,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    sums_E: Tensor,
    slots_E: Tensor,
) -> None:
    """Add one layer call's kept slots (and REAP's weighted norms) to the running totals.

    The layer's own routing and experts are re-run on the call's input (the same eval-mode
    decisions its forward takes): ``f_j(x)`` is the experts' unweighted output per slot.
    """
    x = args[0] if args else kwargs.get("x")
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    token_ids = args[2] if len(args) > 2 else kwargs.get("token_ids")
    if not isinstance(x, Tensor) or x.numel() == 0:
        return  # the layer's forward reports a bad input itself; an empty one adds nothing
    mask_t = check_mask(mask, x, (tuple(x.shape[:-1]),))
    seq_len = x.shape[-2] if x.dim() >= 2 else 1
    x_BTD = x.reshape(-1, seq_len, layer.dim)
    mask_BT = None if mask_t is None else mask_t.reshape(x_BTD.shape[:2])
    if layer.router.uses_token_ids:
        assert isinstance(token_ids, Tensor)
        route = layer.router(x_BTD, mask_BT, token_ids=token_ids.reshape(x_BTD.shape[:2]))
    else:
        route = layer.router(x_BTD, mask_BT)
    plan = dispatch.plan_dispatch(route)
    real = layer.num_experts
    counts_E = plan.tokens_per_expert[:real]
    slots_E += counts_E.to(slots_E.device)
    if criterion != "reap":
        return
    x_ND = x_BTD.reshape(-1, layer.dim)
    y_SD = layer.experts(
        dispatch.permute(x_ND, plan),
        counts_E,
        max_rows_per_expert=dispatch.max_rows_per_expert(route),
    )
    # sorted rows: kept slots of real experts first, grouped by expert; the rest are padding
    key_S = torch.where(route.kept, route.expert_ids, route.num_experts)[plan.order]
    real_S = key_S < real
    norms_S = y_SD.double().norm(dim=-1)
    weighted_S = torch.where(real_S, plan.weights.double() * norms_S, 0.0)
    sums_E.index_add_(0, key_S.clamp(max=real - 1).to(sums_E.device), weighted_S.to(sums_E))


def expert_scores(
    model: nn.Module, batches: Iterable[object], criterion: Criterion = "reap"
) -> dict[str, tuple[Tensor, Tensor]]:
    """Score every real expert of every MoE layer of ``model`` on calibration ``batches``.

    The model runs in eval mode without gradients (its training flags are restored after);
    each :class:`~pytorch_mixtures.MoELayer` call is scored as it happens.

    Args:
        model: a module containing ``MoELayer`` layers (or one itself).
        batches: an iterable of calibration batches: each a Tensor (``model(batch)``), a
            tuple/list (``model(*batch)``) or a dict (``model(**batch)``).
        criterion: ``"reap"`` (router-weighted mean output norm, Lasby et al. 2025) or
            ``"frequency"`` (kept slots received).

    Returns:
        Layer name -> (``scores`` ``[E]`` float64, ``slots`` ``[E]`` int64 kept slots).
    """
    criterion = _check_criterion(criterion)
    layers = _moe_layers(model)
    if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
        raise TypeError(
            "batches: expected an iterable of calibration batches (e.g. a list of tensors), "
            f"got {type(batches).__name__}"
            + (" (wrap it in a list)" if isinstance(batches, Tensor) else "")
        )
    totals: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in layers.items():
        device = layer.router.gate.weight.device if layer.router.has_gate else torch.device("cpu")
        totals[name] = (
            torch.zeros(layer.num_experts, dtype=torch.float64, device=device),
            torch.zeros(layer.num_experts, dtype=torch.long, device=device),
        )
    handles = []
    for name, layer in layers.items():
        sums_E, slots_E = totals[name]

        def hook(
            module: nn.Module,
            args: tuple[object, ...],
            kwargs: dict[str, object],
            layer: MoELayer = layer,
            sums_E: Tensor = sums_E,
            slots_E: Tensor = slots_E,
        ) -> None:
            _accumulate(layer, criterion, args, kwargs, sums_E, slots_E)

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    modes = {module: module.training for module in model.modules()}
    count = 0
    try:
        model.eval()  # no jitter or gating noise: the routing the pruned model will see
        with torch.no_grad():
            for batch in batches:
                _run_batch(model, batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    if count == 0:
        raise ValueError("batches: expected at least one calibration batch, got none")
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, (sums_E, slots_E) in totals.items():
        if int(slots_E.sum()) == 0:
            raise ValueError(
                f"batches: expected calibration tokens routed through every MoE layer, got "
                f"none through {name!r} (did the batches reach it?)"
            )
        if criterion == "reap":
            scores_E = sums_E / slots_E.clamp_min(1).double()  # never selected: score 0
        else:
            scores_E = slots_E.double()
        out[name] = (scores_E, slots_E)
    return out


def _keep_count(keep: object, name: str, layer: MoELayer) -> int:
    """``keep`` as a count of real experts for ``layer``, checked."""
    total = layer.num_experts
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(
            f"keep: expected an int count of experts or a float fraction in (0, 1], got "
            f"{type(keep).__name__}"
        )
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ValueError(f"keep: expected a fraction in (0, 1] as a float, got {keep}")
        count = max(1, ceil_scaled(keep, total))
    else:
        count = keep
    if not 1 <= count <= total:
        raise ValueError(
            f"keep: expected a count in [1, {total}] (the experts of layer {name!r}), got {keep}"
        )
    router = layer.router
    top_k = getattr(router, "top_k", 1)
    num_zc = router.num_experts - total
    if count + num_zc < top_k:
        raise ValueError(
            f"keep: expected at least {top_k - num_zc} experts in layer {name!r} (its router "
            f"picks top_k={top_k} of the kept and {num_zc} zero-computation experts), got "
            f"{count}"
        )
    return count


def _check_prunable(name: str, layer: MoELayer) -> None:
    router, experts = layer.router, layer.experts
    if type(router) is not TopKRouter:
        raise TypeError(
            f"model: pruning supports layers routed by TopKRouter, got {type(router).__name__} "
            f"in layer {name!r}"
        )
    if router.schemes.group_limited:
        raise ValueError(
            f"model: layer {name!r} uses group-limited routing (num_groups="
            f"{router.num_groups}, topk_groups={router.topk_groups}); pruning would break its "
            "groups: expected num_groups=1"
        )
    if not isinstance(experts, (MLPExperts, SwiGLUExperts, ModuleListExperts)):
        raise TypeError(
            "model: pruning supports MLPExperts, SwiGLUExperts and lists of modules, got "
            f"{type(experts).__name__} in layer {name!r}"
        )
    if not isinstance(experts, ModuleListExperts):
        for param_name, param in experts.named_parameters(recurse=False):
            if param.dim() == 0 or param.shape[0] != experts.num_experts:
                raise TypeError(
                    f"model: expected stacked per-expert parameters in layer {name!r}, got "
                    f"{param_name} of shape {tuple(param.shape)}"
                )


def _pruned_experts(experts: ExpertsBase, kept: list[int]) -> ExpertsBase:
    """A copy of ``experts`` holding only the ``kept`` experts, in that order."""
    if isinstance(experts, ModuleListExperts):
        # the kept modules move over as they are (the old container is being replaced)
        return ModuleListExperts([experts.experts[i] for i in kept], experts.dim)
    device = next(experts.parameters()).device
    index = torch.tensor(kept, device=device)
    # deepcopy with the stacked weights pre-mapped to their kept rows: nothing is copied whole
    memo: dict[int, object] = {}
    for param in experts.parameters(recurse=False):
        memo[id(param)] = nn.Parameter(
            param.detach().index_select(0, index).clone(), requires_grad=param.requires_grad
        )
    new = copy.deepcopy(experts, memo)
    new.num_experts = len(kept)
    return new


def _pruned_router(router: TopKRouter, rows: list[int]) -> TopKRouter:
    """A copy of ``router`` over the experts ``rows`` (old ids, in their new order)."""
    index = torch.tensor(rows, device=router.gate.weight.device)

    def select(param: Tensor) -> nn.Parameter:
        return nn.Parameter(
            param.detach().index_select(0, index).clone(), requires_grad=param.requires_grad
        )

    memo: dict[int, object] = {id(router.gate.weight): select(router.gate.weight)}
    if router.noise_gate is not None:
        memo[id(router.noise_gate.weight)] = select(router.noise_gate.weight)
    if router.expert_bias is not None:
        memo[id(router.expert_bias)] = router.expert_bias.index_select(0, index).clone()
    pending = router._load_counts
    router._load_counts = None  # not deep-copied: remapped below
    try:
        new = copy.deepcopy(router, memo)
    finally:
        router._load_counts = pending
    new.num_experts = len(rows)
    new.gate.out_features = len(rows)
    if new.noise_gate is not None:
        new.noise_gate.out_features = len(rows)
    if pending is not None:  # the loads counted since the last bias update, renumbered
        new._load_counts = pending.index_select(0, index.to(pending.device)).clone()
    return new


def _parameter_count(*modules: nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def prune_experts(
    model: nn.Module,
    keep: int | float,
    batches: Iterable[object],
    criterion: Criterion = "reap",
) -> PruningReport:
    """Prune every MoE layer of ``model`` to its ``keep`` best experts, in place.

    REAP (Lasby et al. 2025, arXiv 2510.13999): experts are ranked on the calibration
    ``batches`` by router-weighted mean activation norm (see the module docstring), or by
    selection frequency; each :class:`~pytorch_mixtures.MoELayer` then gets new experts (the
    kept ones, in their original order) and a new router whose gate rows, noise-gate rows and
    expert-bias entries are those of the kept experts, renumbered; zero-computation experts
    (``num_noop_experts``, ``zero_computation_experts``) stay, after the kept ones. Ties rank
    the lower expert id first. Optimizers built before pruning hold the old parameters:
    build a new one.

    Tokens whose chosen experts are all kept make the same choices as before, with the same
    weights (for sigmoid scores, or softmax scores with ``normalize_weights=True``), so
    pruning experts that were never selected leaves the outputs unchanged, up to the last
    bit: the gate matmul over fewer rows is another BLAS shape and may round a logit's last
    bit differently.

    Args:
        model: a module containing ``MoELayer`` layers routed by ``TopKRouter`` (or one
            layer), with ``MLPExperts``, ``SwiGLUExperts`` or a list of modules as experts.
        keep: experts to keep per layer: an int in ``[1, E]``, or a float fraction in
            ``(0, 1]`` (``ceil(keep * E)`` experts); enough for each router's ``top_k``.
        batches: calibration batches, as for :func:`expert_scores`.
        criterion: ``"reap"`` or ``"frequency"``.

    Returns:
        A :class:`PruningReport`: per layer the kept ids, the scores, the slots seen and the
        parameter counts; ``report.parameters_saved`` in total.
    """
    criterion = _check_criterion(criterion)
    layers = _moe_layers(model)
    counts: dict[str, int] = {}
    for name, layer in layers.items():  # every check before anything runs or changes
        _check_prunable(name, layer)
        counts[name] = _keep_count(keep, name, layer)
    scores = expert_scores(model, batches, criterion)
    report: dict[str, LayerPruning] = {}
    for name, layer in layers.items():
        scores_E, slots_E = scores[name]
        # stable: ties keep the lower id; the kept experts keep their relative order
        ranking = torch.argsort(scores_E.cpu(), descending=True, stable=True)
        kept = sorted(ranking[: counts[name]].tolist())
        router = layer.router
        assert isinstance(router, TopKRouter)
        before = _parameter_count(layer.experts, router)
        real = layer.num_experts
        rows = kept + list(range(real, router.num_experts))
        layer.router = _pruned_router(router, rows)
        layer.experts = _pruned_experts(layer.experts, kept)
        layer._set_num_experts(len(kept))
        after = _parameter_count(layer.experts, layer.router)
        report[name] = LayerPruning(tuple(kept), scores_E.cpu(), slots_E.cpu(), before, after)
    return PruningReport(criterion, report)
