"""Experts: E feed-forward networks applied to expert-sorted rows.

Every experts module has one call, ``experts(x_SD, tokens_per_expert_E) -> y_SD``, where the
rows of ``x_SD`` are grouped by expert (the first ``tokens_per_expert[0]`` rows go to expert 0,
the next to expert 1, ...), as :mod:`pytorch_mixtures.dispatch` lays them out. Rows past
``tokens_per_expert.sum()`` are padding: their output is zero. Outputs are not weighted: the
dispatcher's combine applies the router's weights. Inside a layer the dispatcher also passes its
``plan`` (the backend it resolved for the call, the capacity bound, and, for experts that fuse
the combine, the token rows and weights).

* :class:`MLPExperts` and :class:`SwiGLUExperts` keep the E experts' weights stacked as
  ``[E, ...]`` tensors (the layout grouped-matmul kernels want).
* :class:`ModuleListExperts` wraps any list of ``nn.Module`` mapping ``[n, D] -> [n, D]``.

Shape legend: S rows, N tokens, D model dim, H expert hidden dim, E experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import (
    Backend,
    ConcreteBackend,
    check_backend,
    compute_dtype,
    group_rows,
    resolve_backend,
)
from .checks import call_user_module, check_flag, check_input_matches, check_int
from .kernels import group_bounds, segment_swiglu

if TYPE_CHECKING:
    from .dispatch import DispatchPlan

__all__ = ["ExpertsBase", "MLPExperts", "ModuleListExperts", "SwiGLUExperts", "as_experts"]


def _gelu_tanh(t: Tensor) -> Tensor:
    return F.gelu(t, approximate="tanh")


def _gelu_10(t: Tensor) -> Tensor:
    # transformers' "gelu_10": GELU clipped to [-10, 10] (for int8 quantization)
    return torch.clip(F.gelu(t), -10.0, 10.0)


def _quick_gelu(t: Tensor) -> Tensor:
    return t * torch.sigmoid(1.702 * t)


def _relu2(t: Tensor) -> Tensor:
    # squared ReLU (So et al. 2021, Primer)
    return F.relu(t).square()


def _laplace(t: Tensor) -> Tensor:
    # transformers' "laplace" (MEGA): 0.5 * (1 + erf((x - mu) / (sigma * sqrt 2)))
    return 0.5 * (1.0 + torch.erf((t - 0.707107) / (0.282095 * math.sqrt(2.0))))


def _sqrt_softplus(t: Tensor) -> Tensor:
    return F.softplus(t).sqrt()


def _identity(t: Tensor) -> Tensor:
    return t


# module-level functions, not lambdas: experts must pickle and deepcopy. The names beyond the
# first four are those of transformers' ACT2FN, so converted models keep their activation.
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "gelu_10": _gelu_10,
    "hardswish": F.hardswish,
    "identity": _identity,
    "laplace": _laplace,
    "leaky_relu": F.leaky_relu,
    "mish": F.mish,
    "quick_gelu": _quick_gelu,
    "relu2": _relu2,
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": _sqrt_softplus,
    "tanh": torch.tanh,
}


def _check_activation(activation: object) -> str:
    if not isinstance(activation, str) or activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    return activation


class ExpertsBase(nn.Module):
    """Interface of experts.

    ``forward(x, tokens_per_expert_E, *, max_rows_per_expert=None, plan=None) -> y`` maps
    ``[S, D]`` expert-sorted rows to ``[S, D]`` unweighted outputs (padding rows zero).
    ``max_rows_per_expert`` (C) is an upper bound on every count, known in capacity mode (the
    padded ``bmm`` backend needs it); inside a layer the dispatcher passes its ``plan``
    instead, which carries C and the backend it resolved. When ``plan.fuse_combine`` is True
    (only for experts whose :meth:`fuses_combine` said so), ``x`` is the ``[N, D]`` token rows
    and the result is the combined ``[N, D]`` output.

    ``forward`` is the one preamble (checks, backend); subclasses implement :meth:`run`.
    """

    num_experts: int
    dim: int
    #: grouped-matmul backend (see :mod:`pytorch_mixtures.backends`); stacked experts take it
    #: as an argument, a module list always loops
    backend: Backend = "loop"

    def expert_forward(self, index: int, x_nD: Tensor) -> Tensor:
        """Expert ``index`` alone on its rows ``[n, D] -> [n, D]``, unweighted.

        The one method a custom experts class must implement (the default :meth:`run` loops
        over it); stacked experts implement it too, for the decode path
        (:func:`pytorch_mixtures.dispatch.run_chosen_experts`)."""
        raise NotImplementedError(f"{type(self).__name__} implements no expert_forward")

    @property
    def single_expert_calls(self) -> bool:
        """Whether :meth:`expert_forward` is implemented (the decode path needs it)."""
        return type(self).expert_forward is not ExpertsBase.expert_forward

    def chosen_forward(self, x_ND: Tensor, expert_ids_NK: Tensor) -> Tensor:
        """Each token through each of its K chosen experts, ``[N, D]``, ``[N, K]`` int64 ids
        (all ``< E``) -> ``[N, K, D]`` unweighted, in shapes fixed by ``N`` and ``K`` alone and
        with no host read of the ids: the compiled decode path
        (:func:`pytorch_mixtures.dispatch.run_chosen_experts` under ``torch.compile``).
        Optional; stacked experts implement it."""
        raise NotImplementedError(f"{type(self).__name__} implements no chosen_forward")

    @property
    def static_chosen_calls(self) -> bool:
        """Whether :meth:`chosen_forward` is implemented (the compiled decode path needs it)."""
        return type(self).chosen_forward is not ExpertsBase.chosen_forward

    def resolve_backend(self, x: Tensor, max_rows_per_expert: int | None) -> ConcreteBackend:
        """The concrete backend for a call on ``x`` (``"auto"`` resolved, choices checked)."""
        param = next((p for p in self.parameters() if p.is_floating_point()), None)
        weight_dtype = x.dtype if param is None else param.dtype
        return resolve_backend(self.backend, x, max_rows_per_expert, weight_dtype)

    def fuses_combine(self, x_ND: Tensor, backend: ConcreteBackend) -> bool:
        """Whether, for this call, ``forward`` reads token rows and applies the dispatcher's
        combine itself (``plan.fuse_combine``). False unless a subclass fuses it."""
        return False

    def _check_counts(self, x_SD: Tensor, tokens_per_expert_E: Tensor) -> None:
        if isinstance(x_SD, Tensor) and not x_SD.is_floating_point():
            raise TypeError(
                f"x: expected a floating-point tensor [S, {self.dim}], got {x_SD.dtype}"
            )
        if not isinstance(x_SD, Tensor) or x_SD.dim() != 2 or x_SD.shape[-1] != self.dim:
            got = tuple(x_SD.shape) if isinstance(x_SD, Tensor) else type(x_SD).__name__
            raise ValueError(f"x: expected shape [S, {self.dim}], got {got}")
        check_input_matches(x_SD, self)
        if not isinstance(tokens_per_expert_E, Tensor) or tokens_per_expert_E.is_floating_point():
            kind = (
                str(tokens_per_expert_E.dtype)
                if isinstance(tokens_per_expert_E, Tensor)
                else type(tokens_per_expert_E).__name__
            )
            raise TypeError(f"tokens_per_expert: expected an integer tensor, got {kind}")
        if tokens_per_expert_E.device != x_SD.device:
            raise ValueError(
                f"tokens_per_expert: expected a tensor on {x_SD.device} (as x), got one on "
                f"{tokens_per_expert_E.device}"
            )
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert: expected shape ({self.num_experts},), "
                f"got {tuple(tokens_per_expert_E.shape)}"
            )
        if x_SD.device.type != "cpu" or torch.compiler.is_compiling():
            # a device assert, not a host sync: grouped_mm / bmm must not wait on the device
            torch._assert_async(
                (tokens_per_expert_E >= 0).all(), "tokens_per_expert: expected counts >= 0"
            )
        elif bool((tokens_per_expert_E < 0).any()):
            raise ValueError(
                f"tokens_per_expert: expected counts >= 0, got {tokens_per_expert_E.tolist()}"
            )

    def forward(
        self,
        x: Tensor,
        tokens_per_expert_E: Tensor,
        *,
        max_rows_per_expert: int | None = None,
        plan: DispatchPlan | None = None,
    ) -> Tensor:
        """``[S, D]`` expert-sorted rows -> ``[S, D]`` unweighted outputs (padding rows zero);
        with a fused-combine plan, ``[N, D]`` token rows -> ``[N, D]`` combined output."""
        self._check_counts(x, tokens_per_expert_E)
        if plan is None:
            backend = self.resolve_backend(x, max_rows_per_expert)
            return self.run(x, tokens_per_expert_E, backend, max_rows_per_expert, None)
        if max_rows_per_expert is not None:
            raise ValueError(
                "max_rows_per_expert: give it or a plan (which carries it), not both; got "
                f"max_rows_per_expert={max_rows_per_expert} and a plan"
            )
        max_rows = plan.max_rows_per_expert
        backend = plan.backend or self.resolve_backend(x, max_rows)
        combine_plan = plan if plan.fuse_combine else None
        if combine_plan is not None and not self.fuses_combine(x, backend):
            raise ValueError(
                f"plan: a fused combine needs experts that fuse it (fuses_combine: SwiGLU "
                f"experts on the 'loop' backend on CPU); got {type(self).__name__} with "
                f"backend={backend!r} on {x.device.type}"
            )
        return self.run(x, tokens_per_expert_E, backend, max_rows, combine_plan)

    def run(
        self,
        x: Tensor,
        tokens_per_expert_E: Tensor,
        backend: ConcreteBackend,
        max_rows_per_expert: int | None,
        combine_plan: DispatchPlan | None,
    ) -> Tensor:
        """The experts' computation on checked input with a concrete ``backend``;
        ``combine_plan`` is the dispatcher's plan when this call also applies the combine (then
        ``x`` is the ``[N, D]`` token rows), else None.

        The default runs :meth:`expert_forward` on each expert's contiguous slice."""
        bounds = group_bounds(tokens_per_expert_E)
        if bounds[-1] > x.shape[0]:
            raise ValueError(
                f"tokens_per_expert: counts sum to {bounds[-1]} but x has {x.shape[0]} rows"
            )
        pieces = [
            self.expert_forward(expert, x[bounds[expert] : bounds[expert + 1]])
            for expert in range(self.num_experts)
            if bounds[expert + 1] > bounds[expert]
        ]
        pieces.append(x.new_zeros(x.shape[0] - bounds[-1], self.dim))
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
        activation: ``"gelu"`` (default), ``"gelu_tanh"``, ``"relu"``, ``"silu"``, or one of
            transformers' activation names (``"quick_gelu"``, ``"relu2"``, ``"mish"``, ...:
            ``experts._ACTIVATIONS``).
        bias: whether the two projections have biases.
        backend: grouped-matmul backend, ``"auto"`` (default), ``"loop"``, ``"grouped_mm"``
            or ``"bmm"`` (see :mod:`pytorch_mixtures.backends`); may be changed later by
            assigning ``experts.backend``.
    """

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
        self.num_experts = check_int("num_experts", num_experts)
        self.dim = check_int("dim", dim)
        self.hidden_dim = check_int("hidden_dim", hidden_dim)
        self.activation = _check_activation(activation)
        self._act = _ACTIVATIONS[activation]
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        check_flag("bias", bias)
        self.b_in = nn.Parameter(torch.empty(num_experts, hidden_dim)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_stacked(self.w_in, self.dim)
        _init_stacked(self.w_out, self.hidden_dim)
        if self.b_in is not None and self.b_out is not None:
            _init_stacked(self.b_in, self.dim)
            _init_stacked(self.b_out, self.hidden_dim)

    def run(
        self,
        x: Tensor,
        tokens_per_expert_E: Tensor,
        backend: ConcreteBackend,
        max_rows_per_expert: int | None,
        combine_plan: DispatchPlan | None,
    ) -> Tensor:
        rows = group_rows(x, tokens_per_expert_E, backend, max_rows_per_expert)
        hidden = rows.linear(self.w_in, self.b_in).map(self._act)
        return hidden.linear(self.w_out, self.b_out).rows()

    def chosen_forward(self, x_ND: Tensor, expert_ids_NK: Tensor) -> Tensor:
        dtype = compute_dtype(x_ND)
        x_ND = x_ND.to(dtype)
        b_in = None if self.b_in is None else self.b_in.to(dtype)
        b_out = None if self.b_out is None else self.b_out.to(dtype)
        return _chosen_stacked(
            x_ND, expert_ids_NK, self.w_in.to(dtype), self.w_out.to(dtype), self._act, b_in, b_out
        )

    def expert_forward(self, index: int, x_nD: Tensor) -> Tensor:
        dtype = compute_dtype(x_nD)
        x_nD = x_nD.to(dtype)
        h_nH = x_nD @ self.w_in[index].to(dtype)
        if self.b_in is not None:
            h_nH = h_nH + self.b_in[index].to(dtype)
        y_nD = self._act(h_nH) @ self.w_out[index].to(dtype)
        if self.b_out is not None:
            y_nD = y_nD + self.b_out[index].to(dtype)
        return y_nD

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"activation={self.activation!r}, bias={self.b_in is not None}, "
            f"backend={self.backend!r}"
        )


def _chosen_stacked(
    x_ND: Tensor,
    expert_ids_NK: Tensor,
    w_in_EDF: Tensor,
    w_out_EHD: Tensor,
    act: Callable[[Tensor], Tensor],
    b_in_EF: Tensor | None = None,
    b_out_ED: Tensor | None = None,
) -> Tensor:
    """``act(x @ w_in[id] + b_in[id]) @ w_out[id] + b_out[id]`` per token and chosen id,
    ``[N, K, D]`` (F is the first projection's width: H, or 2H for a gated pair).

    Written as broadcast products summed over the contracted dim, not as matmuls of
    ``w[ids]``: under ``torch.compile`` the gather fuses into the reduction, so only the chosen
    experts' weights are read and none is copied. That only pays while the slots are few:
    with more slots than experts every expert runs once on every token instead (each weight
    read once, shapes still fixed) and the chosen outputs are picked. Eager PyTorch would
    materialise the gathered weights: only the compiled decode path calls this.
    """
    num_tokens, top_k = expert_ids_NK.shape
    if num_tokens * top_k <= w_in_EDF.shape[0]:
        h_NKF = (x_ND[:, None, :, None] * w_in_EDF[expert_ids_NK]).sum(2)
        if b_in_EF is not None:
            h_NKF = h_NKF + b_in_EF[expert_ids_NK]
        y_NKD = (act(h_NKF)[..., None] * w_out_EHD[expert_ids_NK]).sum(2)
        return y_NKD if b_out_ED is None else y_NKD + b_out_ED[expert_ids_NK]
    h_ENF = torch.matmul(x_ND, w_in_EDF)  # [N, D] @ [E, D, F] -> [E, N, F]
    if b_in_EF is not None:
        h_ENF = h_ENF + b_in_EF[:, None, :]
    y_END = torch.bmm(act(h_ENF), w_out_EHD)
    if b_out_ED is not None:
        y_END = y_END + b_out_ED[:, None, :]
    tokens_NK = torch.arange(num_tokens, device=x_ND.device)[:, None].expand_as(expert_ids_NK)
    return y_END[expert_ids_NK, tokens_NK]


def _swiglu(gate_up_n2H: Tensor) -> Tensor:
    hidden = gate_up_n2H.shape[-1] // 2
    # two slices, not chunk(): chunk dispatches split and narrows (decode calls count ops)
    return F.silu(gate_up_n2H[..., :hidden]) * gate_up_n2H[..., hidden:]


class SwiGLUExperts(ExpertsBase):
    """E gated FFNs ``(act(x @ W_gate[e]) * (x @ W_up[e])) @ W_down[e]`` (Shazeer 2020).

    With the default ``activation="silu"`` these are SwiGLU experts (Llama, Mixtral); another
    activation gives the other GLU variants, e.g. ``"gelu"`` / ``"gelu_tanh"`` for GeGLU
    (Gemma, a Mixtral config with ``hidden_act="gelu"``). The fused CPU kernel
    (:func:`pytorch_mixtures.kernels.segment_swiglu`, which also fuses the combine) is SiLU
    only; other activations run the same stacked matmuls through the grouped-rows path.

    Parameters: ``w_gate_up`` ``[E, D, 2H]`` (gate in the first H columns, up in the last H:
    one matmul instead of two) and ``w_down`` ``[E, H, D]``; no biases (Llama/Mixtral style).

    Args:
        num_experts: E.
        dim: D.
        hidden_dim: H.
        activation: the gate's activation, a name of :class:`MLPExperts`' list (default
            ``"silu"``).
        backend: grouped-matmul backend, ``"auto"`` (default), ``"loop"``, ``"grouped_mm"``
            or ``"bmm"`` (see :mod:`pytorch_mixtures.backends`); may be changed later by
            assigning ``experts.backend``.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        *,
        activation: str = "silu",
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.backend: Backend = check_backend(backend)
        self.num_experts = check_int("num_experts", num_experts)
        self.dim = check_int("dim", dim)
        self.hidden_dim = check_int("hidden_dim", hidden_dim)
        self.activation = _check_activation(activation)
        self._act = _ACTIVATIONS[self.activation]
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def _glu(self, gate_up_n2H: Tensor) -> Tensor:
        """``act(gate) * up`` of ``[..., 2H]`` rows (gate first): ``[..., H]``."""
        if self.activation == "silu":
            return _swiglu(gate_up_n2H)
        hidden = gate_up_n2H.shape[-1] // 2
        return self._act(gate_up_n2H[..., :hidden]) * gate_up_n2H[..., hidden:]

    def reset_parameters(self) -> None:
        _init_stacked(self.w_gate_up, self.dim)
        _init_stacked(self.w_down, self.hidden_dim)

    def run(
        self,
        x: Tensor,
        tokens_per_expert_E: Tensor,
        backend: ConcreteBackend,
        max_rows_per_expert: int | None,
        combine_plan: DispatchPlan | None,
    ) -> Tensor:
        if combine_plan is not None:  # token rows in, weighted and summed token rows out
            return self._segment_swiglu(
                x, tokens_per_expert_E, combine_plan.weights, combine_plan.token_rows
            )
        if backend == "loop" and self.activation == "silu":
            return self._segment_swiglu(x, tokens_per_expert_E, None, None)
        rows = group_rows(x, tokens_per_expert_E, backend, max_rows_per_expert)
        return rows.linear(self.w_gate_up).map(self._glu).linear(self.w_down).rows()

    def fuses_combine(self, x_ND: Tensor, backend: ConcreteBackend) -> bool:
        """True for SiLU experts on the ``"loop"`` backend on CPU (elsewhere the adds into token
        rows would be atomic, so not deterministic; the fused kernel is SiLU only), unless a
        subclass replaced the computation."""
        if type(self).run is not SwiGLUExperts.run or type(self).forward is not ExpertsBase.forward:
            return False  # a subclass's computation may not know fused plans
        return self.activation == "silu" and backend == "loop" and x_ND.device.type == "cpu"

    def expert_forward(self, index: int, x_nD: Tensor) -> Tensor:
        dtype = compute_dtype(x_nD)
        gate_up_n2H = torch.mm(x_nD.to(dtype), self.w_gate_up[index].to(dtype))
        return torch.mm(self._glu(gate_up_n2H), self.w_down[index].to(dtype))

    def chosen_forward(self, x_ND: Tensor, expert_ids_NK: Tensor) -> Tensor:
        dtype = compute_dtype(x_ND)
        x_ND = x_ND.to(dtype)
        return _chosen_stacked(
            x_ND, expert_ids_NK, self.w_gate_up.to(dtype), self.w_down.to(dtype), self._glu
        )

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

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
        )


class ModuleListExperts(ExpertsBase):
    """Any list of modules, each mapping ``[n, D] -> [n, D]``, as experts (seed README style).

    Args:
        experts: a non-empty iterable of ``nn.Module``.
        dim: D, used to check every expert's output shape.
    """

    def __init__(self, experts: Iterable[nn.Module], dim: int) -> None:
        super().__init__()
        if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList):
            raise TypeError(
                f"experts: expected a list of nn.Module, got a single {type(experts).__name__}"
            )
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
        self.dim = check_int("dim", dim)

    def expert_forward(self, index: int, x_nD: Tensor) -> Tensor:
        mapping = f"[n, {self.dim}] -> [n, {self.dim}]"
        y_nD = call_user_module(f"experts[{index}]", self.experts[index], mapping, x_nD)
        if not isinstance(y_nD, Tensor) or y_nD.shape != x_nD.shape:
            got = tuple(y_nD.shape) if isinstance(y_nD, Tensor) else type(y_nD).__name__
            raise ValueError(
                f"experts[{index}]: expected output shape {tuple(x_nD.shape)}, got {got}"
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
    if isinstance(experts, nn.Sequential):  # a pipeline of layers (one MLP?), not a list
        raise TypeError(
            "experts: expected MLPExperts/SwiGLUExperts or a list of nn.Module (a Python list "
            "or nn.ModuleList), got an nn.Sequential, which reads as one module chain"
        )
    if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList):
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
