"""Grouped-matmul backends for stacked experts: one expert's weights per group of rows.

Stacked experts (:class:`~pytorch_mixtures.experts.SwiGLUExperts`,
:class:`~pytorch_mixtures.experts.MLPExperts`) receive rows grouped by expert (``counts[0]``
rows for expert 0, then expert 1, ...; trailing rows past ``counts.sum()`` are padding) and
apply ``x @ W[e]`` to each group. A backend decides how:

* ``"loop"``: a Python loop of plain matmuls over contiguous slices of the sorted rows
  (:mod:`pytorch_mixtures.kernels`). Reads the counts on the host (one ``.tolist()`` sync); on
  CPU the fastest path measured. SwiGLU experts run whole per expert, and inside ``MoELayer``
  on CPU they read token rows and add into them directly (no ``[S, D]`` permuted copies).
* ``"grouped_mm"``: :func:`torch.nn.functional.grouped_mm` (one kernel for all groups, jagged
  offsets as an ``int32`` device tensor, no host sync, static shapes, so it compiles with
  ``fullgraph=True``). Its kernels need 16-byte aligned strides: misaligned dims are
  zero-padded (exact), and dtypes it does not support (float64) are rejected clearly.
* ``"bmm"``: for capacity mode, where every expert holds at most C rows: rows are scattered
  into a padded ``[E, C, D]`` block and multiplied with :func:`torch.bmm` (static shapes, the
  GShard/Switch layout; good for compilers and GPUs; wasted work is the unused capacity).
* ``"auto"``: picked per call from measurements (README "Performance"): under
  ``torch.compile`` ``bmm`` when a capacity is known, else ``grouped_mm``; in eager mode on CPU
  ``loop``; on CUDA ``grouped_mm`` for bf16/fp16 (and ``bmm`` with a capacity otherwise).

Every backend gives the same numbers up to float rounding, forward and backward (tested against
each other and the naive per-token reference). Padding rows' outputs are exactly zero and they
receive exactly zero gradient.

Shape legend: S rows, D input dim, H output dim, E experts (groups), C rows per expert (capacity).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import segment_mm, segment_swiglu

__all__ = [
    "BACKENDS",
    "Backend",
    "ConcreteBackend",
    "GroupedRows",
    "group_rows",
    "grouped_mm_available",
    "resolve_backend",
    "segment_swiglu",
    "use_decode_path",
    "use_static_decode_path",
]

#: slots (tokens * top_k) up to which an eval call takes the decode path by default. Measured
#: on CPU (2 threads, float32; 8 experts, top-2): the direct loop over the chosen experts takes
#: 0.26-0.68x the plan path's time up to 512 slots at dim 128 / width 256, 0.44-0.94x at dim
#: 512 / width 1024, and breaks even near 2,000-8,000 slots (README, "Performance")
DECODE_MAX_SLOTS = 512
#: under torch.compile, slots per expert up to which an eval call takes the compiled decode path
STATIC_DECODE_SLOTS_PER_EXPERT = 4

Backend = Literal["auto", "loop", "grouped_mm", "bmm"]
ConcreteBackend = Literal["loop", "grouped_mm", "bmm"]
BACKENDS: tuple[str, ...] = ("auto", "loop", "grouped_mm", "bmm")

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_available(
    device: torch.device, dtype: torch.dtype, *, compiling: bool = False
) -> bool:
    """Whether :func:`torch.nn.functional.grouped_mm` can run on this device and dtype.

    Under ``torch.compile`` only bf16 is accepted (torch's shape function for the op rejects
    other dtypes even where the eager CPU kernel runs them).
    """
    if not hasattr(F, "grouped_mm") or dtype not in _GROUPED_MM_DTYPES:
        return False
    if compiling and dtype != torch.bfloat16:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        # The CUDA grouped GEMM kernels are bf16 on SM80+; other dtypes are not guaranteed.
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def check_backend(backend: object) -> Backend:
    """Validate a backend name (raises ``ValueError`` naming the choices)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    return backend  # type: ignore[return-value]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype when autocast is on, else ``x``'s."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def resolve_backend(
    backend: Backend, x_SD: Tensor, max_rows_per_expert: int | None, weight_dtype: torch.dtype
) -> ConcreteBackend:
    """The concrete backend for one call (``"auto"`` resolved; explicit choices checked)."""
    check_backend(backend)  # also a name assigned to ``experts.backend`` after construction
    dtype = compute_dtype(x_SD) if x_SD.is_floating_point() else weight_dtype
    compiling = _is_compiling()
    has_grouped_mm = grouped_mm_available(x_SD.device, dtype, compiling=compiling)
    if backend == "auto":
        if compiling and max_rows_per_expert is not None:
            return "bmm"
        if x_SD.device.type == "cuda":
            if has_grouped_mm:
                return "grouped_mm"
            if max_rows_per_expert is not None:
                return "bmm"
        return "loop"
    if backend == "grouped_mm" and not has_grouped_mm:
        have = "is missing" if not hasattr(F, "grouped_mm") else f"does not support {dtype}"
        where = " under torch.compile" if compiling else ""
        raise ValueError(
            f"backend='grouped_mm': torch.nn.functional.grouped_mm {have} on "
            f"{x_SD.device.type}{where} (torch {torch.__version__}); use backend='auto' or "
            "'loop'"
        )
    if backend == "bmm" and max_rows_per_expert is None:
        raise ValueError(
            "backend='bmm': needs a per-expert capacity (a capacity_factor on the router, or "
            "expert-choice routing); this call is dropless, use backend='auto', 'loop' or "
            "'grouped_mm'"
        )
    return backend


def use_decode_path(num_slots: int, device: torch.device, max_slots: int) -> bool:
    """Whether an eval call of ``num_slots`` routed slots takes the decode path (a loop over the
    chosen experts, no sort plan) rather than the plan with a grouped-matmul backend.

    Only on CPU, where reading the chosen ids costs no device sync, only up to ``max_slots``
    (beyond, one plan and one grouped pass over sorted rows is cheaper), and never under
    ``torch.compile`` (the loop depends on the ids' values)."""
    return device.type == "cpu" and 0 < num_slots <= max_slots and not _is_compiling()


def use_static_decode_path(num_slots: int, num_experts: int, max_slots: int) -> bool:
    """Under ``torch.compile``: whether an eval call of ``num_slots`` routed slots takes the
    compiled decode path (the experts' ``chosen_forward``: fixed shapes, no host sync) rather
    than the plan. Up to ``STATIC_DECODE_SLOTS_PER_EXPERT * num_experts`` slots (and never
    above ``max_slots``): past that the all-experts form computes too much."""
    bound = min(max_slots, STATIC_DECODE_SLOTS_PER_EXPERT * num_experts)
    return 0 < num_slots <= bound


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class GroupedRows:
    """Rows grouped by expert, in the layout one backend computes on.

    Build with :func:`group_rows`; then :meth:`linear` applies ``x @ W[e] (+ b[e])`` per group,
    :meth:`map` applies a row-wise function, and :meth:`rows` returns ``[S, H]`` with padding
    rows exactly zero.

    Attributes:
        backend: ``"loop"``, ``"grouped_mm"`` or ``"bmm"``.
        data: ``loop``/``grouped_mm``: ``[S, D]`` in sorted row order (row-aligned
            ``grouped_mm``: ``[P, D]`` with zero filler rows); ``bmm``: ``[E, C, D]``.
        counts_E: ``[E]`` rows per expert.
        valid_S1: ``[S, 1]`` bool, False on padding rows.
        row_expert_S: int64 expert of each row of ``data`` (``[S]``, or ``[P]`` when row-aligned),
            padding rows clamped to E-1 (for biases).
        offsets: ``grouped_mm`` only: ``[E]`` int32 group ends, the last one forced to S so
            padding rows ride in the last group (their outputs are zeroed by :meth:`rows`, so
            they pass back exactly zero gradient).
        slot_S: ``bmm``: ``[S]`` int64 row of the flattened ``[E*C + 1, D]`` block each row
            occupies (``E*C`` is a trash row for padding); row-aligned ``grouped_mm``: row of
            ``[P, D]``; else None.
        biased: a bias was added, so padding rows may be non-zero until :meth:`rows`.
    """

    backend: str
    data: Tensor
    counts_E: Tensor
    valid_S1: Tensor
    row_expert_S: Tensor
    offsets: Tensor | None = None
    slot_S: Tensor | None = None
    biased: bool = False

    @property
    def row_ordered(self) -> bool:
        """Whether ``data``'s rows are the sorted rows themselves (``[S, ...]``, no padded
        layout), so per-row factors apply to ``data`` directly."""
        return self.backend != "bmm" and self.slot_S is None

    def map(self, fn: Callable[[Tensor], Tensor]) -> GroupedRows:
        """Apply a row-wise function (an activation) in this layout."""
        return dataclasses.replace(self, data=fn(self.data))

    def linear(self, weight_EDH: Tensor, bias_EH: Tensor | None = None) -> GroupedRows:
        """``x @ weight[e] + bias[e]`` for every group e: ``[.., D] -> [.., H]``."""
        dtype = compute_dtype(self.data)
        x = self.data.to(dtype)
        weight_EDH = weight_EDH.to(dtype)
        if self.backend == "bmm":
            if bias_EH is None:
                return dataclasses.replace(self, data=torch.bmm(x, weight_EDH))
            out_ECH = torch.baddbmm(bias_EH.to(dtype).unsqueeze(1), x, weight_EDH)
            return dataclasses.replace(self, data=out_ECH)
        if self.backend == "grouped_mm":
            assert self.offsets is not None
            out_SH = _grouped_mm(x, weight_EDH, self.offsets)
        else:
            out_SH = segment_mm(x, weight_EDH, self.counts_E)
        if bias_EH is None:
            return dataclasses.replace(self, data=out_SH)
        out_SH = out_SH + bias_EH.to(dtype)[self.row_expert_S]
        return dataclasses.replace(self, data=out_SH, biased=True)

    def rows(self) -> Tensor:
        """Back to ``[S, H]`` in sorted row order; padding rows are exactly zero."""
        if self.backend == "loop" and not self.biased:
            return self.data  # segment_mm already wrote zeros there
        if self.backend == "bmm":
            assert self.slot_S is not None
            width = self.data.shape[-1]
            flat = self.data.reshape(-1, width)
            flat = torch.cat([flat, flat.new_zeros(1, width)], dim=0)  # the trash row
            return torch.where(self.valid_S1, flat[self.slot_S], 0.0)
        if self.slot_S is not None:  # grouped_mm with row-aligned groups
            return torch.where(self.valid_S1, self.data[self.slot_S], 0.0)
        return torch.where(self.valid_S1, self.data, 0.0)


def _alignment(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: grouped_mm kernels need every stride a multiple of 16 bytes."""
    return max(1, 16 // torch.empty((), dtype=dtype).element_size())


def _grouped_mm(x_SD: Tensor, weight_EDH: Tensor, offsets_E: Tensor) -> Tensor:
    """``F.grouped_mm`` with misaligned dims zero-padded (exact: zeros add nothing)."""
    dtype = x_SD.dtype
    align = _alignment(dtype)
    dim_in, dim_out = x_SD.shape[-1], weight_EDH.shape[-1]
    pad_in = _round_up(dim_in, align) - dim_in
    pad_out = _round_up(dim_out, align) - dim_out
    if pad_in or pad_out:
        x_SD = F.pad(x_SD, (0, pad_in))
        weight_EDH = F.pad(weight_EDH, (0, pad_out, 0, pad_in))
    elif weight_EDH.stride(-1) != 1 and weight_EDH.stride(-2) != 1:
        weight_EDH = weight_EDH.contiguous()
    out_SH = F.grouped_mm(x_SD.contiguous(), weight_EDH, offs=offsets_E)
    return out_SH[:, :dim_out] if pad_out else out_SH


def group_rows(
    x_SD: Tensor,
    tokens_per_expert_E: Tensor,
    backend: ConcreteBackend,
    max_rows_per_expert: int | None = None,
    *,
    row_alignment: int | None = None,
) -> GroupedRows:
    """Lay out expert-sorted rows for ``backend`` (no host sync for any backend).

    Args:
        x_SD: ``[S, D]`` rows grouped by expert; rows past ``tokens_per_expert.sum()`` are
            padding (they must be finite: they ride along in some backends and are zeroed).
        tokens_per_expert_E: ``[E]`` int64 rows per expert.
        backend: a concrete backend (see :func:`resolve_backend`).
        max_rows_per_expert: C, an upper bound on every count (required for ``"bmm"``; the
            caller guarantees it: capacity mode never keeps more than C rows per expert).
        row_alignment: ``grouped_mm`` only: start every group at a multiple of this many rows
            (zero filler rows between groups). Default: 16 on CUDA, whose grouped GEMM kernels
            want 16-row aligned groups, 1 (no filler) elsewhere.
    """
    num_rows = x_SD.shape[0]
    num_experts = tokens_per_expert_E.shape[0]
    ends_E = torch.cumsum(tokens_per_expert_E, dim=0)
    row_S = torch.arange(num_rows, device=x_SD.device)
    # expert of each row; E for padding rows past the last group
    row_expert_S = torch.searchsorted(ends_E, row_S, right=True)
    valid_S1 = (row_S < ends_E[-1]).unsqueeze(-1)
    clamped_S = row_expert_S.clamp_max(num_experts - 1)
    if backend == "loop":
        return GroupedRows("loop", x_SD, tokens_per_expert_E, valid_S1, clamped_S)
    if backend == "grouped_mm":
        if row_alignment is None:
            row_alignment = 16 if x_SD.device.type == "cuda" else 1
        if row_alignment > 1:
            return _aligned_groups(x_SD, tokens_per_expert_E, valid_S1, row_expert_S, row_alignment)
        offsets_E = ends_E.to(torch.int32)
        offsets_E = torch.cat([offsets_E[:-1], offsets_E.new_full((1,), num_rows)])
        return GroupedRows(
            "grouped_mm", x_SD, tokens_per_expert_E, valid_S1, clamped_S, offsets=offsets_E
        )
    if max_rows_per_expert is None:
        raise ValueError("max_rows_per_expert: required for backend='bmm', got None")
    capacity = max(1, max_rows_per_expert)
    starts_E1 = torch.cat([ends_E.new_zeros(1), ends_E])  # E+1 entries: padding starts at end
    rank_S = row_S - starts_E1[row_expert_S]
    slot_S = torch.where(
        valid_S1.squeeze(-1), row_expert_S * capacity + rank_S, num_experts * capacity
    )
    blocks = x_SD.new_zeros(num_experts * capacity + 1, x_SD.shape[-1])
    blocks = blocks.index_copy(0, slot_S, x_SD)
    x_ECD = blocks[:-1].view(num_experts, capacity, x_SD.shape[-1])
    return GroupedRows("bmm", x_ECD, tokens_per_expert_E, valid_S1, clamped_S, slot_S=slot_S)


def _aligned_groups(
    x_SD: Tensor, counts_E: Tensor, valid_S1: Tensor, row_expert_S: Tensor, align: int
) -> GroupedRows:
    """``grouped_mm`` layout with every group starting at a multiple of ``align`` rows.

    Static size ``P = round_up(S + E*(align-1), align) + align``: enough for any counts, with a
    zero trash block at the end for padding rows (it rides in the last group).
    """
    num_rows, dim = x_SD.shape
    num_experts = counts_E.shape[0]
    padded_rows = _round_up(num_rows + num_experts * (align - 1), align) + align
    padded_counts_E = (counts_E + align - 1) // align * align
    padded_ends_E = torch.cumsum(padded_counts_E, dim=0)
    ends_E = torch.cumsum(counts_E, dim=0)
    starts_E1 = torch.cat([ends_E.new_zeros(1), ends_E])
    padded_starts_E1 = torch.cat([padded_ends_E.new_zeros(1), padded_ends_E])
    row_S = torch.arange(num_rows, device=x_SD.device)
    rank_S = row_S - starts_E1[row_expert_S]
    slot_S = torch.where(
        valid_S1.squeeze(-1), padded_starts_E1[row_expert_S] + rank_S, padded_rows - 1
    )
    blocks_PD = x_SD.new_zeros(padded_rows, dim).index_copy(0, slot_S, x_SD)
    offsets_E = padded_ends_E.to(torch.int32)
    offsets_E = torch.cat([offsets_E[:-1], offsets_E.new_full((1,), padded_rows)])
    row_P = torch.arange(padded_rows, device=x_SD.device)
    row_expert_P = torch.searchsorted(padded_ends_E, row_P, right=True)
    return GroupedRows(
        "grouped_mm",
        blocks_PD,
        counts_E,
        valid_S1,
        row_expert_P.clamp_max(num_experts - 1),
        offsets=offsets_E,
        slot_S=slot_S,
    )
