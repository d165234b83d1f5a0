"""Save a library MoE model as a native ``transformers`` checkpoint (no pytorch_mixtures needed).

``export_pretrained(model, path)`` writes a folder that ``transformers.AutoModelForCausalLM
.from_pretrained(path)`` loads with ``transformers`` alone and that gives the same logits:

* a model converted with :func:`~pytorch_mixtures.interop.from_hf_model` (Mixtral, Qwen2-MoE,
  Qwen3-MoE, OLMoE, DeepSeek-V3) is saved back in its own architecture, each layer's weights
  written into the native block by :func:`~pytorch_mixtures.interop.to_hf` (the router's
  ``expert_bias`` as DeepSeek-V3's ``e_score_correction_bias``);
* a Llama upcycled with :func:`~pytorch_mixtures.interop.moeify` is saved as Mixtral
  (``like="mixtral"``) and an upcycled Qwen3 as Qwen3-MoE (``like="qwen3_moe"``), after
  checking that the target architecture computes what the upcycled model computes. What it
  cannot express (a dense layer left in a Mixtral, a shared expert, sigmoid scores,
  un-renormalised weights in a Mixtral, a routed scaling factor, a capacity, attention biases,
  another activation, ...) is refused with a ``ValueError`` naming the difference, rather than
  saved into something that loads with other logits.

Every tensor of the target model is accounted for: each comes from exactly one tensor of the
source model, and a source tensor the target has no place for (e.g. a Mixture-of-Depths router)
is refused, so no weight is lost. Files are safetensors plus ``config.json``, written by the
target model's own ``save_pretrained`` into a temporary folder next to ``path`` that is then
renamed into place (no pickle).
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..experts import SwiGLUExperts
from ..moe_layer import MoELayer
from ..routing import TopKRouter
from .hf import _activation_name, _family_of, supported_blocks
from .hf_layer import HFMoELayer

__all__ = ["export_pretrained"]

HFModule = Any  # transformers objects, typed by duck (transformers is optional)

# model_type of a from_hf-convertible family -> its native MoE block class name
_CONVERTED = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "olmoe": "OlmoeSparseMoeBlock",
    "deepseek_v3": "DeepseekV3MoE",
}
# upcycled dense model_type -> the MoE architecture it exports as
_UPCYCLED = {"llama": "mixtral", "qwen3": "qwen3_moe"}


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as error:  # the [hf] extra is not installed
        raise ImportError(
            "export_pretrained needs transformers: pip install 'pytorch-mixtures[hf]'"
        ) from error


def _moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def _decoder_layers(model: HFModule) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"model: expected a decoder-only causal LM with model.model.layers, got "
            f"{type(model).__name__}"
        )
    return layers


def _fail(what: str, expected: object, got: object, target: str) -> None:
    raise ValueError(f"{what}: expected {expected} ({target} can express only that), got {got!r}")


def _check_upcycled_moe(moe: MoELayer, what: str, target: str, normalize: bool | None) -> None:
    """``moe`` routes and computes as the target's native block does, or a ValueError."""
    router = moe.router
    if type(moe) not in (MoELayer, HFMoELayer):
        _fail(f"{what}", "a plain MoELayer (as moeify builds)", type(moe).__name__, target)
    if not isinstance(router, TopKRouter):
        _fail(f"{what}.router", "a TopKRouter", type(router).__name__, target)
    assert isinstance(router, TopKRouter)
    schemes = router.schemes
    checks: list[tuple[str, object, object]] = [
        ("router.score_func", "softmax", router.score_func),
        ("router.capacity_factor", None, router.capacity_factor),
        ("moe.capacity_factor", None, getattr(moe, "capacity_factor", None)),
        ("router.jitter_noise", 0.0, float(router.jitter_noise)),
        ("router.noisy_gating", False, schemes.noisy_gating),
        ("router.expert_bias", None, router.expert_bias),
        ("router.num_groups", 1, schemes.num_groups),
        ("router.routed_scaling_factor", 1.0, float(schemes.routed_scaling_factor)),
        ("router.gate.bias", None, router.gate.bias),
        ("shared_experts", None, moe.shared_experts),
        ("shared_expert_gate", None, moe.shared_expert_gate),
        ("num_noop_experts", 0, getattr(moe, "num_noop_experts", 0)),
    ]
    if normalize is not None:  # Mixtral always renormalises; Qwen3-MoE has norm_topk_prob
        checks.append(("router.normalize_weights", normalize, router.normalize_weights))
    for name, expected, got in checks:
        if got is not expected and got != expected:
            shown = type(got).__name__ if isinstance(got, nn.Module) else got
            _fail(f"{what}.{name}", repr(expected), shown, target)
    zero = getattr(moe, "zero_computation_experts", None)
    if zero and any(zero.values()):
        _fail(f"{what}.zero_computation_experts", "none", zero, target)
    if not isinstance(moe.experts, SwiGLUExperts):
        _fail(
            f"{what}.experts",
            "SwiGLUExperts (bias-free gated experts, as moeify makes of a Llama-style MLP)",
            type(moe.experts).__name__,
            target,
        )


def _hidden_act(config: HFModule, experts: SwiGLUExperts, what: str, target: str) -> str:
    """The config's ``hidden_act`` if it computes the experts' activation (the target's experts
    use ``ACT2FN[hidden_act]``)."""
    act_fn = _transformers().activations.ACT2FN[config.hidden_act]
    if _activation_name(act_fn) != experts.activation:
        _fail(
            f"{what}.experts.activation",
            f"the config's hidden_act {config.hidden_act!r}",
            experts.activation,
            target,
        )
    return str(config.hidden_act)


def _upcycled_moes(
    model: HFModule, target: str, *, every_layer: bool, normalize: bool | None
) -> tuple[dict[int, MoELayer], SwiGLUExperts]:
    """The MoE layer of each decoder layer (index -> layer), all of one shape, checked."""
    layers = _decoder_layers(model)
    found: dict[int, MoELayer] = {}
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):  # e.g. wrapped by route_depths: weights would be lost
            _fail(
                f"model.model.layers[{index}]",
                "a decoder layer with an mlp (no Mixture-of-Depths or other wrapper)",
                type(layer).__name__,
                target,
            )
        if isinstance(mlp, MoELayer):
            what = f"model.model.layers[{index}].mlp"
            _check_upcycled_moe(mlp, what, target, normalize)
            found[index] = mlp
        elif every_layer:
            _fail(
                f"model.model.layers[{index}].mlp",
                "a MoELayer in every decoder layer (moeify(..., every=1)): it has no dense layers",
                type(mlp).__name__,
                target,
            )
    if not found:
        raise ValueError(f"model: expected moeify-upcycled MoE layers, found none in {target}")
    first = next(iter(found.values()))
    assert isinstance(first.experts, SwiGLUExperts) and isinstance(first.router, TopKRouter)
    shape = (first.experts.num_experts, first.experts.hidden_dim, first.router.top_k)
    normalized = first.router.normalize_weights
    for index, moe in found.items():
        assert isinstance(moe.experts, SwiGLUExperts) and isinstance(moe.router, TopKRouter)
        other = (moe.experts.num_experts, moe.experts.hidden_dim, moe.router.top_k)
        if other != shape or moe.router.normalize_weights != normalized:
            _fail(
                f"model.model.layers[{index}].mlp",
                f"(experts, hidden, top_k, normalize) = {(*shape, normalized)} as in the first "
                "MoE layer (the config holds one value)",
                (*other, moe.router.normalize_weights),
                target,
            )
    return found, first.experts


def _common(config: HFModule) -> dict[str, Any]:
    """The config entries a dense decoder and its MoE counterpart share."""
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "initializer_range",
        "rms_norm_eps",
        "use_cache",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "rope_parameters",
        "attention_dropout",
        "head_dim",
    )
    out = {key: getattr(config, key) for key in keys if hasattr(config, key)}
    out["dtype"] = getattr(config, "dtype", None)
    return out


def _mixtral_config(model: HFModule) -> tuple[HFModule, dict[int, MoELayer]]:
    config = model.config
    target = "Mixtral"
    for attr in ("attention_bias", "mlp_bias"):
        if getattr(config, attr, False):
            _fail(f"model.config.{attr}", "False", True, target)
    if int(getattr(config, "pretraining_tp", 1) or 1) != 1:
        _fail("model.config.pretraining_tp", "1", config.pretraining_tp, target)
    moes, experts = _upcycled_moes(model, target, every_layer=True, normalize=True)
    first = next(iter(moes.values()))
    assert isinstance(first.router, TopKRouter)
    new = _transformers().MixtralConfig(
        **_common(config),
        intermediate_size=experts.hidden_dim,
        hidden_act=_hidden_act(config, experts, "model.model.layers[*].mlp", target),
        num_local_experts=experts.num_experts,
        num_experts_per_tok=first.router.top_k,
        sliding_window=None,
        router_jitter_noise=0.0,
        router_aux_loss_coef=float(first.router.balance_loss_coef),
        output_router_logits=False,
    )
    return new, moes


def _qwen3_moe_config(model: HFModule) -> tuple[HFModule, dict[int, MoELayer]]:
    config = model.config
    target = "Qwen3-MoE"
    if getattr(config, "use_sliding_window", False) or any(
        kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])
    ):
        _fail(
            "model.config.layer_types", "full attention in every layer", config.layer_types, target
        )
    moes, experts = _upcycled_moes(model, target, every_layer=False, normalize=None)
    first = next(iter(moes.values()))
    assert isinstance(first.router, TopKRouter)
    dense = [index for index in range(len(_decoder_layers(model))) if index not in moes]
    new = _transformers().Qwen3MoeConfig(
        **_common(config),
        attention_bias=bool(getattr(config, "attention_bias", False)),
        intermediate_size=config.intermediate_size,  # the dense layers' MLP width
        moe_intermediate_size=experts.hidden_dim,
        hidden_act=_hidden_act(config, experts, "model.model.layers[*].mlp", target),
        num_experts=experts.num_experts,
        num_experts_per_tok=first.router.top_k,
        norm_topk_prob=bool(first.router.normalize_weights),
        # the sparse layers spelled out: sparse iff not in mlp_only_layers (step 1)
        decoder_sparse_step=1,
        mlp_only_layers=dense,
        use_sliding_window=False,
        router_aux_loss_coef=float(first.router.balance_loss_coef),
        output_router_logits=False,
    )
    return new, moes


def _target(model: HFModule, like: str | None) -> tuple[Any, HFModule, dict[str, MoELayer]]:
    """(native class, its config, {module name: MoE layer to write into the native block})."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _CONVERTED:
        if like is not None and like != model_type:
            raise ValueError(
                f"like: expected None or {model_type!r} (a converted model saves in its own "
                f"architecture), got {like!r}"
            )
        moes = _moe_layers(model)
        if not moes:
            raise ValueError(
                f"model: expected from_hf-converted MoE layers, found none in {model_type}"
            )
        return type(model), config, moes
    if model_type in _UPCYCLED:
        want = _UPCYCLED[model_type]
        if like != want:
            raise ValueError(
                f"like: expected {want!r} for an upcycled {model_type!r} model, got {like!r}"
            )
        build = _mixtral_config if want == "mixtral" else _qwen3_moe_config
        new_config, by_index = build(model)
        cls = getattr(
            _transformers(), "MixtralForCausalLM" if want == "mixtral" else "Qwen3MoeForCausalLM"
        )
        names = {f"model.layers.{index}.mlp": moe for index, moe in by_index.items()}
        return cls, new_config, names
    raise ValueError(
        f"model.config.model_type: expected one of {sorted(_CONVERTED)} (converted with "
        f"from_hf_model) or {sorted(_UPCYCLED)} (upcycled with moeify), got {model_type!r}"
    )


def _native_state(model: HFModule, cls: Any, config: HFModule, moes: dict[str, MoELayer]) -> Any:
    """The native model, every tensor written from ``model`` (checked one to one)."""
    reference = next(model.parameters())
    # build without initialising (meta), then allocate: every tensor is overwritten below
    with torch.device("meta"):
        native = cls(config)
    native.to_empty(device=reference.device)
    native.to(dtype=reference.dtype)
    native.eval()
    source = model.state_dict()
    moe_prefixes = tuple(f"{name}." for name in moes)
    target = native.state_dict()
    written: set[str] = set()
    for name, moe in moes.items():
        block = native.get_submodule(name)
        if type(block).__name__ not in supported_blocks():
            raise ValueError(
                f"model.{name}: expected the target's MoE block there, got {type(block).__name__}"
            )
        _family_of(block, f"target block {name}").to_hf(moe, block)
        written.update(f"{name}.{key}" for key in block.state_dict())
    for key, tensor in target.items():
        if key in written:
            continue
        if key.startswith(moe_prefixes) or key not in source:
            raise ValueError(
                f"model: expected a tensor for {cls.__name__}'s {key!r}, found none in "
                f"{type(model).__name__}'s state dict"
            )
        value = source[key]
        if value.shape != tensor.shape:
            raise ValueError(
                f"model's {key!r}: expected shape {tuple(tensor.shape)} ({cls.__name__}), "
                f"got {tuple(value.shape)}"
            )
        with torch.no_grad():
            tensor.copy_(value)
        written.add(key)
    lost = [key for key in source if not key.startswith(moe_prefixes) and key not in target]
    if lost:
        raise ValueError(
            f"model: {cls.__name__} has no place for {lost[:5]} (of {len(lost)}); exporting "
            "would lose these weights"
        )
    _check_moe_tensors_consumed(moes)
    # persistent buffers left out of state_dict (none expected) would stay uninitialised
    if callable(getattr(native, "tie_weights", None)):
        native.tie_weights()
    return native


def _check_moe_tensors_consumed(moes: dict[str, MoELayer]) -> None:
    """Each MoE layer holds only the tensors ``to_hf`` writes (router gate, expert bias, stacked
    experts, shared experts and their gate): anything else would be lost."""
    known = (
        "router.gate.weight",
        "router.expert_bias",
        "experts.w_gate_up",
        "experts.w_down",
        "shared_experts.",
        "shared_expert_gate.weight",
    )
    for name, moe in moes.items():
        for key in moe.state_dict():
            if not key.startswith(known):
                raise ValueError(
                    f"model.{name}.{key}: expected only tensors the native block holds "
                    f"({', '.join(known)}); exporting would lose this one"
                )


def export_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    like: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` as a native ``transformers`` checkpoint folder at ``path``.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` then loads it without
    pytorch_mixtures and computes the same logits (eval mode; to float rounding of the
    experts' fused layout).

    Args:
        model: a causal LM converted with :func:`~pytorch_mixtures.interop.from_hf_model`
            (saved in its own architecture: ``like`` None or its ``model_type``), or upcycled
            with :func:`~pytorch_mixtures.interop.moeify` from a Llama (``like="mixtral"``:
            every layer must be MoE, softmax top-k renormalised) or a Qwen3 (``like="qwen3_moe"``:
            any subset of layers, ``norm_topk_prob`` from the router's renormalisation, the
            dense layers listed in ``mlp_only_layers``).
        path: the folder to write (created; its parent must exist).
        like: the target architecture's ``model_type`` (see above).
        overwrite: replace an existing ``path`` (otherwise an existing non-empty folder is an
            error).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the target cannot express the model (the message names the setting), a
            tensor would be lost or is missing, ``like`` does not fit, or ``path`` exists.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected an nn.Module (a transformers model), got {type(model).__name__}"
        )
    if like is not None and not isinstance(like, str):
        raise TypeError(f"like: expected None or a model_type string, got {like!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected a bool, got {overwrite!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    target = Path(path)
    if not target.parent.is_dir():
        raise ValueError(f"path: expected a path in an existing folder, got {str(target)!r}")
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(
            f"path: expected a new or empty folder (or overwrite=True), got {str(target)!r}"
        )
    cls, config, moes = _target(model, like)
    native = _native_state(model, cls, config, moes)
    # write next to the target, then rename: a reader never sees a half-written folder
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        native.save_pretrained(staging)
        if any(staging.glob("*.bin")) or not any(staging.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no safetensors into {staging}")
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
