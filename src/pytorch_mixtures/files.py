"""Reading state-dict files safely.

:func:`load_state_dict_file` loads ``*.safetensors`` with safetensors and anything else with
``torch.load(weights_only=True)``: tensors and plain containers only, never code execution, so
a file from elsewhere cannot run anything when loaded.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .checks import readable_file

__all__ = ["load_state_dict_file"]


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
