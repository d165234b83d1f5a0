"""The public surface survives the package layout: every import path of version 0.2 resolves to
the same objects as the new homes, and the library core never imports the application."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import pytorch_mixtures as pm

# module -> names it exported in 0.2 (its __all__ then); each must still resolve there
OLD_PATHS = {
    "pytorch_mixtures.routing": "ExpertChoiceRouter Router RouterOutput TopKRouter TopkRouter "
    "capacity_keep_mask token_choice_keep token_major_output",
    "pytorch_mixtures.routers": "HashRouter UniformRouter update_expert_bias",
    "pytorch_mixtures.balancing": "cv_squared group_limited_scores importance_loss "
    "noisy_top_k_load sequence_balance_loss softplus_noise_std",
    "pytorch_mixtures.losses": "AuxLossModule aux_loss balance_loss_from_assignments "
    "load_balancing_loss router_z_loss",
    "pytorch_mixtures.checks": "check_input_matches layer_label load_state_dict_file "
    "name_layers raise_if_nonfinite readable_file",
    "pytorch_mixtures.dispatch": "DispatchPlan combine permute plan_dispatch sorted_weights",
    "pytorch_mixtures.stats": "RoutingStats routing_stats_from",
    "pytorch_mixtures.telemetry": "LayerStats plot_expert_load routing_stats",
    "pytorch_mixtures.utils": "MHSA",
    "pytorch_mixtures.moe": "MoELayer",
    "pytorch_mixtures.moe_layer": "MoELayer",
    "pytorch_mixtures.experts": "ExpertsBase MLPExperts ModuleListExperts SwiGLUExperts as_experts",
    "pytorch_mixtures.soft_moe": "SoftMoE",
    "pytorch_mixtures.mod": "BlockAdapter CausalRouterName GateName HFDecoderLayerAdapter "
    "MaskAdapter MixtureOfDepths MoDLayer MoDStats calibrate_thresholds position_causal_mask",
    "pytorch_mixtures.distributed": "ExpertParallelExperts all_to_all_single clip_grad_norm_ ddp "
    "expert_parallel expert_parameters full_state_dict fully_shard global_routing_stats "
    "load_checkpoint load_sharded_optimizer_state_dict load_sharded_state_dict "
    "non_expert_parameters save_checkpoint sharded_optimizer_state_dict sharded_state_dict",
    "pytorch_mixtures.interop": "MoDDecoderLayer SwiGLUMLP attach_aux_loss from_hf moeify "
    "route_depths supported_blocks to_hf",
    "pytorch_mixtures.models": "Block KVCache LMOutput ModelConfig SwiGLU TransformerLM",
    "pytorch_mixtures.backends": "BACKENDS Backend GroupedRows group_rows grouped_mm_available "
    "resolve_backend segment_swiglu",
}
OLD_TOP_LEVEL = (
    "MHSA ExpertChoiceRouter HFDecoderLayerAdapter HashRouter MLPExperts MixtureOfDepths "
    "MoDLayer MoDStats MoELayer ModuleListExperts Router RouterOutput RoutingStats SoftMoE "
    "SwiGLUExperts TopKRouter TopkRouter UniformRouter __version__ aux_loss balancing "
    "calibrate_thresholds checks dispatch distributed experts interop losses mod "
    "plot_expert_load routers routing routing_stats soft_moe stats telemetry update_expert_bias"
)


@pytest.mark.parametrize("module_name", sorted(OLD_PATHS))
def test_every_old_import_path_still_resolves(module_name):
    module = importlib.import_module(module_name)
    for name in OLD_PATHS[module_name].split():
        assert hasattr(module, name), f"{module_name}.{name} is gone"
        top = getattr(pm, name, None)
        if top is not None and not isinstance(top, type(pm)):
            assert getattr(module, name) is top, f"{module_name}.{name} is another object"


# names added after 0.2, by home module: each is exported from the package as the same object
NEW_NAMES = {
    "pytorch_mixtures.pruning": "PruningReport expert_scores prune_experts",
    "pytorch_mixtures.routing.relu": "ReLURouter",
    "pytorch_mixtures.routing.replay": "RoutingRecord record_routing replay_routing",
    "pytorch_mixtures.routing.topk": "end_balance_step",
}


@pytest.mark.parametrize("module_name", sorted(NEW_NAMES))
def test_new_public_names_are_exported_from_their_home(module_name):
    module = importlib.import_module(module_name)
    for name in NEW_NAMES[module_name].split():
        assert name in module.__all__ and name in pm.__all__, name
        assert getattr(pm, name) is getattr(module, name), name
    if module_name == "pytorch_mixtures.pruning":
        assert "pruning" in pm.__all__ and pm.pruning is module
    else:  # the routing frontier's homes are exported from pytorch_mixtures.routing too
        routing = importlib.import_module("pytorch_mixtures.routing")
        for name in NEW_NAMES[module_name].split():
            assert name in routing.__all__ and getattr(routing, name) is getattr(module, name)


def test_every_top_level_name_is_public_and_resolves():
    old = set(OLD_TOP_LEVEL.split())
    assert old <= set(pm.__all__), sorted(old - set(pm.__all__))
    for name in pm.__all__:
        assert getattr(pm, name) is not None, name


def test_seed_readme_paths_and_new_homes():
    from pytorch_mixtures.attention import MHSA
    from pytorch_mixtures.moe import MoELayer as OldMoELayer
    from pytorch_mixtures.routing import ExpertChoiceRouter, RouterOutput, TopKRouter
    from pytorch_mixtures.routing.expert_choice import ExpertChoiceRouter as ec_home
    from pytorch_mixtures.routing.topk import TopKRouter as topk_home
    from pytorch_mixtures.utils import MHSA as OldMHSA

    assert ExpertChoiceRouter is ec_home is pm.ExpertChoiceRouter
    assert TopKRouter is topk_home is pm.TopkRouter
    assert RouterOutput is pm.RouterOutput
    assert OldMoELayer is pm.MoELayer and OldMHSA is MHSA is pm.MHSA


def test_old_mod_path_is_the_depth_package():
    import pytorch_mixtures.depth as depth
    import pytorch_mixtures.interop.adapters as hf_adapters

    for name in OLD_PATHS["pytorch_mixtures.mod"].split():
        home = hf_adapters if name == "HFDecoderLayerAdapter" else depth
        assert getattr(pm.mod, name) is getattr(home, name), name


def test_importing_the_library_does_not_load_the_app_or_optional_extras():
    # (tqdm is left out: torch itself imports it)
    code = (
        "import sys, pytorch_mixtures; "
        "bad = [m for m in sys.modules if m.startswith('pytorch_mixtures.app') "
        "or m.split('.')[0] in ('transformers', 'matplotlib', 'safetensors')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_distributed_reexports_each_public_name_from_its_module():
    # by module path: the package attribute `expert_parallel` is the function, not the module
    names = ("expert_parallel", "data_parallel", "checkpoint")
    modules = [importlib.import_module(f"pytorch_mixtures.distributed.{name}") for name in names]
    assert sorted(pm.distributed.__all__) == sorted(n for m in modules for n in m.__all__)
    for name in pm.distributed.__all__:
        (home,) = [m for m in modules if name in m.__all__]
        assert getattr(pm.distributed, name) is getattr(home, name), name


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the modules a source file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_library_core_never_imports_the_app():
    root = Path(pm.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] == "app":
            continue
        package = ".".join(["pytorch_mixtures", *relative.parts[:-1]])
        imports = _imported_modules(path, package)
        if any(
            m == "pytorch_mixtures.app" or m.startswith("pytorch_mixtures.app.") for m in imports
        ):
            offenders.append(str(relative))
    assert offenders == [], f"library modules importing the app: {offenders}"
    # the walk sees relative imports: a known app import is found
    assert "pytorch_mixtures.models" in _imported_modules(
        root / "app" / "demo.py", "pytorch_mixtures.app"
    )
