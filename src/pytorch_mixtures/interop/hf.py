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
``Qwen3MoeSparseMoeBlock``          softmax top-k, renormalised iff ``norm_topk_prob``
``OlmoeSparseMoeBlock``             same routing as Qwen3-MoE
``SwitchTransformersSparseMLP``     softmax top-1, raw probability weight (Fedus et al. 2021),
                                    ReLU/GELU ``MLPExperts``; see the capacity note below
==================================  ==========================================================

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

Shape legend: E experts, D model dim, H expert hidden dim.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import MLPExperts, SwiGLUExperts
from ..moe_layer import MoELayer
from ..routing import TopKRouter

__all__ = ["from_hf", "supported_blocks", "to_hf"]

# transformers modules are typed by duck: their submodules and tensors are read by name
HFModule = Any

# defaults of TopKRouter, repeated here so from_hf's signature documents them
_BALANCE_COEF = 0.01
_Z_COEF = 0.001


@dataclass(frozen=True)
class _Family:
    """How one Hugging Face block class maps to a library layer and back."""

    name: str
    from_hf: Callable[[HFModule, float, float], MoELayer]
    to_hf: Callable[[MoELayer, HFModule], None]


def _activation_name(act: Callable[[Tensor], Tensor]) -> str:
    """Name of the library activation that ``act`` computes, found numerically.

    Hugging Face activations are many classes (``ACT2FN``); comparing outputs on a probe grid
    identifies the function itself, whatever class implements it.
    """
    probe = torch.linspace(-6.0, 6.0, 241)
    with torch.no_grad():
        got = act(probe)
    candidates: dict[str, Callable[[Tensor], Tensor]] = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
    }
    for name, fn in candidates.items():
        if isinstance(got, Tensor) and torch.allclose(got.float(), fn(probe), atol=1e-6):
            return name
    raise ValueError(
        f"activation: expected one of {sorted(candidates)} (as computed by the block's "
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
    act = _activation_name(experts.act_fn)
    if act != "silu":
        raise ValueError(f"block.experts.act_fn: expected silu (SwiGLU experts), got {act}")
    gate_up_E2HD: Tensor = experts.gate_up_proj
    down_EDH: Tensor = experts.down_proj
    num_experts, two_hidden, dim = gate_up_E2HD.shape
    out = SwiGLUExperts(num_experts, dim, two_hidden // 2)
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
    weight_ED: Tensor,
    top_k: int,
    *,
    normalize: bool,
    jitter: float,
    balance_coef: float,
    z_coef: float,
) -> TopKRouter:
    num_experts, dim = weight_ED.shape
    router = TopKRouter(
        dim,
        num_experts,
        top_k,
        score_func="softmax",
        normalize_weights=normalize,
        jitter_noise=jitter,
        balance_loss_coef=balance_coef,
        z_loss_coef=z_coef,
    )
    router.to(device=weight_ED.device, dtype=weight_ED.dtype)
    with torch.no_grad():
        router.gate.weight.copy_(weight_ED)
    return router


def _check_router(moe: MoELayer, *, top_k: int, normalize: bool, family: str) -> TopKRouter:
    router = moe.router
    if not isinstance(router, TopKRouter):
        raise TypeError(f"moe.router: expected a TopKRouter for {family}, got {type(router)}")
    got = {
        "top_k": router.top_k,
        "score_func": router.score_func,
        "normalize_weights": router.normalize_weights,
    }
    want = {"top_k": top_k, "score_func": "softmax", "normalize_weights": normalize}
    for key, value in want.items():
        if got[key] != value:
            raise ValueError(
                f"moe.router.{key}: expected {value!r} (the {family} block's routing), "
                f"got {got[key]!r}"
            )
    return router


def _copy_gate(router: TopKRouter, target_ED: Tensor) -> None:
    if target_ED.shape != router.gate.weight.shape:
        raise ValueError(
            f"like's router weight: expected shape {tuple(router.gate.weight.shape)} "
            f"(from moe.router), got {tuple(target_ED.shape)}"
        )
    with torch.no_grad():
        target_ED.copy_(router.gate.weight)


# --- Mixtral, Qwen3-MoE, OLMoE: softmax top-k over fused SwiGLU experts -----------------------


def _normalizes(block: HFModule) -> bool:
    # Mixtral's router always renormalises and has no flag; Qwen/OLMoE carry norm_topk_prob
    return bool(getattr(block.gate, "norm_topk_prob", True))


def _softmax_topk_from_hf(block: HFModule, balance_coef: float, z_coef: float) -> MoELayer:
    router = _topk_router(
        block.gate.weight,
        int(block.gate.top_k),
        normalize=_normalizes(block),
        jitter=float(getattr(block, "jitter_noise", 0.0) or 0.0),
        balance_coef=balance_coef,
        z_coef=z_coef,
    )
    experts = _swiglu_from_fused(block.experts)
    return MoELayer(router.dim, router, experts, causal=True)


def _softmax_topk_to_hf(moe: MoELayer, block: HFModule) -> None:
    router = _check_router(
        moe, top_k=int(block.gate.top_k), normalize=_normalizes(block), family="top-k"
    )
    if router.capacity_factor is not None:
        raise ValueError(
            f"moe.router.capacity_factor: expected None (the block is dropless), "
            f"got {router.capacity_factor}"
        )
    _copy_gate(router, block.gate.weight)
    _swiglu_to_fused(moe.experts, block.experts)


# --- Switch Transformers: top-1, raw probability, per-expert ModuleDict --------------------------


def _switch_expert_linears(block: HFModule) -> list[tuple[nn.Linear, nn.Linear]]:
    pairs = []
    for index in range(int(block.router.num_experts)):
        expert = block.experts[f"expert_{index}"]
        if expert.wi.bias is not None or expert.wo.bias is not None:
            raise ValueError("block.experts: expected bias-free wi/wo (Switch), got biases")
        pairs.append((expert.wi, expert.wo))
    return pairs


def _switch_from_hf(block: HFModule, balance_coef: float, z_coef: float) -> MoELayer:
    classifier: nn.Linear = block.router.classifier
    if classifier.bias is not None:
        raise ValueError(
            "block.router.classifier.bias: expected None (router_bias=False); the library's "
            "router has no bias"
        )
    router = _topk_router(
        classifier.weight,
        1,
        normalize=False,
        jitter=float(block.router.jitter_noise or 0.0),
        balance_coef=balance_coef,
        z_coef=z_coef,
    )
    pairs = _switch_expert_linears(block)
    wi = pairs[0][0].weight
    activation = _activation_name(block.experts["expert_0"].act)
    experts = MLPExperts(len(pairs), wi.shape[1], wi.shape[0], activation, bias=False)
    experts.to(device=wi.device, dtype=wi.dtype)
    with torch.no_grad():
        for index, (w_in, w_out) in enumerate(pairs):
            experts.w_in[index].copy_(w_in.weight.T)
            experts.w_out[index].copy_(w_out.weight.T)
    return MoELayer(router.dim, router, experts, causal=True)


def _switch_to_hf(moe: MoELayer, block: HFModule) -> None:
    router = _check_router(moe, top_k=1, normalize=False, family="Switch")
    experts = moe.experts
    if not isinstance(experts, MLPExperts) or experts.b_in is not None:
        raise TypeError("moe.experts: expected MLPExperts(bias=False) for a Switch block")
    activation = _activation_name(block.experts["expert_0"].act)
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
        "Qwen3MoeSparseMoeBlock": topk,
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
) -> MoELayer:
    """An equivalent :class:`MoELayer` for a Hugging Face sparse-MoE block.

    Weights are copied (the layer shares no storage with ``block``) onto the block's device
    and dtype; the layer is in the block's train/eval mode. Its forward on ``x``
    ``[B, T, D]`` equals ``block(x)`` (float32, eval mode; see the module notes for the
    corners where semantics differ), and its
    ``aux_losses["load_balancing"]`` equals ``transformers``' ``load_balancing_loss_func`` on
    the same router logits.

    Args:
        block: one of :func:`supported_blocks` (e.g. ``model.model.layers[i].mlp`` of a
            ``MixtralForCausalLM``).
        balance_loss_coef: weight of the balance loss in ``moe.aux_loss``; pass
            ``config.router_aux_loss_coef`` to mirror Hugging Face's training loss.
        z_loss_coef: weight of the router z-loss (Hugging Face's decoder MoEs use none: 0.0).

    Returns:
        A :class:`MoELayer` with a :class:`TopKRouter` and stacked experts.

    Raises:
        TypeError: ``block`` is not a supported block.
        ValueError: the block uses a feature the library does not reproduce (router bias,
            an activation other than SiLU for SwiGLU experts, a non-fused expert layout).
    """
    moe = _family_of(block, "block").from_hf(block, balance_loss_coef, z_loss_coef)
    # a fresh module is in training mode, where jitter applies: follow the block's mode
    return moe.train(block.training)


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
