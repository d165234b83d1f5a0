"""Routing replay: record one forward's routing decisions, replay them in a later forward.

Megatron-Core's "routing replay" (R3, ``--moe-enable-routing-replay``): RL stacks compute the
policy's log-probabilities in a training forward that must route the tokens exactly as the
rollout (or the reference forward) did, or the importance ratios of the routed tokens are
computed for a different network and the run collapses. Recording the *decisions* (which
experts, which tokens) and replaying them keeps the network fixed while the router's *weights*
are still computed by the current router, so it still gets gradients.

::

    with pm.record_routing(model) as record:     # dict: module name -> list of tensors
        rollout_logits = model(tokens)
    with pm.replay_routing(model, record):       # same experts / MoD tokens per call
        loss = objective(model(tokens))
    loss.backward()                               # gradients reach the routers

What is recorded, per module name (``model.named_modules()``), one tensor per call in call
order (several forwards inside one ``record`` context make a list; replay consumes it in order):

* :class:`~pytorch_mixtures.routing.TopKRouter`: ``[N, K]`` int64 expert ids (rank order).
* :class:`~pytorch_mixtures.routing.ReLURouter`: ``[N, E]`` bool active experts.
* :class:`~pytorch_mixtures.MixtureOfDepths`: ``[B, T]`` bool selected tokens.

In replay each router computes its logits and scores as usual, then takes the recorded
selection instead of its own: the combine weights are the current scores at the recorded ids,
renormalised exactly as the router's scheme does (``normalize_weights``, sigmoid scores,
``routed_scaling_factor``); capacity drops are *recomputed* on the recorded assignment (with
the current weights under ``drop_policy="probs"``); aux losses use the current probabilities
with the recorded assignment. A MoD layer's gate is the current router score at the recorded
tokens. With the same weights the replayed forward equals the recorded one bit for bit.

While a ``record`` or ``replay`` context is open, ``MoELayer`` takes its full path in eval
too (the decode path's :meth:`~pytorch_mixtures.routing.Router.decide` declines), so both
forwards run the same arithmetic. Outside the contexts nothing changes: the state lives on the
modules only for the context's duration and is removed in ``finally``; there is no global state.

The record is a plain ``dict[str, list[Tensor]]`` (tensors detached, on the routing device):
``torch.save`` it and ``torch.load(path, weights_only=True)`` reads it back.

Limitation: activation-checkpoint recomputation inside backward calls the routers again; in
``record`` those calls are not recorded, but in ``replay`` they would consume the next entry,
so replay does not support checkpointed MoE / MoD layers (the record then runs out: an error).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .base import _in_autograd_backward

__all__ = ["RoutingRecord", "record_routing", "replay_routing"]

#: module name -> one decision tensor per call, in call order
RoutingRecord = dict[str, list[Tensor]]


class ReplayState:
    """One module's routing-replay state while a context is open (kept on the module as
    ``_routing_replay``, removed when the context closes).

    Attributes:
        name: the module's name in the model (the record's key).
        calls: the record's list for this module (appended to in record mode).
        replaying: False while recording, True while replaying.
        position: the next entry to replay.
    """

    def __init__(self, name: str, calls: list[Tensor], replaying: bool) -> None:
        self.name = name
        self.calls = calls
        self.replaying = replaying
        self.position = 0

    def record(self, decision: Tensor) -> None:
        """Append this call's decision (detached; recomputations inside backward skipped)."""
        if not _in_autograd_backward():
            self.calls.append(decision.detach())

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The next recorded decision, checked against the ``shape`` / ``dtype`` this call
        needs, on ``device``."""
        if self.position >= len(self.calls):
            raise ValueError(
                f"record: expected a recorded call {self.position + 1} for {self.name!r}, got a "
                f"record holding {len(self.calls)} call(s) for it (the record ran out: replay "
                "runs the same forwards as were recorded)"
            )
        entry = self.calls[self.position]
        if not isinstance(entry, Tensor) or tuple(entry.shape) != shape:
            got = tuple(entry.shape) if isinstance(entry, Tensor) else type(entry).__name__
            raise ValueError(
                f"record[{self.name!r}][{self.position}]: expected a decision of shape {shape} "
                f"(this call's input), got {got}"
            )
        if entry.dtype != dtype:
            raise TypeError(
                f"record[{self.name!r}][{self.position}]: expected a {dtype} tensor, got "
                f"{entry.dtype}"
            )
        self.position += 1
        return entry.to(device)


def _replayable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that take part, by name; unsupported routers are refused."""
    from .base import Router  # (a module-level import would be circular through base.py)

    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if getattr(module, "supports_routing_replay", False):
            found.append((name, module))
        elif isinstance(module, Router):
            raise ValueError(
                f"model: routing replay supports TopKRouter, ReLURouter and MixtureOfDepths, "
                f"got a {type(module).__name__} at {name or '<root>'!r}"
            )
    if not found:
        raise ValueError(
            "model: expected at least one TopKRouter, ReLURouter or MixtureOfDepths to record "
            "or replay, found none"
        )
    for name, module in found:
        if getattr(module, "_routing_replay", None) is not None:
            raise ValueError(
                f"model: {name or '<root>'!r} is already inside a record_routing / "
                "replay_routing context; close it first"
            )
    return found


@contextmanager
def _attached(states: list[tuple[nn.Module, ReplayState]]) -> Iterator[None]:
    try:
        for module, state in states:
            # a plain attribute (not a buffer or submodule): never saved, never moved
            module.__dict__["_routing_replay"] = state
        yield
    finally:
        for module, _ in states:
            module.__dict__.pop("_routing_replay", None)


@contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    """Record the routing decisions of every forward run inside the context.

    Args:
        model: any module holding :class:`TopKRouter`, :class:`ReLURouter` or
            :class:`~pytorch_mixtures.MixtureOfDepths` modules (or one itself). Other routers
            (expert choice, hash, uniform) are refused with a ValueError.

    Yields:
        The record: module name -> list of decisions, one per call (``[N, K]`` int64 expert
        ids for top-k routers, ``[N, E]`` bool active experts for ReLU routers, ``[B, T]`` bool
        selections for MoD layers). Every taking-part module has a key (an empty list when it
        was not called). Filled as the forwards run; complete when the context closes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    record: RoutingRecord = {}
    states = []
    for name, module in _replayable(model):
        record[name] = []
        states.append((module, ReplayState(name, record[name], replaying=False)))
    with _attached(states):
        yield record


@contextmanager
def replay_routing(model: nn.Module, record: Mapping[str, list[Tensor]]) -> Iterator[None]:
    """Replay a :func:`record_routing` record: each call of each module takes the next recorded
    decision (the weights still come from the current router, with gradient).

    Raises ValueError (naming the module and call) when a call's shape differs from the
    recorded one, or when a module is called more often than it was recorded.

    Args:
        model: the model the record was made on (the same module names).
        record: module name -> list of decision tensors, as :func:`record_routing` yields it
            (or as loaded by ``torch.load(..., weights_only=True)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(record, Mapping):
        raise TypeError(
            f"record: expected a dict of module name -> list of tensors (from record_routing), "
            f"got {type(record).__name__}"
        )
    modules = dict(_replayable(model))
    for name, calls in record.items():
        if name not in modules:
            raise ValueError(
                f"record: expected module names of this model's routers and MoD layers, got "
                f"{name!r} (not one of {sorted(modules)})"
            )
        if not isinstance(calls, (list, tuple)) or not all(isinstance(c, Tensor) for c in calls):
            raise TypeError(
                f"record[{name!r}]: expected a list of tensors, got {type(calls).__name__}"
            )
    states = [
        (module, ReplayState(name, list(record.get(name, [])), replaying=True))
        for name, module in modules.items()
    ]
    with _attached(states):
        yield
