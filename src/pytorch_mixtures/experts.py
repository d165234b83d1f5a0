"""Experts: E feed-forward networks applied to expert-sorted rows.

Every experts module has the same call: ``experts(x_SD, tokens_per_expert_E) -> y_SD`` where
the rows of ``x_SD`` are grouped by expert (the first ``tokens_per_expert[0]`` rows go to
expert 0, the next to expert 1, ...), as :mod:`pytorch_mixtures.dispatch` lays them out.
Rows past ``tokens_per_expert.sum()`` are padding: their output is zero.

* :class:`MLPExperts` and :class:`SwiGLUExperts` keep the E experts' weights stacked as
  ``[E, ...]`` tensors (the layout grouped-matmul kernels want).
* :class:`ModuleListExperts` wraps any list of ``nn.Module`` mapping ``[n, D] -> [n, D]``.

Shape legend: S rows, D model dim, H expert hidden dim, E experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import (
    Backend,
    check_backend,
    compute_dtype,
    group_bounds,
    group_rows,
    resolve_backend,
    segment_swiglu,
)

__all__ = ["ExpertsBase", "MLPExperts", "ModuleListExperts", "SwiGLUExperts", "as_experts"]


def _gelu_tanh(t: Tensor) -> Tensor:
    return F.gelu(t, approximate="tanh")


# module-level functions, not lambdas: experts must pickle and deepcopy
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    return value


def _scale_rows(y_SX: Tensor, weights_S: Tensor) -> Tensor:
    return y_SX * weights_S.to(y_SX.dtype).unsqueeze(-1)


class ExpertsBase(nn.Module):
    """Interface of experts: ``forward(x_SD, tokens_per_expert_E) -> y_SD``.

    Subclasses implement :meth:`expert_forward` (one expert on its rows); the default
    ``forward`` loops over experts on contiguous slices (the sorted-slice backend).
    """

    num_experts: int
    dim: int
    #: True for experts whose ``forward`` takes ``row_weights_S`` ``[S]`` and returns rows
    #: already multiplied by them (the combine weights), so they can apply the weights where
    #: their tensors are narrowest; :class:`~pytorch_mixtures.MoELayer` then only sums.
    applies_row_weights: ClassVar[bool] = False

    def expert_forward(self, expert: int, x_nD: Tensor) -> Tensor:
        raise NotImplementedError

    def accepts_token_rows(self, x_ND: Tensor, max_rows_per_expert: int | None) -> bool:
        """Whether ``forward`` can take token rows for this call: ``forward(x_ND, counts,
        rows_S=..., row_weights_S=...)`` with ``x_ND`` ``[N, D]`` and the token of each sorted
        row, returning the weighted, summed ``[N, D]`` output. False (the default): the caller
        permutes rows, calls ``forward`` on ``[S, D]`` and combines."""
        return False

    def _check_counts(self, x_SD: Tensor, tokens_per_expert_E: Tensor) -> None:
        if not isinstance(x_SD, Tensor) or x_SD.dim() != 2 or x_SD.shape[-1] != self.dim:
            got = tuple(x_SD.shape) if isinstance(x_SD, Tensor) else type(x_SD).__name__
            raise ValueError(f"x: expected shape [S, {self.dim}], got {got}")
        if not isinstance(tokens_per_expert_E, Tensor) or tokens_per_expert_E.is_floating_point():
            kind = (
                str(tokens_per_expert_E.dtype)
                if isinstance(tokens_per_expert_E, Tensor)
                else type(tokens_per_expert_E).__name__
            )
            raise TypeError(f"tokens_per_expert: expected an integer tensor, got {kind}")
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert: expected shape ({self.num_experts},), "
                f"got {tuple(tokens_per_expert_E.shape)}"
            )

    def forward(
        self,
        x_SD: Tensor,
        tokens_per_expert_E: Tensor,
        *,
        max_rows_per_expert: int | None = None,
    ) -> Tensor:
        """``[S, D]`` expert-sorted rows -> ``[S, D]`` outputs (padding rows zero).

        ``max_rows_per_expert`` (C) is an upper bound on every count, known in capacity mode;
        stacked experts use it for the padded ``bmm`` backend, this loop ignores it.
        """
        self._check_counts(x_SD, tokens_per_expert_E)
        bounds = group_bounds(tokens_per_expert_E)
        if bounds[-1] > x_SD.shape[0]:
            raise ValueError(
                f"tokens_per_expert: counts sum to {bounds[-1]} but x has {x_SD.shape[0]} rows"
            )
        pieces = [
            self.expert_forward(expert, x_SD[bounds[expert] : bounds[expert + 1]])
            for expert in range(self.num_experts)
            if bounds[expert + 1] > bounds[expert]
        ]
        pieces.append(x_SD.new_zeros(x_SD.shape[0] - bounds[-1], self.dim))
        return torch.cat(pieces, dim=0)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        *args: object,
        **kwargs: object,
    ) -> None:
        # torch's own message ("size mismatch for w_in") does not say what is wrong
        for name, param in self.named_parameters(recurse=False):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.dim() >= 1 and saved.shape[0] != param.shape[0]:
                raise ValueError(
                    f"state_dict: expected {self.num_experts} experts "
                    f"({prefix}{name} of shape {tuple(param.shape)}), got a state dict with "
                    f"{saved.shape[0]} experts ({prefix}{name} of shape {tuple(saved.shape)})"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _init_stacked(weight: Tensor, fan_in: int) -> None:
    # nn.Linear's default, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


class MLPExperts(ExpertsBase):
    """E two-layer MLPs ``act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]``, weights stacked.

    Parameters: ``w_in`` ``[E, D, H]``, ``w_out`` ``[E, H, D]``, and with ``bias``
    ``b_in`` ``[E, H]``, ``b_out`` ``[E, D]``. Initialised as ``nn.Linear`` would, per expert.

    Args:
        num_experts: E.
        dim: D.
        hidden_dim: H.
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.
        bias: whether the two projections have biases.
        backend: grouped-matmul backend, ``"auto"`` (default), ``"loop"``, ``"grouped_mm"``
            or ``"bmm"`` (see :mod:`pytorch_mixtures.backends`); may be changed later by
            assigning ``experts.backend``.
    """

    applies_row_weights: ClassVar[bool] = True

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        activation: str = "gelu",
        *,
        bias: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.backend: Backend = check_backend(backend)
        self.num_experts = _check_int("num_experts", num_experts)
        self.dim = _check_int("dim", dim)
        self.hidden_dim = _check_int("hidden_dim", hidden_dim)
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        self.activation = activation
        self._act = _ACTIVATIONS[activation]
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b_in = nn.Parameter(torch.empty(num_experts, hidden_dim)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_stacked(self.w_in, self.dim)
        _init_stacked(self.w_out, self.hidden_dim)
        if self.b_in is not None and self.b_out is not None:
            _init_stacked(self.b_in, self.dim)
            _init_stacked(self.b_out, self.hidden_dim)

    def forward(
        self,
        x_SD: Tensor,
        tokens_per_expert_E: Tensor,
        *,
        max_rows_per_expert: int | None = None,
        row_weights_S: Tensor | None = None,
    ) -> Tensor:
        self._check_counts(x_SD, tokens_per_expert_E)
        backend = resolve_backend(self.backend, x_SD, max_rows_per_expert, self.w_in.dtype)
        rows = group_rows(x_SD, tokens_per_expert_E, backend, max_rows_per_expert)
        hidden = rows.linear(self.w_in, self.b_in).map(self._act)
        y_SD = hidden.linear(self.w_out, self.b_out).rows()
        return y_SD if row_weights_S is None else _scale_rows(y_SD, row_weights_S)

    def expert_forward(self, expert: int, x_nD: Tensor) -> Tensor:
        h_nH = x_nD @ self.w_in[expert]
        if self.b_in is not None:
            h_nH = h_nH + self.b_in[expert]
        y_nD = self._act(h_nH) @ self.w_out[expert]
        if self.b_out is not None:
            y_nD = y_nD + self.b_out[expert]
        return y_nD

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"activation={self.activation!r}, bias={self.b_in is not None}, "
            f"backend={self.backend!r}"
        )


class SwiGLUExperts(ExpertsBase):
    """E SwiGLU FFNs ``(silu(x @ W_gate[e]) * (x @ W_up[e])) @ W_down[e]`` (Shazeer 2020).

    Parameters: ``w_gate_up`` ``[E, D, 2H]`` (gate in the first H columns, up in the last H:
    one matmul instead of two) and ``w_down`` ``[E, H, D]``; no biases (Llama/Mixtral style).

    Args:
        num_experts: E.
        dim: D.
        hidden_dim: H.
        backend: grouped-matmul backend, ``"auto"`` (default), ``"loop"``, ``"grouped_mm"``
            or ``"bmm"`` (see :mod:`pytorch_mixtures.backends`); may be changed later by
            assigning ``experts.backend``.
    """

    applies_row_weights: ClassVar[bool] = True

    def __init__(
        self, num_experts: int, dim: int, hidden_dim: int, *, backend: Backend = "auto"
    ) -> None:
        super().__init__()
        self.backend: Backend = check_backend(backend)
        self.num_experts = _check_int("num_experts", num_experts)
        self.dim = _check_int("dim", dim)
        self.hidden_dim = _check_int("hidden_dim", hidden_dim)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_stacked(self.w_gate_up, self.dim)
        _init_stacked(self.w_down, self.hidden_dim)

    def forward(
        self,
        x_SD: Tensor,
        tokens_per_expert_E: Tensor,
        *,
        max_rows_per_expert: int | None = None,
        row_weights_S: Tensor | None = None,
        rows_S: Tensor | None = None,
    ) -> Tensor:
        """``[S, D]`` sorted rows -> ``[S, D]``; with ``rows_S`` (see :meth:`accepts_token_rows`)
        ``x`` is ``[N, D]`` token rows, sorted row r reads token ``rows_S[r]``, and the weighted
        outputs are summed into ``[N, D]`` without ``[S, D]`` copies."""
        self._check_counts(x_SD, tokens_per_expert_E)
        if rows_S is not None:
            if not self.accepts_token_rows(x_SD, max_rows_per_expert):
                raise ValueError(
                    "rows_S: token rows need the 'loop' backend on CPU (accepts_token_rows); "
                    f"got backend={self.backend!r} on {x_SD.device.type}"
                )
            if not isinstance(rows_S, Tensor) or rows_S.dim() != 1 or rows_S.dtype != torch.long:
                got = (
                    f"{rows_S.dtype} {tuple(rows_S.shape)}"
                    if isinstance(rows_S, Tensor)
                    else type(rows_S).__name__
                )
                raise TypeError(f"rows_S: expected a 1-D int64 tensor, got {got}")
            return self._segment_swiglu(x_SD, tokens_per_expert_E, row_weights_S, rows_S)
        backend = resolve_backend(self.backend, x_SD, max_rows_per_expert, self.w_down.dtype)
        if backend == "loop":
            return self._segment_swiglu(x_SD, tokens_per_expert_E, row_weights_S, None)
        rows = group_rows(x_SD, tokens_per_expert_E, backend, max_rows_per_expert)
        hidden = rows.linear(self.w_gate_up).map(self._swiglu)
        # (w h) W = w (h W): weight the narrower of hidden [S, H] and output [S, D]
        weight_hidden = (
            row_weights_S is not None and self.hidden_dim < self.dim and hidden.row_ordered
        )
        if weight_hidden:
            assert row_weights_S is not None
            weights = row_weights_S
            hidden = hidden.map(lambda h_SH: _scale_rows(h_SH, weights))
        y_SD = hidden.linear(self.w_down).rows()
        if row_weights_S is None or weight_hidden:
            return y_SD
        return _scale_rows(y_SD, row_weights_S)

    def accepts_token_rows(self, x_ND: Tensor, max_rows_per_expert: int | None) -> bool:
        """True when this call runs the ``"loop"`` backend on CPU (elsewhere the adds into
        token rows would be atomic, so not deterministic) and ``forward`` is this class's."""
        if type(self).forward is not SwiGLUExperts.forward:
            return False  # a subclass's forward may not know ``rows_S``
        if self.backend not in ("auto", "loop") or x_ND.device.type != "cpu":
            return False
        backend = resolve_backend(self.backend, x_ND, max_rows_per_expert, self.w_down.dtype)
        return backend == "loop"

    def _segment_swiglu(
        self, x: Tensor, counts_E: Tensor, row_weights_S: Tensor | None, rows_S: Tensor | None
    ) -> Tensor:
        dtype = compute_dtype(x)
        y, _gate_up = segment_swiglu(
            x.to(dtype),
            self.w_gate_up.to(dtype),
            self.w_down.to(dtype),
            counts_E,
            None if row_weights_S is None else row_weights_S.to(dtype),
            rows_S,
        )
        out: Tensor = y
        return out

    def _swiglu(self, gate_up_n2H: Tensor) -> Tensor:
        gate_nH, up_nH = gate_up_n2H.chunk(2, dim=-1)
        return F.silu(gate_nH) * up_nH

    def expert_forward(self, expert: int, x_nD: Tensor) -> Tensor:
        gate_nH, up_nH = (x_nD @ self.w_gate_up[expert]).chunk(2, dim=-1)
        return (F.silu(gate_nH) * up_nH) @ self.w_down[expert]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"backend={self.backend!r}"
        )


class ModuleListExperts(ExpertsBase):
    """Any list of modules, each mapping ``[n, D] -> [n, D]``, as experts (seed README style).

    Args:
        experts: a non-empty iterable of ``nn.Module``.
        dim: D, used to check every expert's output shape.
    """

    def __init__(self, experts: Iterable[nn.Module], dim: int) -> None:
        super().__init__()
        modules = list(experts)
        if not modules:
            raise ValueError("experts: expected a non-empty list of nn.Module, got an empty list")
        for index, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"experts[{index}]: expected an nn.Module, got {type(module).__name__}"
                )
        _check_same_dtype_and_device(modules)
        self.experts = nn.ModuleList(modules)
        self.num_experts = len(modules)
        self.dim = _check_int("dim", dim)

    def expert_forward(self, expert: int, x_nD: Tensor) -> Tensor:
        try:
            y_nD = self.experts[expert](x_nD)
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError):
                raise
            # typically an expert built for another width: name it instead of a bare matmul error
            raise ValueError(
                f"experts[{expert}]: expected a module mapping [n, {self.dim}] -> "
                f"[n, {self.dim}], but it failed on an input of shape {tuple(x_nD.shape)} "
                f"({x_nD.dtype}, {x_nD.device}): {err}"
            ) from err
        if not isinstance(y_nD, Tensor) or y_nD.shape != x_nD.shape:
            got = tuple(y_nD.shape) if isinstance(y_nD, Tensor) else type(y_nD).__name__
            raise ValueError(
                f"experts[{expert}]: expected output shape {tuple(x_nD.shape)}, got {got}"
            )
        return y_nD.to(x_nD.dtype)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        *args: object,
        **kwargs: object,
    ) -> None:
        list_prefix = prefix + "experts."
        indices = {
            int(key[len(list_prefix) :].split(".", 1)[0])
            for key in state_dict
            if key.startswith(list_prefix) and key[len(list_prefix) :].split(".", 1)[0].isdigit()
        }
        if indices and len(indices) != self.num_experts:
            raise ValueError(
                f"state_dict: expected {self.num_experts} experts under {list_prefix!r}, "
                f"got a state dict with {len(indices)} experts"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_same_dtype_and_device(modules: list[nn.Module]) -> None:
    """All experts' floating-point parameters share one dtype and one device."""
    first: tuple[int, torch.dtype, torch.device] | None = None
    for index, module in enumerate(modules):
        for param in module.parameters():
            if not param.is_floating_point():
                continue
            if first is None:
                first = (index, param.dtype, param.device)
            elif (param.dtype, param.device) != first[1:]:
                raise ValueError(
                    f"experts[{index}]: expected parameters of dtype {first[1]} on {first[2]} "
                    f"(as experts[{first[0]}]), got {param.dtype} on {param.device}"
                )
            break


def as_experts(experts: ExpertsBase | Iterable[nn.Module], dim: int) -> ExpertsBase:
    """Return ``experts`` as an :class:`ExpertsBase`, wrapping a list of modules if needed."""
    if isinstance(experts, ExpertsBase):
        return experts
    if isinstance(experts, nn.Module) and not isinstance(experts, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            "experts: expected MLPExperts/SwiGLUExperts or a list of nn.Module, "
            f"got a single {type(experts).__name__}"
        )
    if isinstance(experts, (str, bytes)) or not isinstance(experts, Iterable):
        raise TypeError(
            f"experts: expected MLPExperts/SwiGLUExperts or a list of nn.Module, "
            f"got {type(experts).__name__}"
        )
    return ModuleListExperts(experts, dim)
