"""Checkpoints of a training run that survive a kill at any moment, verified on load.

A run folder ``out`` holds complete checkpoint folders ``step-<step>-<id>/``, each with the
weights (``model.safetensors``), the optimizer state (``optimizer.pt``, reloaded with
``weights_only=True``), a JSON sidecar (``state.json``: step, both configs, the metric
history) and a ``manifest.json`` of every file's size and SHA-256; and a pointer file
``LATEST`` naming the newest complete one.

Saving writes a new folder under a temporary name, fsyncs every file, renames the folder into
place, then replaces ``LATEST`` (write, fsync, rename) and only then deletes older folders: a
process killed at any moment leaves ``LATEST`` naming a complete checkpoint (the previous or
the new one), never a half-written one. Loading checks the manifest and names the file that
does not match. Unrelated to :func:`pytorch_mixtures.distributed.save_checkpoint`, which saves
a model (and optimizer) with ``torch.distributed.checkpoint`` for any number of ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..models import TransformerLM

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = ["checkpoint_dir", "load_run_checkpoint", "save_run_checkpoint"]

_WEIGHTS, _OPTIMIZER, _STATE = "model.safetensors", "optimizer.pt", "state.json"
_MANIFEST, _POINTER, _INCOMPLETE = "manifest.json", "LATEST", ".incomplete-"


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def save_run_checkpoint(
    out: Path,
    model: TransformerLM,
    optimizer: torch.optim.Optimizer,
    train_config: TrainConfig,
    step: int,
    history: list[dict[str, Any]],
    evals: list[dict[str, Any]],
) -> Path:
    """Write a complete checkpoint folder into ``out`` atomically; return its path."""
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp = out / (_INCOMPLETE + name)
    tmp.mkdir()
    save_model(model, str(tmp / _WEIGHTS))
    torch.save(optimizer.state_dict(), tmp / _OPTIMIZER)
    state = {
        "step": step,
        "model_config": dataclasses.asdict(model.config),
        "train_config": dataclasses.asdict(train_config),
        "history": history,
        "evals": evals,
    }
    (tmp / _STATE).write_text(json.dumps(state, indent=1))
    files = (_WEIGHTS, _OPTIMIZER, _STATE)
    manifest = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _digest(tmp / f)} for f in files}
    (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
    for file in (*files, _MANIFEST):
        _fsync(tmp / file)
    _fsync(tmp)
    final = out / name
    tmp.rename(final)
    pointer_tmp = out / (_POINTER + ".tmp")
    pointer_tmp.write_text(name + "\n")
    _fsync(pointer_tmp)
    pointer_tmp.replace(out / _POINTER)
    _fsync(out)
    # only now is the previous checkpoint no longer needed (nor any interrupted save)
    for old in out.iterdir():
        is_checkpoint = old.name.startswith(("step-", _INCOMPLETE))
        if old.is_dir() and is_checkpoint and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir(out: Path) -> Path | None:
    """The newest complete checkpoint folder in ``out`` (None when there is none).

    A run folder written before checkpoints had their own folders (the files directly in
    ``out``, no manifest) is returned as ``out`` itself.
    """
    pointer = out / _POINTER
    if pointer.is_file():
        folder = out / pointer.read_text().strip()
        if not folder.is_dir():
            raise ValueError(f"resume: '{pointer}' names '{folder.name}', which is missing")
        return folder
    if (out / _STATE).is_file():
        return out
    return None


def _verify(folder: Path) -> None:
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return  # a run folder from before manifests: nothing to verify against
    try:
        manifest: dict[str, dict[str, Any]] = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"resume: '{manifest_path}' is not a readable manifest ({err})") from err
    for name, want in manifest.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"resume: checkpoint file '{path}' is missing")
        size = path.stat().st_size
        if size != want["bytes"] or _digest(path) != want["sha256"]:
            raise ValueError(
                f"resume: checkpoint file '{path}' does not match its manifest "
                f"(expected {want['bytes']} bytes, sha256 {want['sha256'][:12]}..., got {size} "
                "bytes or another hash): it is corrupt or was changed"
            )


def load_run_checkpoint(
    out: Path,
    model: TransformerLM,
    optimizer: torch.optim.Optimizer | None = None,
    train_config: TrainConfig | None = None,
) -> dict[str, Any]:
    """Load the newest complete checkpoint in ``out`` after verifying it; return its sidecar.

    Raises:
        ValueError: no checkpoint in ``out``; a file that is missing, corrupt or unreadable
            (named); or a checkpoint made for a different model config (or a different
            ``train_config``, when given).
    """
    from safetensors.torch import load_model

    folder = checkpoint_dir(out)
    if folder is None:
        raise ValueError(
            f"resume: expected a checkpoint ({_POINTER} or {_STATE}) in '{out}', found none"
        )
    _verify(folder)
    try:
        state: dict[str, Any] = json.loads((folder / _STATE).read_text())
        saved = state["model_config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"resume: '{folder / _STATE}' is not a run sidecar ({err!r})") from err
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
    try:
        load_model(model, str(folder / _WEIGHTS))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(folder / _OPTIMIZER, weights_only=True))
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"resume: the checkpoint in '{folder}' does not load ({err})") from err
    return state
