"""Expert parallelism: shard each ``MoELayer``'s experts over a process group.

:func:`expert_parallel` replaces every layer's experts by :class:`ExpertParallelExperts`, which
sends each row to its expert's owner rank and back through :func:`all_to_all_single` (an
autograd function whose backward is the reverse exchange). :func:`expert_parameters` /
:func:`non_expert_parameters` split a sharded model's parameters into the rank-local experts and
the replicated rest. See :mod:`pytorch_mixtures.distributed` for the guarantees.

Shape legend: S rows (slots) on this rank, D model dim, E global experts, W ranks in the group,
L = E / W local experts, R rows received from all ranks.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..depth.mixture_of_depths import MixtureOfDepths
from ..experts import ExpertsBase, ModuleListExperts
from ..moe_layer import MoELayer

if TYPE_CHECKING:
    from ..backends import ConcreteBackend
    from ..dispatch import DispatchPlan

__all__ = [
    "ExpertParallelExperts",
    "all_to_all_single",
    "expert_parallel",
    "expert_parameters",
    "non_expert_parameters",
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
    _require_initialized("all_to_all_single")
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

    def run(
        self,
        x_SD: Tensor,
        tokens_per_expert_E: Tensor,
        backend: ConcreteBackend,
        max_rows_per_expert: int | None,
        combine_plan: DispatchPlan | None,
    ) -> Tensor:
        """Send rows to their experts' owners, compute there, and bring the outputs back.

        ``x_SD`` ``[S, D]`` rows grouped by global expert (rows past
        ``tokens_per_expert.sum()`` are padding), ``tokens_per_expert_E`` ``[E]`` rows per
        global expert. ``backend`` and ``max_rows_per_expert`` are unused: rows are exchanged
        with variable split sizes and this rank's experts resolve their own backend for the rows
        they receive; the combine is never fused (:meth:`fuses_combine` stays False).

        Returns:
            ``[S, D]`` expert outputs in the same row order (zero for padding rows).
        """
        world, local = self.world_size, self.num_local_experts
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

    A rank whose input to a layer is empty (``[0, T, D]``, ``[B, 0, D]``: e.g. Mixture-of-Depths
    selected no token) still joins that layer's exchanges with zero rows, forward and
    backward, and gets an empty output; its peers' results are unchanged.

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
            layer.register_forward_pre_hook(_count_call)
            layer.register_forward_hook(_exchange_empty_input, with_kwargs=True)
    for module in model.modules():
        if isinstance(module, MixtureOfDepths) and not getattr(module, "_ep_hooked", False):
            module.register_forward_pre_hook(_note_calls)
            module.register_forward_hook(_run_skipped_layers)
            module.__dict__["_ep_hooked"] = True
    return model


def _has_fsdp(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be FSDP yet
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules())


def _exchange_empty_input(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Tensor | None:
    """Join the all-to-alls with zero rows when this rank's input is empty.

    ``MoELayer`` returns an empty input's (empty) output without calling its experts, so this
    rank would skip the exchanges its peers are waiting in. Here the experts run on ``[0, D]``
    rows with zero counts instead: the same collectives as the peers' (counts, dispatch,
    return), in training and in eval, and an output built from the returned rows, so backward
    runs the reverse exchanges too. The layer's other parameters (router, shared experts) are
    tied in with zero weight: they get zero gradients, as DDP expects of every rank.
    """
    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, Tensor) or x.numel() != 0 or not isinstance(layer, MoELayer):
        return None
    experts = layer.experts
    if not isinstance(experts, ExpertParallelExperts):
        return None
    x_SD = x.reshape(0, experts.dim)  # a view of x: its gradient comes back through the exchange
    counts_E = torch.zeros(experts.num_experts, dtype=torch.long, device=x.device)
    y_SD: Tensor = experts(x_SD, counts_E)
    y = y_SD.reshape(x.shape).to(x.dtype)
    if torch.is_grad_enabled():
        tied = [
            p
            for name, p in layer.named_parameters()
            if p.requires_grad and not name.startswith("experts.")
        ]
        if tied:
            y = y + torch.stack([p.sum().float() for p in tied]).sum().to(y.dtype) * 0
    return y


def _count_call(layer: nn.Module, args: tuple[Any, ...]) -> None:
    layer.__dict__["_ep_calls"] = getattr(layer, "_ep_calls", 0) + 1


def _inner_ep_layers(mod: nn.Module) -> list[MoELayer]:
    return [
        m
        for m in mod.modules()
        if isinstance(m, MoELayer) and isinstance(m.experts, ExpertParallelExperts)
    ]


def _note_calls(mod: nn.Module, args: tuple[Any, ...]) -> None:
    mod.__dict__["_ep_calls_before"] = [getattr(m, "_ep_calls", 0) for m in _inner_ep_layers(mod)]


def _run_skipped_layers(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """A Mixture-of-Depths that selected no token skips its block (and so its expert-parallel
    layers' exchanges, which the peers that did select tokens are waiting in): run each such
    layer on an empty input instead, in module order, and tie its (empty) output to ours."""
    before: list[int] = getattr(mod, "_ep_calls_before", [])
    layers = _inner_ep_layers(mod)
    skipped = [
        layer
        for layer, count in zip(layers, before, strict=False)
        if getattr(layer, "_ep_calls", 0) == count
    ]
    if not skipped or not isinstance(output, Tensor):
        return None
    x = args[0] if args and isinstance(args[0], Tensor) else output
    empties = []
    for layer in skipped:
        param = next((p for p in layer.parameters() if p.is_floating_point()), None)
        dtype = x.dtype if param is None else param.dtype
        if x.shape[-1] == layer.dim and x.dtype == dtype:
            # zero rows of the input itself: the input's gradient then waits for the reverse
            # exchanges, so they run in the same order as on the ranks that ran the block
            x_0D = x.reshape(-1, layer.dim)[:0]
        else:
            x_0D = x.new_zeros((0, layer.dim), dtype=dtype)
        empties.append(layer(x_0D).flatten())
    # concatenating empty tensors changes no value (not even a zero's sign) yet connects the
    # graph, so backward runs the skipped layers' reverse exchanges as well
    flat = output.flatten()
    return torch.cat([flat, *[e.to(flat.dtype) for e in empties]]).view(output.shape)


def expert_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters owned by this rank's sharded experts (not replicated across ranks)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for _, module in _ep_modules(model):
        yield from module.local.parameters()


def non_expert_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters replicated over the expert-parallel ranks (routers, attention, ...)."""
    expert_ids = {id(p) for p in expert_parameters(model)}
    for param in _unwrap(model).parameters():
        if id(param) not in expert_ids:
            yield param
