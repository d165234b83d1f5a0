"""pytorch-mixtures: Mixture-of-Experts and Mixture-of-Depths layers for PyTorch.

Quick start::

    import pytorch_mixtures as pm

    router = pm.TopKRouter(dim=512, num_experts=8, top_k=2)
    moe = pm.MoELayer(512, router, pm.SwiGLUExperts(8, 512, 1024))
    y = x + moe(x)
    loss = task_loss + pm.aux_loss(model)
"""

from . import dispatch, experts, interop, losses, routing, stats
from .experts import MLPExperts, ModuleListExperts, SwiGLUExperts
from .losses import aux_loss
from .moe_layer import MoELayer
from .routing import ExpertChoiceRouter, Router, RouterOutput, TopKRouter, TopkRouter
from .stats import RoutingStats
from .utils import MHSA

__version__ = "0.2.0"

__all__ = [
    "MHSA",
    "ExpertChoiceRouter",
    "MLPExperts",
    "MoELayer",
    "ModuleListExperts",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "SwiGLUExperts",
    "TopKRouter",
    "TopkRouter",
    "__version__",
    "aux_loss",
    "dispatch",
    "experts",
    "interop",
    "losses",
    "routing",
    "stats",
]
