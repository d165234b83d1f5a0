"""The one validator set: clear errors for bad arguments and inputs, named by argument.

Every public class and function validates through these, so the same mistake gets the same
message everywhere: ``"<argument>: expected <what>, got <value>"``, a ``TypeError`` for the
wrong kind of value and a ``ValueError`` for a value out of range or of the wrong shape.

* Scalars: :func:`check_int`, :func:`check_flag`, :func:`check_nonnegative_float`,
  :func:`check_capacity_factor`.
* Tensors: :func:`check_features` (``x``), :func:`check_mask` (``attention_mask``),
  :func:`check_shape` (``position_ids`` and other per-token tensors), :func:`check_token_ids`,
  :func:`check_input_matches` (device and dtype against a layer's parameters).
* Runtime: :func:`raise_if_nonfinite` (``check_finite=True``), :func:`name_layers` /
  :func:`layer_label` (which layer failed).
* Paths: :func:`readable_file` and :func:`load_state_dict_file` live in
  :mod:`pytorch_mixtures.files` (re-exported here, their 0.2 home).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .files import load_state_dict_file, readable_file

__all__ = [
    "call_user_module",
    "check_capacity_factor",
    "check_features",
    "check_flag",
    "check_input_matches",
    "check_int",
    "check_mask",
    "check_mask_values",
    "check_nonnegative_float",
    "check_shape",
    "check_token_ids",
    "layer_label",
    "load_state_dict_file",
    "name_layers",
    "raise_if_nonfinite",
    "readable_file",
]


def _kind(value: object) -> str:
    """What a value is, for "got ..." (a tensor's dtype, else its type's name)."""
    return str(value.dtype) if isinstance(value, Tensor) else type(value).__name__


# --- scalars -------------------------------------------------------------------------------


def check_int(name: str, value: object, low: int | None = 1, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]`` (None: no bound that side)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is None:
            bounds = f"<= {high}"
        elif high is None:
            bounds = f">= {low}"
        else:
            bounds = f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an integer {bounds}, got {value}")
    return value


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool: a string such as ``"no"`` is truthy and must not pass."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} ({value!r})")
    return value


def check_nonnegative_float(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number >= 0 (loss weights, rates, noise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite float >= 0, got {value}")
    return float(value)


def check_capacity_factor(value: object, allow_none: bool = True) -> float | None:
    """A capacity factor: None (dropless, when allowed) or a finite float > 0."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"capacity_factor: expected a positive float or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"capacity_factor: expected a finite value > 0, got {value}")
    return float(value)


# --- tensors -------------------------------------------------------------------------------


def check_features(x: object, dim: int, ranks: tuple[int, ...] | None, layout: str) -> Tensor:
    """``x`` if it is a floating-point tensor ``[..., dim]`` of one of ``ranks`` dimensions.

    Args:
        x: the input.
        dim: the required last dimension D.
        ranks: allowed numbers of dimensions (None: any with at least one).
        layout: the expected shape as the message shows it, e.g. ``"[B, T, 512] or [N, 512]"``.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point Tensor {layout}, got {_kind(x)}")
    rank_ok = x.dim() >= 1 if ranks is None else x.dim() in ranks
    if not rank_ok or x.shape[-1] != dim:
        raise ValueError(f"x: expected shape {layout}, got {tuple(x.shape)}")
    return x


def check_mask(
    attention_mask: object, x: Tensor, shapes: tuple[tuple[int, ...], ...]
) -> Tensor | None:
    """A padding mask (1 = token, 0 = padding) of one of ``shapes``, as bool; None stays None.

    Args:
        attention_mask: the mask, or None.
        x: the input it masks (the mask must be on its device).
        shapes: accepted shapes; the first is the one the message names.
    """
    if attention_mask is None:
        return None
    expected = tuple(shapes[0])
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"attention_mask: expected a Tensor of shape {expected} (1 = token, 0 = padding), "
            f"got {type(attention_mask).__name__}"
        )
    if tuple(attention_mask.shape) not in {tuple(s) for s in shapes}:
        raise ValueError(
            f"attention_mask: expected shape {expected} (1 = token, 0 = padding), "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.is_complex():
        raise TypeError(
            f"attention_mask: expected a bool, integer or float 0/1 tensor, "
            f"got {attention_mask.dtype}"
        )
    if attention_mask.device != x.device:
        raise ValueError(
            f"attention_mask: expected a tensor on {x.device} (as x), "
            f"got one on {attention_mask.device}"
        )
    check_mask_values(attention_mask)
    return attention_mask.bool()


def check_mask_values(attention_mask: Tensor) -> None:
    """A non-bool mask must hold only 0 and 1: an additive mask (0 / -inf), 2, -1 or NaN must
    not be read as "real token". One reduction (and a host sync); skipped under compile."""
    if attention_mask.dtype == torch.bool or torch.compiler.is_compiling():
        return
    bad = (attention_mask != 0) & (attention_mask != 1)
    if bool(bad.any()):
        value = attention_mask[bad][0].item()
        raise ValueError(
            "attention_mask: expected bool or 0/1 values (1 = token, 0 = padding), got "
            f"{value!r}; an additive mask (0 = keep, -inf = padding) converts with "
            "`attention_mask == 0`"
        )


def check_shape(name: str, value: object, shape: tuple[int, ...]) -> Tensor | None:
    """``value`` if it is None or a tensor of exactly ``shape`` (per-token side inputs)."""
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name}: expected a Tensor of shape {tuple(shape)}, got {type(value).__name__}"
        )
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
    return value


def check_token_ids(
    token_ids: object,
    shape: tuple[int, ...],
    vocab_size: int | None = None,
    expected_device: torch.device | None = None,
) -> Tensor:
    """Token ids of exactly ``shape`` (the input's leading shape), integers (not bool), in
    ``[0, vocab_size)`` when it is given; returned flat int64."""
    if token_ids is None:
        raise ValueError(
            "token_ids: expected the input's token ids (this router routes on them), got None; "
            "pass them as moe(x, token_ids=input_ids) or router(x, token_ids=input_ids)"
        )
    if (
        not isinstance(token_ids, Tensor)
        or token_ids.is_floating_point()
        or token_ids.is_complex()
        or token_ids.dtype == torch.bool
    ):
        raise TypeError(f"token_ids: expected an integer Tensor, got {_kind(token_ids)}")
    if expected_device is not None and token_ids.device != expected_device:
        raise ValueError(
            f"token_ids: expected a tensor on {expected_device} (as x), got one on "
            f"{token_ids.device}"
        )
    if tuple(token_ids.shape) != tuple(shape):
        raise ValueError(
            f"token_ids: expected shape {tuple(shape)} (one id per token, as x's leading "
            f"dimensions), got {tuple(token_ids.shape)}"
        )
    ids_N = token_ids.reshape(-1).long()
    if vocab_size is not None and torch.compiler.is_compiling():  # no host sync in a graph
        in_range = ((ids_N >= 0) & (ids_N < vocab_size)).all()
        torch._assert_async(in_range, f"token_ids: expected ids in [0, {vocab_size})")
        return ids_N
    if vocab_size is not None and ids_N.numel() and (ids_N.min() < 0 or ids_N.max() >= vocab_size):
        raise ValueError(
            f"token_ids: expected ids in [0, {vocab_size}), "
            f"got min {int(ids_N.min())}, max {int(ids_N.max())}"
        )
    return ids_N


def check_input_matches(x: Tensor, module: nn.Module) -> None:
    """Raise if ``x`` is on another device than ``module``'s parameters, or (outside autocast)
    of another floating dtype."""
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is None:
        return
    if x.device != param.device:
        raise ValueError(
            f"x: expected a tensor on {param.device} (the layer's parameters), "
            f"got one on {x.device}"
        )
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"x: expected dtype {param.dtype} (the layer's parameters), got {x.dtype}; "
            "cast the input or the layer, or run under torch.autocast"
        )


# --- runtime -------------------------------------------------------------------------------


def call_user_module(
    name: str, module: nn.Module, mapping: str, x: Tensor, **kwargs: object
) -> object:
    """``module(x, **kwargs)`` for a module the user gave (experts, a block): a RuntimeError
    inside, typically a module built for another width or dtype, becomes a ``ValueError``
    naming it (``name``) and what it should map (``mapping``, e.g. ``"[n, 512] -> [n, 512]"``)
    instead of a bare matmul error."""
    try:
        return module(x, **kwargs)
    except RuntimeError as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise ValueError(
            f"{name}: expected a module mapping {mapping}, but it failed on an input of shape "
            f"{tuple(x.shape)} ({x.dtype}, {x.device}): {err}"
        ) from err


def name_layers(model: nn.Module) -> nn.Module:
    """Record each submodule's qualified name (``"layers.1.ffn"``) on every module that has a
    ``layer_name`` attribute (``MoELayer``, ...), for error messages. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if hasattr(module, "layer_name"):
            module.layer_name = name or type(module).__name__
    return model


def layer_label(module: nn.Module) -> str:
    """``"MoELayer 'layers.1.ffn'"`` when named by :func:`name_layers`, else class and id."""
    name = getattr(module, "layer_name", None)
    if name:
        return f"{type(module).__name__} {name!r}"
    return f"{type(module).__name__} at {id(module):#x} (name it with pm.checks.name_layers)"


def raise_if_nonfinite(
    module: nn.Module, what: str, tensor: Tensor, mask: Tensor | None = None
) -> None:
    """Raise ``FloatingPointError`` naming ``module`` if ``tensor`` ``[..., D]`` holds NaN/inf
    in a real token (``mask``, bool of ``tensor.shape[:-1]``: padding rows are not checked).

    One host sync; used by layers built with ``check_finite=True``. Under ``torch.compile``
    an asynchronous device assert instead (no sync in the graph; a shorter message).
    """
    bad_rows = ~torch.isfinite(tensor.detach()).reshape(-1, tensor.shape[-1]).all(dim=-1)
    if mask is not None:
        bad_rows = bad_rows & mask.reshape(-1)
    if torch.compiler.is_compiling():
        torch._assert_async(
            ~bad_rows.any(), f"{type(module).__name__}: non-finite {what} (NaN or inf)"
        )
        return
    count = int(bad_rows.sum())
    if count:
        first = int(bad_rows.nonzero()[0, 0])
        raise FloatingPointError(
            f"{layer_label(module)}: non-finite {what}: {count} of {bad_rows.numel()} tokens "
            f"hold NaN or inf (first: token {first} of the flattened [N, D] view)"
        )
