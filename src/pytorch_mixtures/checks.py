"""Reliability helpers: clear errors for bad inputs, non-finite values, files and checkpoints.

* :func:`name_layers` gives every library layer inside a model its qualified module name, so
  errors (``MoELayer(check_finite=True)``) say which layer failed.
* :func:`check_input_matches` rejects an input on another device, or of another dtype than the
  layer's parameters outside autocast, before an opaque matmul error does.
* :func:`raise_if_nonfinite` is the ``check_finite`` test.
* :func:`readable_file` and :func:`load_state_dict_file` validate user-given paths and load
  checkpoints safely (``torch.load(weights_only=True)`` or safetensors, never plain pickle).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "check_input_matches",
    "layer_label",
    "load_state_dict_file",
    "name_layers",
    "raise_if_nonfinite",
    "readable_file",
]


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


def raise_if_nonfinite(module: nn.Module, what: str, tensor: Tensor) -> None:
    """Raise ``FloatingPointError`` naming ``module`` if ``tensor`` ``[..., D]`` holds NaN/inf.

    One host sync; used by layers built with ``check_finite=True``.
    """
    bad_rows = ~torch.isfinite(tensor.detach()).reshape(-1, tensor.shape[-1]).all(dim=-1)
    count = int(bad_rows.sum())
    if count:
        first = int(bad_rows.nonzero()[0, 0])
        raise FloatingPointError(
            f"{layer_label(module)}: non-finite {what}: {count} of {bad_rows.numel()} tokens "
            f"hold NaN or inf (first: token {first} of the flattened [N, D] view)"
        )


def readable_file(path: str | os.PathLike[str], argument: str) -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is an existing, non-empty, readable file.

    Raises ``ValueError`` naming ``argument`` (``"--data"``, ``"checkpoint"``) otherwise.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument}: expected a file path, got {type(path).__name__}")
    file = Path(path)
    if not file.exists():
        raise ValueError(f"{argument}: expected an existing file, got {str(file)!r} (not found)")
    if file.is_dir():
        raise ValueError(f"{argument}: expected a file, got {str(file)!r} (a directory)")
    if not file.is_file():
        raise ValueError(f"{argument}: expected a regular file, got {str(file)!r}")
    if file.stat().st_size == 0:
        raise ValueError(f"{argument}: expected a non-empty file, got {str(file)!r} (0 bytes)")
    if not os.access(file, os.R_OK):
        raise ValueError(f"{argument}: expected a readable file, got {str(file)!r} (no access)")
    return file


def load_state_dict_file(
    path: str | os.PathLike[str], argument: str = "checkpoint"
) -> dict[str, Tensor]:
    """Load a state dict safely: ``*.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)`` (tensors and plain containers only, no code execution).

    Raises ``ValueError`` naming ``argument`` for a missing, empty or unreadable file, or one
    that holds no state dict.
    """
    file = readable_file(path, argument)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: object = load_file(str(file))
        except Exception as err:
            raise ValueError(
                f"{argument}: expected a safetensors file, got {str(file)!r} ({err})"
            ) from err
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{argument}: expected a checkpoint written by torch.save (tensors only), "
                f"got {str(file)!r} ({type(err).__name__}: {err})"
            ) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{argument}: expected a state dict (str -> Tensor), got {type(state).__name__} "
            f"from {str(file)!r}"
        )
    return state
