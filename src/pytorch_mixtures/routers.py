"""Compatibility module: the routers without a learned gate now live in
:mod:`pytorch_mixtures.routing.fixed`, :func:`update_expert_bias` in
:mod:`pytorch_mixtures.routing.topk`. Kept so that ``pytorch_mixtures.routers.X`` still works.
"""

from .routing.fixed import HashRouter, UniformRouter
from .routing.topk import update_expert_bias

__all__ = ["HashRouter", "UniformRouter", "update_expert_bias"]
