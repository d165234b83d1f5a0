"""Custom ops (``torch.library``) that run every expert over its contiguous row group.

* :func:`segment_mm`: ``y[rows of e] = x[rows of e] @ W[e]``, a loop of plain matmuls written
  into one output buffer, with its weight gradient :func:`segment_mm_weight_grad`.
* :func:`segment_swiglu`: whole SwiGLU experts per row group (gate/up matmul, activation,
  optional per-row weights, down matmul) while the group's rows are in cache, optionally
  reading token rows and adding into them (the fused combine of
  :func:`pytorch_mixtures.dispatch.run_experts`), with a hand-written backward
  (:func:`segment_swiglu_backward`) that recomputes the activation.

As custom ops they are opaque to ``torch.compile`` (their one host sync, the row counts, stays
inside) and each gradient is written once. Each is tested against a per-row float64 loop
(tests/test_kernels.py) and with ``torch.library.opcheck``.

Shape legend: S rows, N tokens, D input dim, H hidden / output dim, E experts (groups).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "group_bounds",
    "segment_mm",
    "segment_mm_weight_grad",
    "segment_swiglu",
    "segment_swiglu_backward",
]


def group_bounds(counts_E: Tensor) -> list[int]:
    """Row offsets ``[0, c0, c0+c1, ...]`` on the host (the loop's one device sync)."""
    bounds = [0]
    for count in counts_E.tolist():
        bounds.append(bounds[-1] + int(count))
    return bounds


@torch.library.custom_op("pytorch_mixtures::segment_mm", mutates_args=())
def segment_mm(x_SD: Tensor, weight_EDH: Tensor, counts_E: Tensor) -> Tensor:
    """``y[rows of e] = x[rows of e] @ weight[e]`` over contiguous row groups: ``[S, H]``.

    Rows past ``counts.sum()`` get zeros. A loop of plain matmuls written straight into one
    output buffer; as a custom op it is opaque to ``torch.compile`` (its host sync stays inside)
    and its backward writes each gradient once instead of summing per-slice zero-padded copies.
    """
    bounds = group_bounds(counts_E)
    if bounds[-1] > x_SD.shape[0]:
        raise ValueError(
            f"tokens_per_expert: counts sum to {bounds[-1]} but x has {x_SD.shape[0]} rows"
        )
    out_SH = x_SD.new_empty(x_SD.shape[0], weight_EDH.shape[-1])
    for expert in range(weight_EDH.shape[0]):
        start, end = bounds[expert], bounds[expert + 1]
        if end > start:
            torch.mm(x_SD[start:end], weight_EDH[expert], out=out_SH[start:end])
    out_SH[bounds[-1] :].zero_()
    return out_SH


@segment_mm.register_fake
def _(x_SD: Tensor, weight_EDH: Tensor, counts_E: Tensor) -> Tensor:
    return x_SD.new_empty(x_SD.shape[0], weight_EDH.shape[-1])


@torch.library.custom_op("pytorch_mixtures::segment_mm_weight_grad", mutates_args=())
def segment_mm_weight_grad(x_SD: Tensor, grad_SH: Tensor, counts_E: Tensor) -> Tensor:
    """``dW[e] = x[rows of e]^T @ grad[rows of e]``: ``[E, D, H]`` (zero for empty experts)."""
    bounds = group_bounds(counts_E)
    num_experts = counts_E.shape[0]
    grad_EDH = x_SD.new_empty(num_experts, x_SD.shape[-1], grad_SH.shape[-1])
    for expert in range(num_experts):
        start, end = bounds[expert], bounds[expert + 1]
        if end > start:
            torch.mm(x_SD[start:end].T, grad_SH[start:end], out=grad_EDH[expert])
        else:
            grad_EDH[expert].zero_()
    return grad_EDH


@segment_mm_weight_grad.register_fake
def _(x_SD: Tensor, grad_SH: Tensor, counts_E: Tensor) -> Tensor:
    return x_SD.new_empty(counts_E.shape[0], x_SD.shape[-1], grad_SH.shape[-1])


def _segment_mm_setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    x_SD, weight_EDH, counts_E = inputs
    ctx.save_for_backward(x_SD, weight_EDH, counts_E)


def _segment_mm_backward(ctx: Any, grad_SH: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x_SD, weight_EDH, counts_E = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = segment_mm(grad_SH, weight_EDH.transpose(1, 2), counts_E)
    if ctx.needs_input_grad[1]:
        grad_w = segment_mm_weight_grad(x_SD, grad_SH, counts_E)
    return grad_x, grad_w, None


segment_mm.register_autograd(_segment_mm_backward, setup_context=_segment_mm_setup)


@torch.library.custom_op("pytorch_mixtures::segment_swiglu", mutates_args=())
def segment_swiglu(
    x: Tensor,
    w_gate_up_ED2H: Tensor,
    w_down_EHD: Tensor,
    counts_E: Tensor,
    row_weights_S: Tensor | None,
    rows_S: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Whole SwiGLU experts over contiguous row groups, one expert at a time.

    Sorted row ``r`` of expert ``e`` computes ``w[r] * (silu(x_r W_gate[e]) * (x_r W_up[e]))
    W_down[e]`` (``w`` optional per-row weights). Without ``rows_S``, ``x`` is ``[S, D]`` in
    sorted order and the output ``[S, D]`` is too (rows past ``counts.sum()`` are zero). With
    ``rows_S`` ``[S]`` int64, ``x`` is ``[N, D]`` token rows: sorted row ``r`` reads token
    ``rows_S[r]`` and its output is added into that token's row of the ``[N, D]`` output, so
    neither the gathered inputs nor the per-slot outputs ``[S, D]`` ever exist (ScatterMoE's
    idea); rows past ``counts.sum()`` are ignored. Returns ``(y, gate_up [S, 2H])``; ``gate_up``
    is kept for the backward, which recomputes the cheap activation from it.

    Why per expert: one expert's ``[n_e, 2H]`` intermediate stays in cache between its two
    matmuls, where whole-tensor passes (gate_up, activation, down) stream ``[S, 2H]`` through
    memory each time. Adds into token rows are sequential over experts: deterministic.
    """
    with torch.autocast(x.device.type, enabled=False):  # the caller chose the dtype
        return _segment_swiglu_impl(
            x, w_gate_up_ED2H, w_down_EHD, group_bounds(counts_E), row_weights_S, rows_S
        )


def _segment_swiglu_impl(
    x: Tensor,
    w_gate_up_ED2H: Tensor,
    w_down_EHD: Tensor,
    bounds: list[int],
    row_weights_S: Tensor | None,
    rows_S: Tensor | None,
) -> tuple[Tensor, Tensor]:
    num_rows = x.shape[0] if rows_S is None else rows_S.shape[0]
    if bounds[-1] > num_rows:
        raise ValueError(f"tokens_per_expert: counts sum to {bounds[-1]} but x has {num_rows} rows")
    hidden = w_down_EHD.shape[1]
    gate_up_S2H = x.new_empty(num_rows, 2 * hidden)
    gate_up_S2H[bounds[-1] :].zero_()
    if rows_S is None:
        y = x.new_empty(num_rows, w_down_EHD.shape[-1])
        y[bounds[-1] :].zero_()
    else:
        y = x.new_zeros(x.shape[0], w_down_EHD.shape[-1])
    for expert in range(w_down_EHD.shape[0]):
        start, end = bounds[expert], bounds[expert + 1]
        if end == start:
            continue
        x_nD = x[start:end] if rows_S is None else x.index_select(0, rows_S[start:end])
        gate_up = torch.mm(x_nD, w_gate_up_ED2H[expert], out=gate_up_S2H[start:end])
        h_nH = F.silu(gate_up[:, :hidden]).mul_(gate_up[:, hidden:])
        if row_weights_S is not None:
            h_nH.mul_(row_weights_S[start:end].unsqueeze(-1))
        if rows_S is None:
            torch.mm(h_nH, w_down_EHD[expert], out=y[start:end])
        else:
            y.index_add_(0, rows_S[start:end], h_nH @ w_down_EHD[expert])
    return y, gate_up_S2H


@segment_swiglu.register_fake
def _(
    x: Tensor,
    w_gate_up_ED2H: Tensor,
    w_down_EHD: Tensor,
    counts_E: Tensor,
    row_weights_S: Tensor | None,
    rows_S: Tensor | None,
) -> tuple[Tensor, Tensor]:
    num_rows = x.shape[0] if rows_S is None else rows_S.shape[0]
    hidden = w_down_EHD.shape[1]
    return x.new_empty(x.shape[0], w_down_EHD.shape[-1]), x.new_empty(num_rows, 2 * hidden)


@torch.library.custom_op("pytorch_mixtures::segment_swiglu_backward", mutates_args=())
def segment_swiglu_backward(
    grad_y: Tensor,
    x: Tensor,
    gate_up_S2H: Tensor,
    w_gate_up_ED2H: Tensor,
    w_down_EHD: Tensor,
    counts_E: Tensor,
    row_weights_S: Tensor | None,
    rows_S: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`segment_swiglu`, one expert at a time: ``(dx, dW_gate_up [E, D, 2H],
    dW_down [E, H, D], d_row_weights [S])`` (the last zeros without row weights)."""
    with torch.autocast(x.device.type, enabled=False):
        return _segment_swiglu_backward_impl(
            grad_y, x, gate_up_S2H, w_gate_up_ED2H, w_down_EHD, group_bounds(counts_E),
            row_weights_S, rows_S,
        )  # fmt: skip


def _segment_swiglu_backward_impl(
    grad_y: Tensor,
    x: Tensor,
    gate_up_S2H: Tensor,
    w_gate_up_ED2H: Tensor,
    w_down_EHD: Tensor,
    bounds: list[int],
    row_weights_S: Tensor | None,
    rows_S: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    hidden = w_down_EHD.shape[1]
    if rows_S is None:
        grad_x = torch.empty_like(x)
        grad_x[bounds[-1] :].zero_()
    else:
        grad_x = torch.zeros_like(x)
    grad_w_gate_up = torch.empty_like(w_gate_up_ED2H)
    grad_w_down = torch.empty_like(w_down_EHD)
    grad_row_weights = gate_up_S2H.new_zeros(gate_up_S2H.shape[0])
    for expert in range(w_down_EHD.shape[0]):
        start, end = bounds[expert], bounds[expert + 1]
        if end == start:
            grad_w_gate_up[expert].zero_()
            grad_w_down[expert].zero_()
            continue
        if rows_S is None:
            x_nD, grad_nD = x[start:end], grad_y[start:end]
        else:
            tokens_n = rows_S[start:end]
            x_nD, grad_nD = x.index_select(0, tokens_n), grad_y.index_select(0, tokens_n)
        gate, up = gate_up_S2H[start:end, :hidden], gate_up_S2H[start:end, hidden:]
        silu = F.silu(gate)
        h_nH = silu * up
        grad_h_nH = grad_nD @ w_down_EHD[expert].T
        if row_weights_S is not None:
            w_n1 = row_weights_S[start:end].unsqueeze(-1)
            torch.sum(grad_h_nH * h_nH, dim=-1, out=grad_row_weights[start:end])
            h_nH.mul_(w_n1)
            grad_h_nH.mul_(w_n1)
        torch.mm(h_nH.T, grad_nD, out=grad_w_down[expert])
        grad_gate_up = torch.empty_like(gate_up_S2H[start:end])
        torch.ops.aten.silu_backward.grad_input(
            grad_h_nH * up, gate, grad_input=grad_gate_up[:, :hidden]
        )
        torch.mul(grad_h_nH, silu, out=grad_gate_up[:, hidden:])
        torch.mm(x_nD.T, grad_gate_up, out=grad_w_gate_up[expert])
        if rows_S is None:
            torch.mm(grad_gate_up, w_gate_up_ED2H[expert].T, out=grad_x[start:end])
        else:
            grad_x.index_add_(0, tokens_n, grad_gate_up @ w_gate_up_ED2H[expert].T)
    return grad_x, grad_w_gate_up, grad_w_down, grad_row_weights


@segment_swiglu_backward.register_fake
def _(
    grad_y: Tensor,
    x: Tensor,
    gate_up_S2H: Tensor,
    w_gate_up_ED2H: Tensor,
    w_down_EHD: Tensor,
    counts_E: Tensor,
    row_weights_S: Tensor | None,
    rows_S: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(x),
        torch.empty_like(w_gate_up_ED2H),
        torch.empty_like(w_down_EHD),
        gate_up_S2H.new_empty(gate_up_S2H.shape[0]),
    )


def _segment_swiglu_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, w_gate_up_ED2H, w_down_EHD, counts_E, row_weights_S, rows_S = inputs
    ctx.optional = (row_weights_S is not None, rows_S is not None)
    ctx.mark_non_differentiable(output[1])  # gate_up is returned only to be saved
    extras = tuple(t for t in (row_weights_S, rows_S) if t is not None)
    ctx.save_for_backward(x, output[1], w_gate_up_ED2H, w_down_EHD, counts_E, *extras)


def _segment_swiglu_grad(
    ctx: Any, grad_y: Tensor, _grad_gate_up: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, Tensor | None, None]:
    x, gate_up_S2H, w_gate_up_ED2H, w_down_EHD, counts_E, *extras = ctx.saved_tensors
    has_weights, has_rows = ctx.optional
    row_weights_S = extras.pop(0) if has_weights else None
    rows_S = extras.pop(0) if has_rows else None
    if torch.is_grad_enabled():
        # backward(create_graph=True): gradients that are themselves differentiable
        inputs = (x, w_gate_up_ED2H, w_down_EHD, row_weights_S)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        if not wanted:
            return None, None, None, None, None, None
        y = _segment_swiglu_composite(
            x, w_gate_up_ED2H, w_down_EHD, counts_E, row_weights_S, rows_S
        )
        grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
        gx, ggu, gdown, grw = (
            next(grads) if t is not None and t.requires_grad else None for t in inputs
        )
        return gx, ggu, gdown, None, grw, None
    grad_x, grad_gu, grad_down, grad_rw = segment_swiglu_backward(
        grad_y.contiguous(), x, gate_up_S2H, w_gate_up_ED2H, w_down_EHD, counts_E,
        row_weights_S, rows_S,
    )  # fmt: skip
    return grad_x, grad_gu, grad_down, None, (grad_rw if has_weights else None), None


segment_swiglu.register_autograd(_segment_swiglu_grad, setup_context=_segment_swiglu_setup)


def _segment_swiglu_composite(
    x: Tensor,
    w_gate_up_ED2H: Tensor,
    w_down_EHD: Tensor,
    counts_E: Tensor,
    row_weights_S: Tensor | None,
    rows_S: Tensor | None,
) -> Tensor:
    """:func:`segment_swiglu`'s ``y`` from differentiable ops (for higher-order gradients)."""
    bounds = group_bounds(counts_E)
    hidden = w_down_EHD.shape[1]
    pieces = []
    for expert in range(w_down_EHD.shape[0]):
        start, end = bounds[expert], bounds[expert + 1]
        if end == start:
            continue
        x_nD = x[start:end] if rows_S is None else x.index_select(0, rows_S[start:end])
        gate, up = (x_nD @ w_gate_up_ED2H[expert]).split(hidden, dim=-1)
        h_nH = F.silu(gate) * up
        if row_weights_S is not None:
            h_nH = h_nH * row_weights_S[start:end].unsqueeze(-1)
        pieces.append(h_nH @ w_down_EHD[expert])
    dim = w_down_EHD.shape[-1]
    y_SD = torch.cat([*pieces, x.new_zeros(0, dim)])
    if rows_S is None:
        return torch.cat([y_SD, x.new_zeros(x.shape[0] - bounds[-1], dim)])
    return x.new_zeros(x.shape[0], dim).index_add(0, rows_S[: bounds[-1]], y_SD)
