"""pytorch-mixtures: Mixture-of-Experts and Mixture-of-Depths layers for PyTorch.

Quick start::

    import pytorch_mixtures as pm

    router = pm.TopKRouter(dim=512, num_experts=8, top_k=2)
    moe = pm.MoELayer(512, router, pm.SwiGLUExperts(8, 512, 1024))
    y = x + moe(x)
    loss = task_loss + pm.aux_loss(model)
"""

from . import (
    attention,
    backends,
    balancing,
    checks,
    depth,
    dispatch,
    distributed,
    experts,
    files,
    interop,
    kernels,
    losses,
    mod,
    models,
    moe_layer,
    pruning,
    routers,
    routing,
    soft_moe,
    stats,
    telemetry,
)
from .attention import MHSA
from .depth import MixtureOfDepths, MoDLayer, MoDStats, calibrate_thresholds
from .experts import MLPExperts, ModuleListExperts, SwiGLUExperts
from .interop.adapters import HFDecoderLayerAdapter
from .losses import aux_loss
from .moe_layer import MoELayer
from .pruning import PruningReport, expert_scores, prune_experts
from .routing import (
    ExpertChoiceRouter,
    HashRouter,
    ReLURouter,
    Router,
    RouterOutput,
    RoutingRecord,
    TopKRouter,
    TopkRouter,
    UniformRouter,
    end_balance_step,
    record_routing,
    replay_routing,
    update_expert_bias,
)
from .soft_moe import SoftMoE
from .stats import RoutingStats, plot_expert_load, routing_stats

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
    "PruningReport",
    "ReLURouter",
    "Router",
    "RouterOutput",
    "RoutingRecord",
    "RoutingStats",
    "SoftMoE",
    "SwiGLUExperts",
    "TopKRouter",
    "TopkRouter",
    "UniformRouter",
    "__version__",
    "attention",
    "aux_loss",
    "backends",
    "balancing",
    "calibrate_thresholds",
    "checks",
    "depth",
    "dispatch",
    "distributed",
    "end_balance_step",
    "expert_scores",
    "experts",
    "files",
    "interop",
    "kernels",
    "losses",
    "mod",
    "models",
    "moe_layer",
    "plot_expert_load",
    "prune_experts",
    "pruning",
    "record_routing",
    "replay_routing",
    "routers",
    "routing",
    "routing_stats",
    "soft_moe",
    "stats",
    "telemetry",
    "update_expert_bias",
]
