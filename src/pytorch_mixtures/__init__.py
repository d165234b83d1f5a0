"""pytorch-mixtures: Mixture-of-Experts and Mixture-of-Depths layers for PyTorch.

Quick start::

    import pytorch_mixtures as pm

    router = pm.TopKRouter(dim=512, num_experts=8, top_k=2)
    moe = pm.MoELayer(512, router, pm.SwiGLUExperts(8, 512, 1024))
    y = x + moe(x)
    loss = task_loss + pm.aux_loss(model)
"""

from . import (
    balancing,
    checks,
    dispatch,
    distributed,
    experts,
    interop,
    losses,
    mod,
    routers,
    routing,
    soft_moe,
    stats,
    telemetry,
)
from .experts import MLPExperts, ModuleListExperts, SwiGLUExperts
from .losses import aux_loss
from .mod import HFDecoderLayerAdapter, MixtureOfDepths, MoDLayer, MoDStats, calibrate_thresholds
from .moe_layer import MoELayer
from .routers import HashRouter, UniformRouter, update_expert_bias
from .routing import ExpertChoiceRouter, Router, RouterOutput, TopKRouter, TopkRouter
from .soft_moe import SoftMoE
from .stats import RoutingStats
from .telemetry import plot_expert_load, routing_stats
from .utils import MHSA

__version__ = "0.2.0"

__all__ = [
    "MHSA",
    "ExpertChoiceRouter",
    "HFDecoderLayerAdapter",
    "HashRouter",
    "MLPExperts",
    "MixtureOfDepths",
    "MoDLayer",
    "MoDStats",
    "MoELayer",
    "ModuleListExperts",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "SoftMoE",
    "SwiGLUExperts",
    "TopKRouter",
    "TopkRouter",
    "UniformRouter",
    "__version__",
    "aux_loss",
    "balancing",
    "calibrate_thresholds",
    "checks",
    "dispatch",
    "distributed",
    "experts",
    "interop",
    "losses",
    "mod",
    "plot_expert_load",
    "routers",
    "routing",
    "routing_stats",
    "soft_moe",
    "stats",
    "telemetry",
    "update_expert_bias",
]
