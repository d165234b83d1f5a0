"""Reading user files safely: paths checked before use, state dicts without pickle.

:func:`readable_file` checks a user-given path (exists, a regular non-empty readable file) and
names the argument when it is not.

:func:`load_state_dict_file` loads ``*.safetensors`` with safetensors and anything else with
``torch.load(weights_only=True)``: tensors and plain containers only, never code execution, so
a file from elsewhere cannot run anything when loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["load_state_dict_file", "readable_file"]


def readable_file(path: str | os.PathLike[str], argument: str) -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is an existing, non-empty, readable file.

    Raises ``ValueError`` naming ``argument`` (``"--data"``, ``"checkpoint"``) otherwise.
    """
    if not isinstance(argument, str):
        raise TypeError(f"argument: expected the argument's name as a str, got {argument!r}")
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
