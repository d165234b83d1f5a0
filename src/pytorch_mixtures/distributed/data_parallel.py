"""Data parallelism over an expert-parallel model's replicated parameters, and global numbers.

:func:`ddp` (DDP) and :func:`fully_shard` (FSDP2) exclude the expert parameters from the
data-parallel reduction and scale expert gradients by ``1 / W``, so that every gradient is that
of the mean loss over ranks. :func:`clip_grad_norm_` clips by the norm over every rank's experts;
:func:`global_routing_stats` all-reduces a layer's routing statistics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..moe_layer import MoELayer
from ..stats import RoutingStats
from .expert_parallel import _ep_modules, _require_initialized, _unwrap, expert_parameters

__all__ = ["clip_grad_norm_", "ddp", "fully_shard", "global_routing_stats"]


def _prepare_data_parallel(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Check the groups and make expert gradients those of the mean loss over ranks."""
    _require_initialized("data parallel")
    dp_ranks = _group_ranks(group)
    for name, module in _ep_modules(model):
        if _group_ranks(module.group) != dp_ranks:
            raise ValueError(
                f"{name}: the expert-parallel group (ranks {_group_ranks(module.group)}) must be "
                f"the data-parallel group (ranks {dp_ranks}); hybrid expert x data parallel "
                "(experts replicated over a second group) is not supported yet"
            )
        # the all-to-all backward already sums each expert's gradient over the W ranks' tokens;
        # dividing by W gives the gradient of the mean loss, as DDP/FSDP average the rest
        module.grad_scale = 1.0 / len(dp_ranks)
        module._install_grad_scale()


def _group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    if group is None:
        return list(range(dist.get_world_size()))
    return sorted(dist.get_process_group_ranks(group))


def ddp(
    model: nn.Module, *, process_group: dist.ProcessGroup | None = None, **ddp_kwargs: Any
) -> nn.parallel.DistributedDataParallel:
    """Wrap an expert-parallel model in DDP over its non-expert parameters.

    Expert parameters are excluded from DDP's all-reduce (each rank owns different experts;
    averaging them would mix unrelated weights) and their gradients are scaled by ``1 / W``,
    so that after ``backward`` every gradient equals the single-process gradient of the mean
    of the ranks' losses.

    Args:
        model: a model already passed through :func:`expert_parallel`.
        process_group: data-parallel group; must equal the expert-parallel group (default:
            the world).
        **ddp_kwargs: forwarded to ``DistributedDataParallel`` (``device_ids``, ...).

    Returns:
        The DDP-wrapped model (``.module`` is ``model``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _prepare_data_parallel(model, process_group)
    expert_ids = {id(p) for p in expert_parameters(model)}
    ignored = [name for name, p in model.named_parameters() if id(p) in expert_ids]
    # DDP's documented hook for this (used by torchrec and others): skip these in all-reduce
    ignore: Any = nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model
    ignore(model, ignored)
    return nn.parallel.DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)


def fully_shard(
    model: nn.Module,
    *,
    modules: list[nn.Module] | None = None,
    mesh: Any = None,
    **fsdp_kwargs: Any,
) -> nn.Module:
    """Apply FSDP2 (``torch.distributed.fsdp.fully_shard``) to the non-expert parameters.

    Each module in ``modules`` (e.g. transformer blocks), then ``model`` itself, is sharded with
    the expert parameters passed as ``ignored_params``: they stay local to their owner rank and
    get the ``1 / W`` gradient scale (see :func:`ddp`).

    Args:
        model: a model already passed through :func:`expert_parallel`.
        modules: submodules to shard as their own FSDP units (default: none, only the root).
        mesh: a 1-D ``DeviceMesh`` over the expert-parallel ranks (default: the world on the
            parameters' device type).
        **fsdp_kwargs: forwarded to ``fully_shard`` (``reshard_after_forward``, ``mp_policy``...).

    Returns:
        ``model`` (now an ``FSDPModule``).
    """
    from torch.distributed.fsdp import fully_shard as _fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    group = None if mesh is None else mesh.get_group()
    _prepare_data_parallel(model, group)
    ignored = set(expert_parameters(model))
    for module in modules or []:
        _fully_shard(module, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    _fully_shard(model, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    return model


def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """Clip gradients by the norm over *all* parameters of the sharded model (collective).

    ``torch.nn.utils.clip_grad_norm_`` on one rank sees only that rank's experts, so ranks
    would compute different norms and scale their replicated parameters differently (the
    replicas drift apart). Here expert gradients' squares are summed over the expert-parallel
    group, FSDP2 (``DTensor``) gradients over their mesh, and replicated gradients counted
    once: the result equals the unsharded model's total norm.

    Args:
        model: an expert-parallel model (plain, :func:`ddp` or :func:`fully_shard`).
        max_norm: clip threshold (> 0).

    Returns:
        0-dim float32 tensor: the total gradient norm before clipping, identical on every rank.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"max_norm: expected a finite number > 0, got {max_norm!r}")
    if not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm: expected a finite number > 0, got {max_norm!r}")
    model = _unwrap(model)
    expert_ids = {id(p) for p in expert_parameters(model)}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    replicated_sq = torch.zeros((), device=device)
    for param in model.parameters():
        grad = param.grad
        if grad is None or id(param) in expert_ids:
            continue
        if isinstance(grad, DTensor):
            replicated_sq = replicated_sq + torch.linalg.vector_norm(grad).full_tensor().square()
        else:
            replicated_sq = replicated_sq + grad.float().square().sum()
    for _, module in _ep_modules(model):
        expert_sq = torch.zeros((), device=device)
        for param in module.local.parameters():
            if param.grad is not None:
                expert_sq = expert_sq + param.grad.float().square().sum()
        dist.all_reduce(expert_sq, group=module.group)
        replicated_sq = replicated_sq + expert_sq
    total = replicated_sq.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))
    return total


def global_routing_stats(
    stats: RoutingStats | MoELayer, group: dist.ProcessGroup | None = None
) -> RoutingStats:
    """All-reduce (sum) a layer's routing statistics over ``group``: loads of the global batch.

    ``layer.stats`` describes this rank's tokens only; the sum over ranks gives the global
    tokens per expert, dropped slots and unrouted tokens (and so the global fractions);
    router entropy and top-1 confidence become token-weighted means over the ranks.

    Args:
        stats: a ``RoutingStats`` or a ``MoELayer`` (its last ``stats``).
        group: process group (default: the world).
    """
    if isinstance(stats, MoELayer):
        if stats.stats is None:
            raise ValueError("stats: the layer has not run forward yet")
        stats = stats.stats
    if not isinstance(stats, RoutingStats):
        raise TypeError(f"stats: expected RoutingStats or MoELayer, got {type(stats).__name__}")
    _require_initialized("global_routing_stats")
    device = stats.tokens_per_expert.device
    counts = torch.cat(
        [
            stats.tokens_per_expert.to(torch.int64),
            torch.stack(
                [
                    stats.num_tokens,
                    stats.requested_slots,
                    stats.dropped_slots,
                    stats.unrouted_tokens,
                ]
            ).to(device, torch.int64),
        ]
    )
    # per-token means (entropy, top-1 confidence) become token-weighted means over ranks
    tokens = stats.num_tokens.to(device, torch.float64)
    means = torch.stack(
        [
            tokens,
            stats.router_entropy.to(device) * tokens,
            stats.top1_confidence.to(device) * tokens,
        ]
    ).to(torch.float64)
    dist.all_reduce(counts, group=group)
    dist.all_reduce(means, group=group)
    num_experts = stats.tokens_per_expert.numel()
    total = counts[num_experts:]
    all_tokens = means[0].clamp_min(1.0)
    return RoutingStats(
        tokens_per_expert=counts[:num_experts],
        num_tokens=total[0],
        requested_slots=total[1],
        dropped_slots=total[2],
        unrouted_tokens=total[3],
        token_choice=stats.token_choice,
        router_entropy=(means[1] / all_tokens).float(),
        top1_confidence=(means[2] / all_tokens).float(),
    )
