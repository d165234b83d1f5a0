"""Checkpoints of a training run: weights, optimizer state and a JSON sidecar in one folder.

Weights in safetensors (``model.safetensors``), optimizer state via ``torch.save`` (reloaded
with ``weights_only=True``) and a JSON sidecar (``state.json``) with the step, both configs and
the metric history, so :func:`~pytorch_mixtures.app.train.train` can resume a run exactly.
Unrelated to :func:`pytorch_mixtures.distributed.save_checkpoint`, which saves a model (and
optimizer) with ``torch.distributed.checkpoint`` for any number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..models import TransformerLM

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = ["load_run_checkpoint", "save_run_checkpoint"]

_WEIGHTS, _OPTIMIZER, _STATE = "model.safetensors", "optimizer.pt", "state.json"


def save_run_checkpoint(
    out: Path,
    model: TransformerLM,
    optimizer: torch.optim.Optimizer,
    train_config: TrainConfig,
    step: int,
    history: list[dict[str, Any]],
    evals: list[dict[str, Any]],
) -> None:
    """Write ``model.safetensors``, ``optimizer.pt`` and ``state.json`` into ``out``."""
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / _WEIGHTS))
    torch.save(optimizer.state_dict(), out / _OPTIMIZER)
    state = {
        "step": step,
        "model_config": dataclasses.asdict(model.config),
        "train_config": dataclasses.asdict(train_config),
        "history": history,
        "evals": evals,
    }
    # write then rename: an interrupted save never leaves a half-written sidecar
    tmp = out / (_STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(out / _STATE)


def load_run_checkpoint(
    out: Path,
    model: TransformerLM,
    optimizer: torch.optim.Optimizer | None = None,
    train_config: TrainConfig | None = None,
) -> dict[str, Any]:
    """Load weights (and optimizer state) from ``out``; return the JSON sidecar.

    Raises:
        ValueError: no checkpoint in ``out``, or it was made for a different model config (or
            a different ``train_config``, when given).
    """
    from safetensors.torch import load_model

    state_path = out / _STATE
    if not state_path.is_file():
        raise ValueError(f"resume: expected a checkpoint ({_STATE}) in '{out}', found none")
    state: dict[str, Any] = json.loads(state_path.read_text())
    saved = state["model_config"]
    current = json.loads(json.dumps(dataclasses.asdict(model.config)))
    if saved != current:
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        raise ValueError(f"resume: the checkpoint's model config differs (saved, given): {diff}")
    if train_config is not None:
        saved_train = state["train_config"]
        given = dataclasses.asdict(train_config)
        diff = {k: (saved_train.get(k), v) for k, v in given.items() if saved_train.get(k) != v}
        if diff:
            raise ValueError(
                f"resume: the checkpoint's training config differs (saved, given): {diff}; "
                "a resumed run must keep the schedule to continue the same loss curve"
            )
    load_model(model, str(out / _WEIGHTS))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(out / _OPTIMIZER, weights_only=True))
    return state
