"""Convert Hugging Face ``transformers`` sparse-MoE blocks to :class:`MoELayer` and back.

``from_hf(block)`` builds an equivalent :class:`~pytorch_mixtures.MoELayer` (same routing
semantics, weights copied into stacked experts); ``to_hf(moe, like=block)`` writes a layer's
weights back into a copy of ``block``, so a model trained with the library can be saved in the
Hugging Face layout.

Supported (``transformers`` >= 5.0, tested with 5.24; the 5.x families store experts fused as
``gate_up_proj`` ``[E, 2H, D]`` and ``down_proj`` ``[E, D, H]`` and route with a ``gate``
module holding ``weight`` ``[E, D]``):

==================================  ==========================================================
Hugging Face block                  library layer
==================================  ==========================================================
``MixtralSparseMoeBlock``           softmax top-k, renormalised (Jiang et al. 2024)
``Qwen2MoeSparseMoeBlock``          softmax top-k (``norm_topk_prob``) + shared SwiGLU expert
                                    scaled by ``sigmoid(shared_expert_gate(x))``
``Qwen3MoeSparseMoeBlock``          softmax top-k, renormalised iff ``norm_topk_prob``
``OlmoeSparseMoeBlock``             same routing as Qwen3-MoE
``DeepseekV3MoE``                   sigmoid scores; ``e_score_correction_bias`` as the router's
                                    ``expert_bias`` (selection only); group-limited top-k
                                    (``n_group``, ``topk_group``, group score = sum of its two
                                    best biased scores); ``norm_topk_prob``;
                                    ``routed_scaling_factor``; ungated shared SwiGLU experts
                                    (DeepSeek-AI 2024)
``SwitchTransformersSparseMLP``     softmax top-1, raw probability weight (Fedus et al. 2021),
                                    ReLU/GELU ``MLPExperts``; see the capacity note below
==================================  ==========================================================

Inside a model the converted layer is an :class:`~pytorch_mixtures.interop.HFMoELayer`: it
records its router logits where ``transformers`` looks for the block's (so
``output_router_logits=True`` gives ``transformers``' own ``outputs.router_logits``,
``outputs.aux_loss`` and loss), and its own aux-loss coefficients default to 0 so that loss is
not counted twice. :func:`from_hf_model` converts every block of a model and hands the model's
attention mask to the layers (padding neither routed nor counted). Gated experts keep the
block's activation (``hidden_act``: SiLU -> SwiGLU, GELU -> GeGLU, any parameter-free
``ACT2FN`` activation).

Known differences (all outside float32 eval-mode forward, where outputs match):

* Mixtral's ``router_jitter_noise`` multiplies the hidden states of both router and experts
  (in place); the library's ``jitter_noise`` perturbs the router input only (as in Switch).
* Hugging Face computes Mixtral/Qwen router logits in the input dtype; the library always in
  float32 (so bf16 models may pick different experts on near ties).
* Switch Transformers drops tokens beyond an absolute ``expert_capacity`` counted *per
  sequence*; the library's capacity is ``ceil(cf * tokens * top_k / E)`` over the whole batch.
  ``from_hf`` therefore converts Switch blocks dropless (``capacity_factor=None``): outputs
  agree exactly whenever no expert receives more than ``expert_capacity`` tokens of one
  sequence (always when ``expert_capacity >= sequence length``). Switch's expert dropout
  (``dropout_rate``, training only) is not reproduced. Hugging Face's Switch balance loss
  averages per sequence (``E * mean_b sum_e f_be P_be``); the library's is over all tokens
  of the batch (``E * sum_e f_e P_e``): equal for a single sequence.
* ``transformers``' DeepSeek-V3 has no balance loss and never updates
  ``e_score_correction_bias``; the converted router adds none either by default (pass
  ``balance_loss_coef`` for the library's per-layer loss) and its bias moves with
  :func:`pytorch_mixtures.update_expert_bias`.

Shape legend: E experts, D model dim, H expert hidden dim.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..experts import _ACTIVATIONS, MLPExperts, SwiGLUExperts
from ..moe_layer import MoELayer
from ..routing import TopKRouter
from .hf_layer import HFMoELayer, make_recorder, route_attention_mask

__all__ = ["SwiGLUMLP", "from_hf", "from_hf_model", "supported_blocks", "to_hf"]

# transformers modules are typed by duck: their submodules and tensors are read by name
HFModule = Any

# a converted block adds nothing to pm.aux_loss by default: the model's own aux loss
# (transformers' load_balancing_loss_func on the recorded router logits, output_router_logits)
# is the one that counts, and a nonzero per-layer coefficient would count it a second time
_BALANCE_COEF = 0.0
_Z_COEF = 0.0


@dataclass(frozen=True)
class _Family:
    """How one Hugging Face block class maps to a library layer and back."""

    name: str
    from_hf: Callable[[HFModule, float, float], MoELayer]
    to_hf: Callable[[MoELayer, HFModule], None]


def _activation_name(act: Callable[[Tensor], Tensor], what: str = "activation") -> str:
    """Name of the library activation (``experts._ACTIVATIONS``) that ``act`` computes.

    Hugging Face activations are many classes (``ACT2FN``: ``gelu_new``, ``gelu_fast`` and
    ``gelu_pytorch_tanh`` are all the tanh GELU); comparing outputs on a probe grid identifies
    the function itself, whatever class implements it. The grid reaches +-20 so that clipped
    forms (``gelu_10``) differ from their unclipped ones.
    """
    if isinstance(act, nn.Module) and any(True for _ in act.parameters()):
        # PReLU, xIELU: learned parameters the stacked experts would not train
        raise ValueError(
            f"{what}: expected a parameter-free activation (one of {sorted(_ACTIVATIONS)}), "
            f"got {type(act).__name__} with learned parameters"
        )
    probe = torch.linspace(-20.0, 20.0, 801)
    try:
        with torch.no_grad():
            got = act(probe)
    except Exception as error:  # a callable that is no elementwise activation
        raise ValueError(
            f"{what}: expected an elementwise activation (one of {sorted(_ACTIVATIONS)}), got "
            f"{type(act).__name__}, which fails on a 1-d tensor ({error})"
        ) from error
    if isinstance(got, Tensor) and got.shape == probe.shape:
        for name, fn in _ACTIVATIONS.items():
            if torch.allclose(got.float(), fn(probe), atol=1e-6, rtol=1e-6):
                return name
    raise ValueError(
        f"{what}: expected one of {sorted(_ACTIVATIONS)} (as computed by the block's "
        f"activation), got {type(act).__name__} which computes none of them"
    )


def _check_fused_experts(experts: HFModule) -> None:
    """The fused layout: concatenated [gate; up], not transposed, no biases."""
    layout = (("is_transposed", False), ("is_concatenated", True), ("has_bias", False))
    for attr, expected in layout:
        value = getattr(experts, attr, expected)
        if value != expected:
            raise ValueError(
                f"block.experts.{attr}: expected {expected} (the layout of the supported "
                f"families), got {value}"
            )
    for attr in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, attr, None), Tensor):
            raise TypeError(
                f"block.experts.{attr}: expected a [E, ...] tensor (transformers >= 5 fused "
                f"experts), got {type(getattr(experts, attr, None)).__name__}"
            )


def _swiglu_from_fused(experts: HFModule) -> SwiGLUExperts:
    """``gate_up_proj`` ``[E, 2H, D]`` / ``down_proj`` ``[E, D, H]`` -> :class:`SwiGLUExperts`."""
    _check_fused_experts(experts)
    # the fused experts compute act(gate) * up: SwiGLU for silu, GeGLU for gelu, ...
    act = _activation_name(experts.act_fn, "block.experts.act_fn")
    gate_up_E2HD: Tensor = experts.gate_up_proj
    down_EDH: Tensor = experts.down_proj
    num_experts, two_hidden, dim = gate_up_E2HD.shape
    out = SwiGLUExperts(num_experts, dim, two_hidden // 2, activation=act)
    out.to(device=gate_up_E2HD.device, dtype=gate_up_E2HD.dtype)
    with torch.no_grad():
        # HF computes x @ W.T with W [2H, D]; the library x @ W with W [D, 2H]: same columns
        out.w_gate_up.copy_(gate_up_E2HD.transpose(1, 2))
        out.w_down.copy_(down_EDH.transpose(1, 2))
    return out


def _swiglu_to_fused(experts: nn.Module, like_experts: HFModule) -> None:
    if not isinstance(experts, SwiGLUExperts):
        raise TypeError(f"moe.experts: expected SwiGLUExperts, got {type(experts).__name__}")
    _check_fused_experts(like_experts)
    like_act = _activation_name(like_experts.act_fn, "like.experts.act_fn")
    if experts.activation != like_act:
        raise ValueError(
            f"moe.experts.activation: expected {like_act!r} (like's experts), "
            f"got {experts.activation!r}"
        )
    target_gate_up: Tensor = like_experts.gate_up_proj
    target_down: Tensor = like_experts.down_proj
    expected = (experts.num_experts, 2 * experts.hidden_dim, experts.dim)
    if tuple(target_gate_up.shape) != expected:
        raise ValueError(
            f"like.experts.gate_up_proj: expected shape {expected} (from moe.experts), "
            f"got {tuple(target_gate_up.shape)}"
        )
    with torch.no_grad():
        target_gate_up.copy_(experts.w_gate_up.transpose(1, 2))
        target_down.copy_(experts.w_down.transpose(1, 2))


def _topk_router(
    weight_ED: Tensor, spec: dict[str, Any], balance_coef: float, z_coef: float
) -> TopKRouter:
    """A :class:`TopKRouter` with the routing ``spec`` (TopKRouter keyword arguments)."""
    num_experts, dim = weight_ED.shape
    router = TopKRouter(
        dim, num_experts, balance_loss_coef=balance_coef, z_loss_coef=z_coef, **spec
    )
    router.to(device=weight_ED.device, dtype=weight_ED.dtype)
    with torch.no_grad():
        router.gate.weight.copy_(weight_ED)
    return router


def _check_router(moe: MoELayer, spec: dict[str, Any], family: str) -> TopKRouter:
    """``moe.router`` routes as ``spec`` says (jitter aside: it only acts in training)."""
    router = moe.router
    if not isinstance(router, TopKRouter):
        raise TypeError(
            f"moe.router: expected a TopKRouter for {family}, got {type(router).__name__}"
        )
    want = {key: value for key, value in spec.items() if key != "jitter_noise"}
    want.setdefault("capacity_factor", None)
    for key, value in want.items():
        got = getattr(router, key, None)
        if key == "expert_bias":
            got = got is not None
        if got != value:
            raise ValueError(
                f"moe.router.{key}: expected {value!r} (the {family} block's routing), got {got!r}"
            )
    return router


def _copy_into(target: Tensor, source: Tensor, what: str) -> None:
    if target.shape != source.shape:
        raise ValueError(
            f"like's {what}: expected shape {tuple(source.shape)} (from moe), "
            f"got {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(source)


def _copy_gate(router: TopKRouter, target_ED: Tensor) -> None:
    _copy_into(target_ED, router.gate.weight, "router weight")


# --- shared experts (Qwen2-MoE, DeepSeek-V3): a dense SwiGLU MLP, optionally gated ----------


class SwiGLUMLP(nn.Module):
    """A dense gated MLP ``down(act(gate(x)) * up(x))``, bias-free (Shazeer 2020).

    SwiGLU with the default ``activation="silu"``; another name of ``experts._ACTIVATIONS``
    gives the other GLU variants (``"gelu"``: GeGLU). The library's form of Hugging Face's
    shared experts (``Qwen2MoeMLP``, ``DeepseekV3MLP``, whose activation is the config's
    ``hidden_act``); parameter names follow them (``gate_proj``, ``up_proj``:
    ``nn.Linear(D, H)``; ``down_proj``: ``nn.Linear(H, D)``). Maps ``[..., D] -> [..., D]``.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu") -> None:
        super().__init__()
        if not isinstance(activation, str) or activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        self.activation = activation
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = _ACTIVATIONS[self.activation]
        out: Tensor = self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
        return out

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def _check_hf_mlp(mlp: HFModule, what: str) -> str:
    """The gated MLP's activation name, after checking its three bias-free linears."""
    for name in _MLP_LINEARS:
        layer = getattr(mlp, name, None)
        if not isinstance(layer, nn.Linear) or layer.bias is not None:
            raise ValueError(f"{what}.{name}: expected a bias-free nn.Linear, got {layer!r}")
    return _activation_name(mlp.act_fn, f"{what}.act_fn")


def _shared_from_hf(mlp: HFModule, what: str) -> SwiGLUMLP:
    act = _check_hf_mlp(mlp, what)
    weight = mlp.gate_proj.weight
    shared = SwiGLUMLP(weight.shape[1], weight.shape[0], act)
    shared.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for name in _MLP_LINEARS:
            getattr(shared, name).weight.copy_(getattr(mlp, name).weight)
    return shared


def _shared_to_hf(moe: MoELayer, mlp: HFModule, what: str) -> None:
    shared = moe.shared_experts
    if not isinstance(shared, SwiGLUMLP):
        raise TypeError(
            f"moe.shared_experts: expected a SwiGLUMLP (as from_hf builds), "
            f"got {type(shared).__name__}"
        )
    act = _check_hf_mlp(mlp, what)
    if shared.activation != act:
        raise ValueError(
            f"moe.shared_experts.activation: expected {act!r} ({what}'s), got {shared.activation!r}"
        )
    for name in _MLP_LINEARS:
        _copy_into(getattr(mlp, name).weight, getattr(shared, name).weight, f"{what}.{name}")


# --- Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax top-k over fused SwiGLU experts ----------


def _softmax_topk_spec(block: HFModule) -> dict[str, Any]:
    return {
        "top_k": int(block.gate.top_k),
        "score_func": "softmax",
        # Mixtral's router always renormalises and has no flag; Qwen/OLMoE carry norm_topk_prob
        "normalize_weights": bool(getattr(block.gate, "norm_topk_prob", True)),
        "jitter_noise": float(getattr(block, "jitter_noise", 0.0) or 0.0),
    }


def _softmax_topk_from_hf(block: HFModule, balance_coef: float, z_coef: float) -> MoELayer:
    spec = _softmax_topk_spec(block)
    router = _topk_router(block.gate.weight, spec, balance_coef, z_coef)
    experts = _swiglu_from_fused(block.experts)
    recorder = make_recorder(block.gate)
    shared_mlp = getattr(block, "shared_expert", None)  # Qwen2-MoE
    if shared_mlp is None:
        return HFMoELayer(router.dim, router, experts, causal=True, router_logits=recorder)
    shared = _shared_from_hf(shared_mlp, "block.shared_expert")
    moe = HFMoELayer(
        router.dim,
        router,
        experts,
        causal=True,
        shared_experts=shared,
        shared_expert_gate=True,
        router_logits=recorder,
    )
    assert moe.shared_expert_gate is not None
    moe.shared_expert_gate.to(device=router.gate.weight.device, dtype=router.gate.weight.dtype)
    with torch.no_grad():
        moe.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
    return moe


def _softmax_topk_to_hf(moe: MoELayer, block: HFModule) -> None:
    router = _check_router(moe, _softmax_topk_spec(block), type(block).__name__)
    shared_mlp = getattr(block, "shared_expert", None)
    if (shared_mlp is None) != (moe.shared_experts is None):
        raise ValueError(
            f"moe.shared_experts: expected {'a shared expert' if shared_mlp else 'None'} "
            f"(as in like), got {type(moe.shared_experts).__name__}"
        )
    _copy_gate(router, block.gate.weight)
    _swiglu_to_fused(moe.experts, block.experts)
    if shared_mlp is not None:
        if moe.shared_expert_gate is None:
            raise ValueError("moe.shared_expert_gate: expected a gate (Qwen2-MoE), got None")
        _shared_to_hf(moe, shared_mlp, "like.shared_expert")
        _copy_into(
            block.shared_expert_gate.weight,
            moe.shared_expert_gate.weight,
            "shared_expert_gate.weight",
        )


# --- DeepSeek-V3: sigmoid scores, selection bias, group-limited top-k, scaling, shared MLP ---


def _deepseek_spec(block: HFModule) -> dict[str, Any]:
    gate = block.gate
    num_groups = int(gate.num_group or 1)
    return {
        "top_k": int(gate.top_k),
        "score_func": "sigmoid",
        "normalize_weights": bool(gate.norm_topk_prob),
        "expert_bias": True,
        "num_groups": num_groups,
        "topk_groups": int(gate.topk_group or num_groups),
        "group_score": "top2_sum",
        "routed_scaling_factor": float(gate.routed_scaling_factor),
    }


def _deepseek_from_hf(block: HFModule, balance_coef: float, z_coef: float) -> MoELayer:
    spec = _deepseek_spec(block)
    router = _topk_router(block.gate.weight, spec, balance_coef, z_coef)
    assert router.expert_bias is not None
    with torch.no_grad():
        router.expert_bias.copy_(block.gate.e_score_correction_bias)
    experts = _swiglu_from_fused(block.experts)
    shared = _shared_from_hf(block.shared_experts, "block.shared_experts")
    return HFMoELayer(
        router.dim,
        router,
        experts,
        causal=True,
        shared_experts=shared,
        router_logits=make_recorder(block.gate),
    )


def _deepseek_to_hf(moe: MoELayer, block: HFModule) -> None:
    router = _check_router(moe, _deepseek_spec(block), type(block).__name__)
    if moe.shared_expert_gate is not None:
        raise ValueError("moe.shared_expert_gate: expected None (DeepSeek-V3), got a gate")
    _copy_gate(router, block.gate.weight)
    assert router.expert_bias is not None
    _copy_into(block.gate.e_score_correction_bias, router.expert_bias, "e_score_correction_bias")
    _swiglu_to_fused(moe.experts, block.experts)
    _shared_to_hf(moe, block.shared_experts, "like.shared_experts")


# --- Switch Transformers: top-1, raw probability, per-expert ModuleDict --------------------------


def _switch_expert_linears(block: HFModule) -> list[tuple[nn.Linear, nn.Linear]]:
    pairs = []
    for index in range(int(block.router.num_experts)):
        expert = block.experts[f"expert_{index}"]
        if expert.wi.bias is not None or expert.wo.bias is not None:
            raise ValueError("block.experts: expected bias-free wi/wo (Switch), got biases")
        pairs.append((expert.wi, expert.wo))
    return pairs


def _switch_spec(block: HFModule) -> dict[str, Any]:
    return {
        "top_k": 1,
        "score_func": "softmax",
        "normalize_weights": False,
        "jitter_noise": float(block.router.jitter_noise or 0.0),
    }


def _switch_from_hf(block: HFModule, balance_coef: float, z_coef: float) -> MoELayer:
    classifier: nn.Linear = block.router.classifier
    if classifier.bias is not None:
        raise ValueError(
            "block.router.classifier.bias: expected None (router_bias=False); the library's "
            "router has no bias"
        )
    router = _topk_router(classifier.weight, _switch_spec(block), balance_coef, z_coef)
    pairs = _switch_expert_linears(block)
    wi = pairs[0][0].weight
    activation = _activation_name(block.experts["expert_0"].act, "block.experts.expert_0.act")
    experts = MLPExperts(len(pairs), wi.shape[1], wi.shape[0], activation, bias=False)
    experts.to(device=wi.device, dtype=wi.dtype)
    with torch.no_grad():
        for index, (w_in, w_out) in enumerate(pairs):
            experts.w_in[index].copy_(w_in.weight.T)
            experts.w_out[index].copy_(w_out.weight.T)
    return HFMoELayer(
        router.dim,
        router,
        experts,
        causal=True,
        router_logits=make_recorder(block.router),
        logits_format="switch",
    )


def _switch_to_hf(moe: MoELayer, block: HFModule) -> None:
    router = _check_router(moe, _switch_spec(block), type(block).__name__)
    experts = moe.experts
    if not isinstance(experts, MLPExperts) or experts.b_in is not None:
        raise TypeError("moe.experts: expected MLPExperts(bias=False) for a Switch block")
    activation = _activation_name(block.experts["expert_0"].act, "like.experts.expert_0.act")
    if activation != experts.activation:
        raise ValueError(
            f"moe.experts.activation: expected {activation!r} (the block's), "
            f"got {experts.activation!r}"
        )
    _copy_gate(router, block.router.classifier.weight)
    pairs = _switch_expert_linears(block)
    if len(pairs) != experts.num_experts or pairs[0][0].weight.shape != experts.w_in[0].T.shape:
        raise ValueError(
            f"like: expected {experts.num_experts} experts of shape "
            f"{tuple(experts.w_in[0].T.shape)}, got {len(pairs)} of "
            f"{tuple(pairs[0][0].weight.shape)}"
        )
    with torch.no_grad():
        for index, (w_in, w_out) in enumerate(pairs):
            w_in.weight.copy_(experts.w_in[index].T)
            w_out.weight.copy_(experts.w_out[index].T)


def _families() -> dict[str, _Family]:
    topk = _Family("softmax-top-k", _softmax_topk_from_hf, _softmax_topk_to_hf)
    return {
        "MixtralSparseMoeBlock": topk,
        "Qwen2MoeSparseMoeBlock": topk,
        "Qwen3MoeSparseMoeBlock": topk,
        "DeepseekV3MoE": _Family("deepseek-v3", _deepseek_from_hf, _deepseek_to_hf),
        "OlmoeSparseMoeBlock": topk,
        "SwitchTransformersSparseMLP": _Family("switch", _switch_from_hf, _switch_to_hf),
    }


def supported_blocks() -> tuple[str, ...]:
    """Class names of the Hugging Face blocks :func:`from_hf` and :func:`to_hf` convert."""
    return tuple(sorted(_families()))


def _family_of(block: object, argument: str) -> _Family:
    if not isinstance(block, nn.Module):
        raise TypeError(f"{argument}: expected a transformers MoE block, got {type(block)}")
    name = type(block).__name__
    family = _families().get(name)
    if family is None:
        raise TypeError(f"{argument}: expected one of {', '.join(supported_blocks())}, got {name}")
    return family


def from_hf(
    block: nn.Module,
    *,
    balance_loss_coef: float = _BALANCE_COEF,
    z_loss_coef: float = _Z_COEF,
) -> HFMoELayer:
    """An equivalent :class:`MoELayer` for a Hugging Face sparse-MoE block.

    Weights are copied (the layer shares no storage with ``block``) onto the block's device
    and dtype; the layer is in the block's train/eval mode. Its forward on ``x``
    ``[B, T, D]`` equals ``block(x)`` (float32, eval mode; see the module notes for the
    corners where semantics differ), and its
    ``aux_losses["load_balancing"]`` equals ``transformers``' ``load_balancing_loss_func`` on
    the same router logits.

    The layer is an :class:`~pytorch_mixtures.interop.HFMoELayer`: inside the model it
    records its router logits where ``transformers`` looks for the block's (its
    ``router_logits`` submodule stands in for the block's router class), so with
    ``output_router_logits=True`` the model's ``outputs.router_logits``, ``outputs.aux_loss``
    and the ``router_aux_loss_coef * aux_loss`` term of ``outputs.loss`` are ``transformers``'
    own, computed on the library's logits with gradient to the library's router. That is the
    aux loss of a converted model; the layer's own coefficients therefore default to 0, so
    ``pm.aux_loss(model)`` adds nothing and nothing is counted twice. (Replace every block
    at once, mask routing included, with :func:`from_hf_model`.)

    Args:
        block: one of :func:`supported_blocks` (e.g. ``model.model.layers[i].mlp`` of a
            ``MixtralForCausalLM``).
        balance_loss_coef: weight of the library's per-layer balance loss in ``moe.aux_loss``
            (default 0: ``transformers`` adds its own pooled loss). A nonzero value adds a
            per-layer loss on top; see the README for how it relates to the pooled one.
        z_loss_coef: weight of the router z-loss (default 0; Hugging Face's decoder MoEs use
            none).

    Returns:
        An :class:`~pytorch_mixtures.interop.HFMoELayer` (a :class:`MoELayer`) with a
        :class:`TopKRouter` and stacked experts.

    Raises:
        TypeError: ``block`` is not a supported block.
        ValueError: the block uses a feature the library does not reproduce (router bias,
            an activation with learned parameters or outside ``experts._ACTIVATIONS``, a
            non-fused expert layout).
    """
    moe = _family_of(block, "block").from_hf(block, balance_loss_coef, z_loss_coef)
    assert isinstance(moe, HFMoELayer)
    # a fresh module is in training mode, where jitter applies: follow the block's mode
    return moe.train(block.training)


def from_hf_model(
    model: nn.Module,
    *,
    balance_loss_coef: float = _BALANCE_COEF,
    z_loss_coef: float = _Z_COEF,
    route_mask: bool = True,
    attach_loss: bool = True,
) -> nn.Module:
    """Replace every supported sparse-MoE block inside ``model`` by :func:`from_hf`, in place.

    Each block (an instance of one of :func:`supported_blocks`, wherever it sits) becomes the
    equivalent :class:`~pytorch_mixtures.interop.HFMoELayer`; with ``route_mask`` the model's
    ``attention_mask`` is handed to them on every call (:func:`route_attention_mask`), so
    padding is neither routed nor counted in the layers' losses and statistics, as
    ``transformers`` leaves it out of its aux loss when it has the mask. Training then goes
    through the model as before: ``output_router_logits=True`` (or
    ``config.output_router_logits``) makes ``outputs.aux_loss`` and ``outputs.loss``
    ``transformers``' own, exactly.

    Args:
        model: a ``transformers`` model (``MixtralForCausalLM``, ...).
        balance_loss_coef, z_loss_coef: passed to :func:`from_hf` (default 0).
        route_mask: call :func:`route_attention_mask` (not for encoder-decoder models, whose
            decoder has its own mask: Switch Transformers).
        attach_loss: call :func:`~pytorch_mixtures.interop.attach_aux_loss`: a call's loss
            then also includes ``pm.aux_loss(model)`` (0 with the default coefficients), and
            under ``transformers.Trainer``'s gradient accumulation (``num_items_in_batch``)
            ``transformers``' own aux term is weighted by the micro-batch's share of the
            accumulated tokens, as its LM loss is, instead of once per micro-batch. Without
            ``num_items_in_batch`` the loss is exactly ``transformers``'.

    ``model.save_pretrained`` (and ``transformers.Trainer`` checkpoints) then write the
    converted model's own layout, which Trainer resumes from exactly; to save the native
    ``transformers`` layout use :func:`~pytorch_mixtures.interop.export_pretrained`.

    Returns:
        ``model`` itself, modified in place.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` holds no supported block; or as :func:`from_hf`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(route_mask, bool):
        raise TypeError(f"route_mask: expected a bool, got {route_mask!r}")
    if not isinstance(attach_loss, bool):
        raise TypeError(f"attach_loss: expected a bool, got {attach_loss!r}")
    names = set(_families())
    targets = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if type(child).__name__ in names
    ]
    if not targets:
        raise ValueError(
            f"model: expected a model holding one of {', '.join(supported_blocks())}, "
            f"found none in {type(model).__name__}"
        )
    for parent, child_name, child in targets:
        converted = from_hf(child, balance_loss_coef=balance_loss_coef, z_loss_coef=z_loss_coef)
        setattr(parent, child_name, converted)
    if route_mask:
        route_attention_mask(model)
    if callable(getattr(model, "save_pretrained", None)):
        # save_pretrained (and so every Trainer checkpoint) reverts transformers' weight
        # conversions for the model_type, renaming the converted layers' keys (Mixtral:
        # mlp -> block_sparse_moe), which Trainer's resume (a plain load_state_dict) then misses:
        # an empty list saves the model's own layout; export_pretrained writes the native one
        object.__setattr__(model, "_weight_conversions", [])
    if attach_loss:
        from .upcycle import attach_aux_loss  # upcycle imports this module: import late

        attach_aux_loss(model)
    return model


def to_hf(moe: MoELayer, *, like: nn.Module) -> nn.Module:
    """A copy of the Hugging Face block ``like`` carrying ``moe``'s weights.

    ``like`` is left untouched; the returned block has its class and config and computes what
    ``moe`` computes (``to_hf(from_hf(b), like=b)`` reproduces ``b``'s state dict exactly).

    Args:
        moe: a layer as :func:`from_hf` builds it (same router kind, top-k and expert layout).
        like: a block of the target family and shapes, e.g. the one ``moe`` came from.

    Raises:
        TypeError: ``like`` is not supported or ``moe`` has another router/experts kind.
        ValueError: shapes or routing settings (top-k, renormalisation, capacity) differ.
    """
    if not isinstance(moe, MoELayer):
        raise TypeError(f"moe: expected a pytorch_mixtures MoELayer, got {type(moe).__name__}")
    family = _family_of(like, "like")
    block = copy.deepcopy(like)
    family.to_hf(moe, block)
    return block
