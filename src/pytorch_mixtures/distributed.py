"""Expert parallelism over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

:func:`expert_parallel` shards the experts of every :class:`~pytorch_mixtures.MoELayer` in a
model over the ranks of a process group, in place: each of the W ranks keeps ``E / W``
consecutive experts (rank r owns global experts ``r*L .. r*L + L - 1``, ``L = E / W``) and the
routers stay replicated. A layer's forward then runs (GShard, Lepikhin et al. 2020; Switch,
Fedus et al. 2021)::

    route locally -> sort slots by global expert (unchanged dispatch)
      -> all_to_all the row counts -> all_to_all_single the rows to the experts' owners
      -> regroup received rows by local expert -> local experts
      -> undo the regrouping -> all_to_all_single the outputs back -> combine locally

Because experts are owned in contiguous blocks, the expert-sorted rows a rank sends to each
owner are already contiguous: no extra permutation on the send side. The two row exchanges go
through an autograd function whose backward is the reverse exchange, so input and weight
gradients flow back through the same path.

Guarantees (tested in ``tests/test_distributed.py`` on gloo at 2 and 4 ranks): for any rank's
local batch, the output and the input gradient equal the unsharded layer's on that batch, and
each expert's weight gradient equals the *sum over ranks* of the unsharded layer's gradients.

Composition with data parallelism over the non-expert parameters: :func:`ddp` (DDP) and
:func:`fully_shard` (FSDP2) exclude expert parameters from the data-parallel reduction and scale
expert gradients by ``1 / W`` so that every parameter's gradient is that of the mean loss over
ranks (expert gradients are already summed over ranks by the all-to-all backward; left
unscaled they are ``W`` times too large against the averaged data-parallel gradients, the
classic expert-parallel bug).

Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` use ``torch.distributed.checkpoint``
with the *unsharded* model's keys (stacked expert weights as ``DTensor`` sharded on the expert
dimension), so a checkpoint saved on N ranks loads on M ranks, or into an unsharded model in one
process; passing the optimizer saves and reshards its state too (training resumes on another
rank count). :func:`full_state_dict` gathers the unsharded state dict for export.

Global numbers: :func:`global_routing_stats` all-reduces a layer's routing statistics, and
:func:`clip_grad_norm_` clips by the norm over every rank's experts (a per-rank norm would
scale the replicated parameters differently on each rank).

Requirements: every rank of the group calls each MoE layer the same number of times, in the same
order, with a non-empty input (a rank may route zero tokens, e.g. all padding, but must call the
layer), and all ranks run backward together; the layer's collectives otherwise wait forever.

Shape legend: S rows (slots) on this rank, D model dim, E global experts, W ranks in the group,
L = E / W local experts, R rows received from all ranks.
"""

from __future__ import annotations

import copy
import functools
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .experts import ExpertsBase, ModuleListExperts
from .moe_layer import MoELayer
from .stats import RoutingStats

__all__ = [
    "ExpertParallelExperts",
    "all_to_all_single",
    "clip_grad_norm_",
    "ddp",
    "expert_parallel",
    "expert_parameters",
    "full_state_dict",
    "fully_shard",
    "global_routing_stats",
    "load_checkpoint",
    "load_sharded_optimizer_state_dict",
    "load_sharded_state_dict",
    "non_expert_parameters",
    "save_checkpoint",
    "sharded_optimizer_state_dict",
    "sharded_state_dict",
]


def _require_initialized(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{what}: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group (torchrun sets the environment) first"
        )


class _AllToAllSingle(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with explicit splits; backward is the reverse."""

    @staticmethod
    def forward(
        ctx: Any,
        x_SD: Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup | None,
        _force_grad: Tensor,
    ) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out_RD = x_SD.new_empty((sum(output_splits), *x_SD.shape[1:]))
        dist.all_to_all_single(out_RD, x_SD.contiguous(), output_splits, input_splits, group=group)
        return out_RD

    @staticmethod
    def backward(ctx: Any, grad_RD: Tensor) -> tuple[Tensor, None, None, None, None]:
        grad_SD = grad_RD.new_empty((sum(ctx.input_splits), *grad_RD.shape[1:]))
        dist.all_to_all_single(
            grad_SD, grad_RD.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group
        )
        return grad_SD, None, None, None, None


def all_to_all_single(
    x_SD: Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Autograd-aware ``all_to_all_single``: rows ``x_SD[sum(input_splits[:j]):...]`` go to rank j.

    Args:
        x_SD: ``[S, ...]`` rows to send, ``S = sum(input_splits)``, any dtype.
        output_splits: rows received from each rank (``W`` ints).
        input_splits: rows sent to each rank (``W`` ints).
        group: the process group (default: the world).

    Returns:
        ``[sum(output_splits), ...]`` received rows, ordered by source rank. Under grad mode the
        result always requires grad, so every rank runs the reverse exchange in backward even
        when its own input needs no gradient (its peers' inputs may); ranks would otherwise
        disagree on whether to join the collective and hang.

    ``torch.distributed.nn.functional.all_to_all_single`` (torch 2.13) computes the same
    backward; this one allocates its output itself and keeps ranks in lock-step as above.
    """
    force_grad = torch.empty(0, device=x_SD.device, requires_grad=torch.is_grad_enabled())
    apply: Any = _AllToAllSingle.apply
    out: Tensor = apply(x_SD, output_splits, input_splits, group, force_grad)
    return out


def _check_homogeneous(modules: list[nn.Module]) -> None:
    """Module-list experts must be interchangeable for resharding: same type, same parameters."""

    def signature(module: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(name, tuple(t.shape), t.dtype) for name, t in module.state_dict().items()]

    first_type, first_sig = type(modules[0]), signature(modules[0])
    for index, module in enumerate(modules[1:], start=1):
        if type(module) is not first_type or signature(module) != first_sig:
            raise ValueError(
                f"experts: expert parallelism needs homogeneous module-list experts (same type "
                f"and parameter shapes, so a checkpoint reshards to any rank count); expert 0 is "
                f"{first_type.__name__} {first_sig}, expert {index} is "
                f"{type(module).__name__} {signature(module)}"
            )


def _slice_experts(experts: ExpertsBase, first: int, count: int) -> ExpertsBase:
    """A copy of ``experts`` holding only global experts ``first .. first + count - 1``."""
    if isinstance(experts, ModuleListExperts):
        modules = list(experts.experts)
        _check_homogeneous(modules)
        return ModuleListExperts(modules[first : first + count], experts.dim)
    num_experts = experts.num_experts
    for name, tensor in [*experts.named_parameters(), *experts.named_buffers()]:
        if tensor.dim() == 0 or tensor.shape[0] != num_experts:
            raise ValueError(
                f"experts: {type(experts).__name__}.{name} has shape {tuple(tensor.shape)}; "
                f"expert parallelism slices stacked experts on a leading dimension of size "
                f"num_experts={num_experts} (use MLPExperts, SwiGLUExperts or a list of modules)"
            )
    # a shallow copy keeps any extra configuration (activation, backend, ...); the tensors are
    # replaced by sliced copies so the full stacks can be freed
    local = copy.copy(experts)
    local._parameters = {
        name: None
        if p is None
        else nn.Parameter(p.detach()[first : first + count].clone(), requires_grad=p.requires_grad)
        for name, p in experts._parameters.items()
    }
    local._buffers = {
        name: None if b is None else b[first : first + count].clone()
        for name, b in experts._buffers.items()
    }
    local._modules = dict(experts._modules)
    local.num_experts = count
    return local


class ExpertParallelExperts(ExpertsBase):
    """Experts sharded over a process group: this rank computes experts ``first .. first+L-1``.

    Same call as every experts module, ``forward(x_SD, tokens_per_expert_E) -> y_SD``, with the
    rows of ``x_SD`` grouped by *global* expert id; ``num_experts`` is the global E, so the
    owning :class:`~pytorch_mixtures.MoELayer` and its router are unchanged. Built by
    :func:`expert_parallel`; rarely constructed by hand.

    Args:
        experts: the full (unsharded) experts; this rank's slice is copied out of them.
        group: process group of the expert-parallel ranks (default: the world).

    Attributes:
        local: the ``L`` experts this rank owns (an ``ExpertsBase`` of ``L`` experts).
        grad_scale: factor applied to the local experts' gradients (1.0; set to ``1 / W`` by
            :func:`ddp` / :func:`fully_shard` so expert and data-parallel gradients agree).
    """

    def __init__(self, experts: ExpertsBase, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        _require_initialized("expert_parallel")
        if isinstance(experts, ExpertParallelExperts):
            raise TypeError("experts: already expert-parallel")
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(
                f"group: this rank ({dist.get_rank()}) is not a member of the given group"
            )
        if experts.num_experts % world != 0:
            raise ValueError(
                f"num_experts: expert parallelism over {world} ranks needs num_experts "
                f"divisible by {world}, got num_experts={experts.num_experts}"
            )
        self.num_experts = experts.num_experts
        self.dim = experts.dim
        self.group = group
        self.world_size = world
        self.rank = rank
        self.num_local_experts = experts.num_experts // world
        self.first_expert = rank * self.num_local_experts
        self.local = _slice_experts(experts, self.first_expert, self.num_local_experts)
        self.grad_scale = 1.0
        self._hooked = False

    def _install_grad_scale(self) -> None:
        if self._hooked:
            return
        for param in self.local.parameters():
            if param.requires_grad:
                param.register_hook(functools.partial(_scale_grad, self))
        self._hooked = True

    def forward(self, x_SD: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        """Send rows to their experts' owners, compute there, and bring the outputs back.

        Args:
            x_SD: ``[S, D]`` rows grouped by global expert; rows past
                ``tokens_per_expert.sum()`` are padding.
            tokens_per_expert_E: ``[E]`` int64 rows per global expert.

        Returns:
            ``[S, D]`` expert outputs in the same row order (zero for padding rows).
        """
        world, local = self.world_size, self.num_local_experts
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert: expected shape ({self.num_experts},), "
                f"got {tuple(tokens_per_expert_E.shape)}"
            )
        send_counts_WL = tokens_per_expert_E.to(torch.int64).reshape(world, local).contiguous()
        recv_counts_WL = torch.empty_like(send_counts_WL)
        dist.all_to_all_single(recv_counts_WL, send_counts_WL, group=self.group)
        # one host sync for all split sizes (unavoidable without static capacity shapes)
        send_WL, recv_WL = torch.stack([send_counts_WL, recv_counts_WL]).tolist()
        send_splits = [sum(row) for row in send_WL]
        recv_splits = [sum(row) for row in recv_WL]
        num_kept = sum(send_splits)
        if num_kept > x_SD.shape[0]:
            raise ValueError(
                f"tokens_per_expert: counts sum to {num_kept} but x has {x_SD.shape[0]} rows"
            )

        recv_RD = all_to_all_single(x_SD[:num_kept], recv_splits, send_splits, self.group)
        # received rows are grouped by source rank, then by local expert: regroup by expert
        order_R = _group_by_expert_order(recv_counts_WL, sum(recv_splits))
        tokens_per_local_L = recv_counts_WL.sum(dim=0)
        y_local_RD = self.local(recv_RD[order_R], tokens_per_local_L)
        if recv_RD.requires_grad and not y_local_RD.requires_grad:
            # no row arrived, so the experts' (empty) output is a fresh tensor: tie it to the
            # received rows, or this rank would skip the dispatch exchange's backward while
            # its peers run it, and the collectives would pair up wrongly or hang
            y_local_RD = y_local_RD + recv_RD.sum() * 0
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        y_back_SD = all_to_all_single(y_local_RD[inverse_R], send_splits, recv_splits, self.group)
        padding = y_back_SD.new_zeros((x_SD.shape[0] - num_kept, self.dim))
        return torch.cat([y_back_SD.to(x_SD.dtype), padding], dim=0)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, local_experts={self.first_expert}.."
            f"{self.first_expert + self.num_local_experts - 1}, world_size={self.world_size}"
        )


def _scale_grad(module: ExpertParallelExperts, grad: Tensor) -> Tensor:
    return grad if module.grad_scale == 1.0 else grad * module.grad_scale


def _group_by_expert_order(recv_counts_WL: Tensor, total: int) -> Tensor:
    """``[R]`` index reordering received rows from (source rank, local expert) to (expert, rank).

    Rows arrive grouped by source rank and, within a source, by local expert. The block of
    (source w, expert l) starts at ``starts_WL[w, l]`` (exclusive cumsum in source-major order);
    the expert-major layout visits blocks in ``[L, W]`` order, each block's rows consecutively.
    ``total`` is the number of received rows (known on the host: no device sync here).
    """
    counts_WL = recv_counts_WL
    starts_WL = (counts_WL.flatten().cumsum(0) - counts_WL.flatten()).view_as(counts_WL)
    counts_S, starts_S = counts_WL.T.flatten(), starts_WL.T.flatten()  # blocks in [L, W] order
    block_of_R = torch.repeat_interleave(
        torch.arange(counts_S.numel(), device=counts_S.device), counts_S, output_size=total
    )
    first_row_S = counts_S.cumsum(0) - counts_S  # where each block starts in the new layout
    offset_R = torch.arange(total, device=counts_S.device) - first_row_S[block_of_R]
    return starts_S[block_of_R] + offset_R


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (``.module``), else the model itself."""
    inner = getattr(model, "module", None)
    if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(inner, nn.Module):
        return inner
    return model


def _ep_modules(model: nn.Module) -> Iterator[tuple[str, ExpertParallelExperts]]:
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, ExpertParallelExperts):
            yield name, module


def expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard the experts of every ``MoELayer`` in ``model`` over ``group``, in place.

    Each rank keeps ``num_experts / W`` consecutive experts (a sliced copy of stacked weights,
    or its share of a homogeneous module list); routers and every other parameter stay
    replicated. Call it on every rank of ``group`` with the same model, after building the
    model and before wrapping it with :func:`ddp` / :func:`fully_shard` or creating the
    optimizer (the expert parameters are replaced).

    Args:
        model: any module containing ``MoELayer`` s (or a ``MoELayer``).
        group: process group of the expert-parallel ranks (default: the world).

    Returns:
        ``model`` itself.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: a layer's ``num_experts`` is not divisible by the group size, or its
            module-list experts are not homogeneous.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _require_initialized("expert_parallel")
    if isinstance(model, nn.parallel.DistributedDataParallel) or _has_fsdp(model):
        raise TypeError(
            "model: already wrapped for data parallelism; call expert_parallel first, then "
            "pm.distributed.ddp / pm.distributed.fully_shard"
        )
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(
            f"model: expected a model containing MoELayer(s), got none in {type(model).__name__}"
        )
    for layer in layers:
        if not isinstance(layer.experts, ExpertParallelExperts):
            layer.experts = ExpertParallelExperts(layer.experts, group)
            layer.register_forward_pre_hook(_refuse_empty_input)
    return model


def _has_fsdp(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be FSDP yet
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules())


def _refuse_empty_input(layer: nn.Module, args: tuple[Any, ...]) -> None:
    # an empty batch takes MoELayer's shortcut past the experts, so this rank would skip the
    # all-to-alls its peers are waiting in: fail here, loudly, instead of hanging them
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.numel() == 0:
        raise ValueError(
            f"x: an expert-parallel MoELayer needs a non-empty input on every rank (its peers "
            f"wait for this rank in the all-to-all), got shape {tuple(x.shape)}; pad the batch "
            "and pass attention_mask=0 for the padding instead"
        )


def expert_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters owned by this rank's sharded experts (not replicated across ranks)."""
    for _, module in _ep_modules(model):
        yield from module.local.parameters()


def non_expert_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters replicated over the expert-parallel ranks (routers, attention, ...)."""
    expert_ids = {id(p) for p in expert_parameters(model)}
    for param in _unwrap(model).parameters():
        if id(param) not in expert_ids:
            yield param


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

    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
        raise ValueError(f"max_norm: expected a number > 0, got {max_norm!r}")
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


# --- checkpoints -------------------------------------------------------------------------

_LOCAL_LIST_KEY = re.compile(r"^experts\.(\d+)\.(.+)$")


def _expert_key_map(model: nn.Module) -> dict[str, tuple[ExpertParallelExperts, str, str, int]]:
    """Local state-dict key -> (module, unsharded key, local tensor name, local index or -1)."""
    mapping: dict[str, tuple[ExpertParallelExperts, str, str, int]] = {}
    for path, module in _ep_modules(model):
        prefix = f"{path}." if path else ""
        for name in module.local.state_dict():
            local_key = f"{prefix}local.{name}"
            if isinstance(module.local, ModuleListExperts):
                match = _LOCAL_LIST_KEY.match(name)
                if match is None:  # pragma: no cover - ModuleListExperts holds only `experts`
                    raise ValueError(f"unexpected key {local_key}")
                index = int(match.group(1))
                global_key = f"{prefix}experts.{module.first_expert + index}.{match.group(2)}"
                mapping[local_key] = (module, global_key, name, index)
            else:
                mapping[local_key] = (module, f"{prefix}{name}", name, -1)
    return mapping


def _mesh_for(module: ExpertParallelExperts, device: torch.device) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    group = module.group if module.group is not None else dist.group.WORLD
    assert group is not None
    return DeviceMesh.from_group(group, device.type)


def sharded_state_dict(model: nn.Module) -> dict[str, Any]:
    """This rank's state dict under the *unsharded* model's keys, for distributed checkpoints.

    Non-expert entries are ``model.state_dict()``'s (FSDP2 parameters stay ``DTensor`` s).
    Stacked expert tensors (``[E, ...]`` in the unsharded model) are ``DTensor`` s sharded on
    dim 0 over the expert-parallel group, wrapping this rank's ``[L, ...]`` slice (sharing its
    storage); module-list experts appear under their global index
    (``...experts.experts.{e}.weight``), each on its owner rank only.
    """
    from torch.distributed.tensor import DTensor, Shard

    model = _unwrap(model)
    mapping = _expert_key_map(model)
    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if key not in mapping:
            out[key] = value
            continue
        module, global_key, _, index = mapping[key]
        if index >= 0:
            out[global_key] = value
        else:
            mesh = _mesh_for(module, value.device)
            out[global_key] = DTensor.from_local(value, mesh, [Shard(0)], run_check=False)
    return out


def load_sharded_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Load a state dict in :func:`sharded_state_dict`'s layout (after ``dcp.load`` fills it)."""
    from torch.distributed.tensor import DTensor

    model = _unwrap(model)
    mapping = _expert_key_map(model)
    expert_values: dict[str, Tensor] = {}
    for local_key, (_, global_key, _, _) in mapping.items():
        if global_key not in state_dict:
            raise KeyError(f"state_dict: missing expert entry {global_key!r}")
        value = state_dict[global_key]
        expert_values[local_key] = value.to_local() if isinstance(value, DTensor) else value
    global_keys = {global_key for _, global_key, _, _ in mapping.values()}
    rest = {k: v for k, v in state_dict.items() if k not in global_keys}
    missing, unexpected = model.load_state_dict({**rest, **expert_values}, strict=False)
    if missing or unexpected:
        raise KeyError(f"state_dict: missing keys {missing}, unexpected keys {unexpected}")


_OPTIM_PREFIX = "optim."


def _flat_optimizer_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # flat keys ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr") let each rank own its
    # experts' entries; nested param_groups lists would differ between ranks
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _split_optim_key(key: str) -> tuple[str, str, str]:
    """``"state.a.b.exp_avg"`` -> ``("state", "a.b", "exp_avg")`` (leaf names hold no dots)."""
    section, _, rest = key.partition(".")
    fqn, _, leaf = rest.rpartition(".")
    return section, fqn, leaf


def sharded_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The optimizer's state under the *unsharded* model's parameter names (see
    :func:`sharded_state_dict`): per-expert state of stacked experts (``exp_avg`` ``[L, ...]``)
    becomes ``DTensor`` s sharded on the expert dimension, so it reshards like the weights.
    Initialises the optimizer's state first if it has none (a zero-learning-rate step).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor, Shard

    flat: dict[str, Any] = dict(
        get_optimizer_state_dict(model, optimizer, options=_flat_optimizer_options())
    )
    mapping = _expert_key_map(model)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, fqn, leaf = _split_optim_key(key)
        if fqn not in mapping:
            out[key] = value
            continue
        module, global_key, _, index = mapping[fqn]
        new_key = f"{section}.{global_key}.{leaf}"
        out[new_key] = value
        if index >= 0 or not isinstance(value, Tensor) or isinstance(value, DTensor):
            continue
        if value.dim() > 0 and value.shape[0] == module.num_local_experts:
            mesh = _mesh_for(module, value.device)
            out[new_key] = DTensor.from_local(value, mesh, [Shard(0)], run_check=False)
    return out


def load_sharded_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]
) -> None:
    """Load a state dict in :func:`sharded_optimizer_state_dict`'s layout into ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    to_local = {
        global_key: local for local, (_, global_key, _, _) in _expert_key_map(model).items()
    }
    flat: dict[str, Any] = {}
    for key, value in state_dict.items():
        section, fqn, leaf = _split_optim_key(key)
        if fqn in to_local:
            key = f"{section}.{to_local[fqn]}.{leaf}"
            if isinstance(value, DTensor):
                value = value.to_local()
        flat[key] = value
    set_optimizer_state_dict(model, optimizer, flat, options=_flat_optimizer_options())


def save_checkpoint(
    model: nn.Module, path: str, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Save ``model`` (expert-parallel, DDP/FSDP-wrapped, or plain) with distributed checkpointing.

    Collective: call on every rank. The checkpoint stores every tensor at its unsharded shape,
    so :func:`load_checkpoint` can load it on any number of ranks (one process without a
    process group included), into a model with any compatible expert sharding.

    Args:
        model: the model.
        path: a directory (``torch.distributed.checkpoint`` layout: ``.metadata`` + shards).
        optimizer: optionally, its optimizer, saved alongside (keys ``optim.state.<param>...``)
            so that training resumes on any number of ranks.
    """
    from torch.distributed.checkpoint.state_dict_saver import save

    state_dict = sharded_state_dict(model)
    if optimizer is not None:
        optim_sd = sharded_optimizer_state_dict(model, optimizer)
        state_dict.update({_OPTIM_PREFIX + k: v for k, v in optim_sd.items()})
    save(state_dict, checkpoint_id=path)


def load_checkpoint(
    model: nn.Module, path: str, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load a checkpoint written by :func:`save_checkpoint`, resharding as needed (collective).

    With ``optimizer``, its state is restored too (the checkpoint must hold one).
    """
    from torch.distributed.checkpoint.state_dict_loader import load

    state_dict = sharded_state_dict(model)
    optim_keys: list[str] = []
    if optimizer is not None:
        optim_sd = sharded_optimizer_state_dict(model, optimizer)
        optim_keys = [_OPTIM_PREFIX + k for k in optim_sd]
        state_dict.update(zip(optim_keys, optim_sd.values(), strict=True))
    load(state_dict, checkpoint_id=path)
    if optimizer is not None:
        optim_loaded = {k[len(_OPTIM_PREFIX) :]: state_dict.pop(k) for k in optim_keys}
        load_sharded_optimizer_state_dict(model, optimizer, optim_loaded)
    load_sharded_state_dict(model, state_dict)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Gather the unsharded state dict (same keys and shapes as the model before sharding).

    Collective: every rank of the expert-parallel (and FSDP) groups must call it; every rank
    receives the full dict (plain tensors on the parameters' device). Use it to export, e.g.
    ``safetensors.torch.save_file(full_state_dict(model), "model.safetensors")`` on rank 0.
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, Tensor] = {}
    for key, value in sharded_state_dict(model).items():
        out[key] = value.full_tensor() if isinstance(value, DTensor) else value
    # module-list experts live on their owner only: broadcast each from its owner
    for path, module in _ep_modules(model):
        if not isinstance(module.local, ModuleListExperts):
            continue
        prefix = f"{path}." if path else ""
        template = module.local.experts[0].state_dict()
        for expert in range(module.num_experts):
            owner = expert // module.num_local_experts
            if module.group is not None:
                owner = dist.get_global_rank(module.group, owner)
            for name, like in template.items():
                key = f"{prefix}experts.{expert}.{name}"
                tensor = out[key].clone() if key in out else torch.empty_like(like)
                dist.broadcast(tensor, src=owner, group=module.group)
                out[key] = tensor
    return out
