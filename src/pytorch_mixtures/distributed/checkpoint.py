"""Distributed checkpoints of expert-parallel models under the *unsharded* model's keys.

Stacked expert weights (and their optimizer state) appear as ``DTensor`` s sharded on the expert
dimension, module-list experts under their global index, so a checkpoint saved on N ranks loads
on M ranks or into an unsharded model in one process. :func:`full_state_dict` gathers the
unsharded state dict for export.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..experts import ModuleListExperts
from .expert_parallel import ExpertParallelExperts, _ep_modules, _unwrap

__all__ = [
    "full_state_dict",
    "load_checkpoint",
    "load_sharded_optimizer_state_dict",
    "load_sharded_state_dict",
    "save_checkpoint",
    "sharded_optimizer_state_dict",
    "sharded_state_dict",
]


_LOCAL_LIST_KEY = re.compile(r"^experts\.(\d+)\.(.+)$")


def _expert_key_map(model: nn.Module) -> dict[str, tuple[ExpertParallelExperts, str, str, int]]:
    """Local state-dict key -> (module, unsharded key, local tensor name, local index or -1)."""
    mapping: dict[str, tuple[ExpertParallelExperts, str, str, int]] = {}
    for path, module in _ep_modules(model):
        prefix = f"{path}." if path else ""
        for name in module.local.state_dict():
            local_key = f"{prefix}local.{name}"
            if isinstance(module.local, ModuleListExperts):
                match = _LOCAL_LIST_KEY.match(name)
                if match is None:  # pragma: no cover - ModuleListExperts holds only `experts`
                    raise ValueError(f"unexpected key {local_key}")
                index = int(match.group(1))
                global_key = f"{prefix}experts.{module.first_expert + index}.{match.group(2)}"
                mapping[local_key] = (module, global_key, name, index)
            else:
                mapping[local_key] = (module, f"{prefix}{name}", name, -1)
    return mapping


def _mesh_for(module: ExpertParallelExperts, device: torch.device) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    group = module.group if module.group is not None else dist.group.WORLD
    assert group is not None
    return DeviceMesh.from_group(group, device.type)


def sharded_state_dict(model: nn.Module) -> dict[str, Any]:
    """This rank's state dict under the *unsharded* model's keys, for distributed checkpoints.

    Non-expert entries are ``model.state_dict()``'s (FSDP2 parameters stay ``DTensor`` s).
    Stacked expert tensors (``[E, ...]`` in the unsharded model) are ``DTensor`` s sharded on
    dim 0 over the expert-parallel group, wrapping this rank's ``[L, ...]`` slice (sharing its
    storage); module-list experts appear under their global index
    (``...experts.experts.{e}.weight``), each on its owner rank only.
    """
    from torch.distributed.tensor import DTensor, Shard

    model = _unwrap(model)
    mapping = _expert_key_map(model)
    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if key not in mapping:
            out[key] = value
            continue
        module, global_key, _, index = mapping[key]
        if index >= 0:
            out[global_key] = value
        else:
            mesh = _mesh_for(module, value.device)
            out[global_key] = DTensor.from_local(value, mesh, [Shard(0)], run_check=False)
    return out


def load_sharded_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Load a state dict in :func:`sharded_state_dict`'s layout (after ``dcp.load`` fills it)."""
    from torch.distributed.tensor import DTensor

    model = _unwrap(model)
    mapping = _expert_key_map(model)
    expert_values: dict[str, Tensor] = {}
    for local_key, (_, global_key, _, _) in mapping.items():
        if global_key not in state_dict:
            raise KeyError(f"state_dict: missing expert entry {global_key!r}")
        value = state_dict[global_key]
        expert_values[local_key] = value.to_local() if isinstance(value, DTensor) else value
    global_keys = {global_key for _, global_key, _, _ in mapping.values()}
    rest = {k: v for k, v in state_dict.items() if k not in global_keys}
    missing, unexpected = model.load_state_dict({**rest, **expert_values}, strict=False)
    if missing or unexpected:
        raise KeyError(f"state_dict: missing keys {missing}, unexpected keys {unexpected}")


_OPTIM_PREFIX = "optim."


def _flat_optimizer_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # flat keys ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr") let each rank own its
    # experts' entries; nested param_groups lists would differ between ranks
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _split_optim_key(key: str) -> tuple[str, str, str]:
    """``"state.a.b.exp_avg"`` -> ``("state", "a.b", "exp_avg")`` (leaf names hold no dots)."""
    section, _, rest = key.partition(".")
    fqn, _, leaf = rest.rpartition(".")
    return section, fqn, leaf


def sharded_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The optimizer's state under the *unsharded* model's parameter names (see
    :func:`sharded_state_dict`): per-expert state of stacked experts (``exp_avg`` ``[L, ...]``)
    becomes ``DTensor`` s sharded on the expert dimension, so it reshards like the weights.
    Initialises the optimizer's state first if it has none (a zero-learning-rate step).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor, Shard

    flat: dict[str, Any] = dict(
        get_optimizer_state_dict(model, optimizer, options=_flat_optimizer_options())
    )
    mapping = _expert_key_map(model)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, fqn, leaf = _split_optim_key(key)
        if fqn not in mapping:
            out[key] = value
            continue
        module, global_key, _, index = mapping[fqn]
        new_key = f"{section}.{global_key}.{leaf}"
        out[new_key] = value
        if index >= 0 or not isinstance(value, Tensor) or isinstance(value, DTensor):
            continue
        if value.dim() > 0 and value.shape[0] == module.num_local_experts:
            mesh = _mesh_for(module, value.device)
            out[new_key] = DTensor.from_local(value, mesh, [Shard(0)], run_check=False)
    return out


def load_sharded_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]
) -> None:
    """Load a state dict in :func:`sharded_optimizer_state_dict`'s layout into ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    to_local = {
        global_key: local for local, (_, global_key, _, _) in _expert_key_map(model).items()
    }
    flat: dict[str, Any] = {}
    for key, value in state_dict.items():
        section, fqn, leaf = _split_optim_key(key)
        if fqn in to_local:
            key = f"{section}.{to_local[fqn]}.{leaf}"
            if isinstance(value, DTensor):
                value = value.to_local()
        flat[key] = value
    set_optimizer_state_dict(model, optimizer, flat, options=_flat_optimizer_options())


def save_checkpoint(
    model: nn.Module, path: str, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Save ``model`` (expert-parallel, DDP/FSDP-wrapped, or plain) with distributed checkpointing.

    Collective: call on every rank. The checkpoint stores every tensor at its unsharded shape,
    so :func:`load_checkpoint` can load it on any number of ranks (one process without a
    process group included), into a model with any compatible expert sharding.

    Args:
        model: the model.
        path: a directory (``torch.distributed.checkpoint`` layout: ``.metadata`` + shards).
        optimizer: optionally, its optimizer, saved alongside (keys ``optim.state.<param>...``)
            so that training resumes on any number of ranks.
    """
    from torch.distributed.checkpoint.state_dict_saver import save

    state_dict = sharded_state_dict(model)
    if optimizer is not None:
        optim_sd = sharded_optimizer_state_dict(model, optimizer)
        state_dict.update({_OPTIM_PREFIX + k: v for k, v in optim_sd.items()})
    save(state_dict, checkpoint_id=path)


def load_checkpoint(
    model: nn.Module, path: str, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load a checkpoint written by :func:`save_checkpoint`, resharding as needed (collective).

    With ``optimizer``, its state is restored too (the checkpoint must hold one).
    """
    from torch.distributed.checkpoint.state_dict_loader import load

    state_dict = sharded_state_dict(model)
    optim_keys: list[str] = []
    if optimizer is not None:
        optim_sd = sharded_optimizer_state_dict(model, optimizer)
        optim_keys = [_OPTIM_PREFIX + k for k in optim_sd]
        state_dict.update(zip(optim_keys, optim_sd.values(), strict=True))
    if not os.path.isdir(path):
        raise ValueError(
            f"path: expected a checkpoint folder written by save_checkpoint, got {path!r}"
        )
    load(state_dict, checkpoint_id=path)
    if optimizer is not None:
        optim_loaded = {k[len(_OPTIM_PREFIX) :]: state_dict.pop(k) for k in optim_keys}
        load_sharded_optimizer_state_dict(model, optimizer, optim_loaded)
    load_sharded_state_dict(model, state_dict)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Gather the unsharded state dict (same keys and shapes as the model before sharding).

    Collective: every rank of the expert-parallel (and FSDP) groups must call it; every rank
    receives the full dict (plain tensors on the parameters' device). Use it to export, e.g.
    ``safetensors.torch.save_file(full_state_dict(model), "model.safetensors")`` on rank 0.
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, Tensor] = {}
    for key, value in sharded_state_dict(model).items():
        out[key] = value.full_tensor() if isinstance(value, DTensor) else value
    # module-list experts live on their owner only: broadcast each from its owner
    for path, module in _ep_modules(model):
        if not isinstance(module.local, ModuleListExperts):
            continue
        prefix = f"{path}." if path else ""
        template = module.local.experts[0].state_dict()
        for expert in range(module.num_experts):
            owner = expert // module.num_local_experts
            if module.group is not None:
                owner = dist.get_global_rank(module.group, owner)
            for name, like in template.items():
                key = f"{prefix}experts.{expert}.{name}"
                tensor = out[key].clone() if key in out else torch.empty_like(like)
                dist.broadcast(tensor, src=owner, group=module.group)
                out[key] = tensor
    return out
