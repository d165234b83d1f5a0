"""Routers: who goes where, with what weight.

A router maps tokens to *slots*: (token, expert, weight) assignments. Every router returns the
same small immutable :class:`RouterOutput`, so dispatch and experts never depend on the routing
scheme. :class:`Router` (``base.py``) runs the one preamble (validate, flatten, mask); each
router implements one method, ``route``.

* ``topk.py``: :class:`TopKRouter` (token choice; its optional schemes in one frozen
  :class:`TopKSchemes`), :func:`update_expert_bias` and :func:`end_balance_step`.
* ``expert_choice.py``: :class:`ExpertChoiceRouter`.
* ``fixed.py``: :class:`HashRouter`, :class:`UniformRouter` (no learned gate).
* ``capacity.py``: per-expert capacity and which slots fit.
* ``relu.py``: :class:`ReLURouter` (ReMoE: ReLU weights, adaptive L1 sparsity).
* ``replay.py``: :func:`record_routing` / :func:`replay_routing` (routing replay, R3).
* ``selection.py``: rules that restrict the selection (group-limited scores, gating noise).
"""

from .base import Decision, Router, RouterOutput, token_major_output
from .capacity import capacity_keep_mask, expert_choice_capacity, token_choice_keep
from .expert_choice import ExpertChoiceRouter
from .fixed import HashRouter, UniformRouter
from .relu import ReLURouter, relu_l1_loss
from .replay import RoutingRecord, record_routing, replay_routing
from .selection import group_limited_scores, softplus_noise_std
from .topk import TopKRouter, TopkRouter, TopKSchemes, end_balance_step, update_expert_bias

__all__ = [
    "Decision",
    "ExpertChoiceRouter",
    "HashRouter",
    "ReLURouter",
    "Router",
    "RouterOutput",
    "RoutingRecord",
    "TopKRouter",
    "TopKSchemes",
    "TopkRouter",
    "UniformRouter",
    "capacity_keep_mask",
    "end_balance_step",
    "expert_choice_capacity",
    "group_limited_scores",
    "record_routing",
    "relu_l1_loss",
    "replay_routing",
    "softplus_noise_std",
    "token_choice_keep",
    "token_major_output",
    "update_expert_bias",
]
