"""Sparse upcycling of dense Hugging Face models, and the aux-loss hook for HF training.

``moeify(model, num_experts=8, top_k=2)`` replaces the dense MLPs of a ``transformers``
decoder in place with :class:`MoELayer` s whose experts start as copies of the dense MLP and
whose router starts small (Komatsuzaki et al. 2022, "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints"). With renormalised top-k weights
(``normalize_weights=True``, the default) and no noise, every token's output is
``sum_k w_k * MLP(x) = MLP(x)``: the converted model's logits equal the dense model's, up to
float rounding, and training starts from the dense model's quality.

``attach_aux_loss(model)`` (done by ``moeify`` unless told otherwise) makes
``model(..., labels=...).loss`` include ``pm.aux_loss(model)``, so ``transformers.Trainer`` and
plain loops that use ``outputs.loss`` train the routers' balance and z losses with no other
change.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..checks import check_flag, check_int
from ..experts import ExpertsBase, ModuleListExperts, SwiGLUExperts
from ..losses import aux_loss
from ..moe_layer import MoELayer
from ..routing import TopKRouter
from .hf import _activation_name
from .hf_layer import HFMoELayer, route_attention_mask

__all__ = ["attach_aux_loss", "moeify"]

_HOOK_ATTR = "_pytorch_mixtures_aux_loss_hook"


def _gated_mlp_activation(mlp: nn.Module) -> str | None:
    """The activation of a Llama-style gated MLP ``down(act(gate(x)) * up(x))`` with bias-free
    linears (SwiGLU for Llama, GeGLU for Gemma), or None for any other MLP."""
    linears = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(layer, nn.Linear) and layer.bias is None for layer in linears):
        return None
    act = getattr(mlp, "act_fn", None)
    if not callable(act):
        return None
    try:
        return _activation_name(act)
    except ValueError:  # an activation the stacked experts lack: deep copies keep it exact
        return None


def _mlp_dim(mlp: nn.Module) -> int:
    for module in mlp.modules():
        if isinstance(module, nn.Linear):
            return int(module.in_features)
    raise ValueError(
        f"mlp: expected a module containing an nn.Linear (to read the model dim), got "
        f"{type(mlp).__name__}"
    )


def _add_noise(tensor: Tensor, noise: float, generator: torch.Generator | None) -> None:
    """``tensor += noise * std(tensor) * N(0, 1)``: noise relative to the weight's own scale."""
    if noise == 0:
        return
    scale = noise * float(tensor.float().std()) if tensor.numel() > 1 else noise
    randn = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    tensor.add_((scale * randn).to(device=tensor.device, dtype=tensor.dtype))


def _experts_from_mlp(
    mlp: Any, num_experts: int, noise: float, generator: torch.Generator | None
) -> ExpertsBase:
    """E copies of ``mlp``: stacked SwiGLU for Llama-style MLPs, else a list of deep copies."""
    with torch.no_grad():
        activation = _gated_mlp_activation(mlp)
        if activation is not None:
            gate_HD = mlp.gate_proj.weight
            up_HD = mlp.up_proj.weight
            down_DH = mlp.down_proj.weight
            hidden, dim = gate_HD.shape
            stacked = SwiGLUExperts(num_experts, dim, hidden, activation=activation)
            stacked.to(device=gate_HD.device, dtype=gate_HD.dtype)
            gate_up_D2H = torch.cat([gate_HD.T, up_HD.T], dim=1)
            stacked.w_gate_up.copy_(gate_up_D2H.unsqueeze(0).expand_as(stacked.w_gate_up))
            stacked.w_down.copy_(down_DH.T.unsqueeze(0).expand_as(stacked.w_down))
            for index in range(num_experts):
                _add_noise(stacked.w_gate_up[index], noise, generator)
                _add_noise(stacked.w_down[index], noise, generator)
            return stacked
        copies = [copy.deepcopy(mlp) for _ in range(num_experts)]
        for expert in copies:
            for param in expert.parameters():
                _add_noise(param, noise, generator)
        return ModuleListExperts(copies, _mlp_dim(mlp))


def _layer_lists(model: nn.Module, mlp_name: str) -> list[tuple[str, nn.ModuleList]]:
    """Every ``nn.ModuleList`` whose entries all have an ``mlp_name`` submodule (the decoders)."""
    found = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and all(isinstance(getattr(layer, mlp_name, None), nn.Module) for layer in module)
        ):
            found.append((name, module))
    return found


def moeify(
    model: nn.Module,
    *,
    num_experts: int,
    top_k: int = 2,
    every: int = 1,
    noise: float = 0.0,
    capacity_factor: float | None = None,
    balance_loss_coef: float = 0.01,
    z_loss_coef: float = 0.001,
    router_init_std: float = 0.02,
    mlp_name: str = "mlp",
    generator: torch.Generator | None = None,
    attach_loss: bool = True,
    route_mask: bool = True,
) -> nn.Module:
    """Upcycle a dense ``transformers`` model into a Mixture-of-Experts, in place.

    In every decoder layer list (an ``nn.ModuleList`` whose layers have an ``mlp_name``
    attribute, e.g. ``model.model.layers`` of Llama, Mistral, Qwen2, Gemma, GPT-2's ``h``),
    the MLP of layers ``i`` with ``(i + 1) % every == 0`` is replaced by a :class:`MoELayer`:
    an :class:`~pytorch_mixtures.interop.HFMoELayer` with a :class:`TopKRouter` (softmax,
    renormalised top-k, init std ``router_init_std``) and ``num_experts`` copies of the MLP
    (stacked :class:`SwiGLUExperts` with the MLP's activation for Llama-style
    ``gate_proj``/``up_proj``/``down_proj`` gated MLPs, SwiGLU or GeGLU; a list of deep copies
    otherwise). Sparse upcycling, Komatsuzaki et al. 2022.

    With ``noise=0`` the model's outputs are unchanged right after conversion (each token's
    renormalised top-k weights sum to 1 over identical experts); ``noise > 0`` perturbs each
    expert's weights by ``noise * std(W) * N(0, 1)`` to break the symmetry between experts.
    Routing is per token, so ``generate()`` with a KV cache works as before. With
    ``route_mask`` the model's ``attention_mask`` reaches the MoE layers
    (:func:`route_attention_mask`: the HF decoder layer does not pass it to the MLP), so
    padding tokens are not routed (their MLP output is zero: only padding positions' logits
    change) and are left out of the aux losses and statistics.

    The aux loss is the library's per-layer form: each converted layer adds
    ``balance_loss_coef * E * sum_e f_e P_e`` (and the z-loss) to ``pm.aux_loss(model)``;
    a dense model has no ``transformers`` aux loss to mirror.

    Args:
        model: a ``transformers`` model (or any module with such layer lists).
        num_experts: E >= 1.
        top_k: experts per token, in ``[1, num_experts]``.
        every: convert every ``every``-th layer (``every=2``: layers 1, 3, 5, ... counted from 0,
            like Qwen2-MoE's ``decoder_sparse_step``).
        noise: relative std of the noise added to each expert copy (>= 0).
        capacity_factor: None (dropless) or the router's capacity factor.
        balance_loss_coef: weight of the balance loss in each layer's ``aux_loss``.
        z_loss_coef: weight of the router z-loss.
        router_init_std: std of the router's normal init (small: near-uniform routing).
        mlp_name: attribute name of the MLP inside each layer.
        generator: random generator for the router init and the noise (reproducibility).
        attach_loss: call :func:`attach_aux_loss` so ``outputs.loss`` includes
            ``pm.aux_loss(model)`` (then do not add it again yourself).
        route_mask: call :func:`route_attention_mask` so padding is excluded (decoder-only
            models; pass False for an encoder-decoder).

    Returns:
        ``model`` itself, modified in place.

    Raises:
        ValueError: bad arguments, or no layer list with ``mlp_name`` found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    num_experts = check_int("num_experts", num_experts)
    top_k = check_int("top_k", top_k, 1, num_experts)
    every = check_int("every", every)
    check_flag("attach_loss", attach_loss)
    check_flag("route_mask", route_mask)
    for name, value in (("noise", noise), ("router_init_std", router_init_std)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float >= 0, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: expected a finite float >= 0, got {value}")
    layer_lists = _layer_lists(model, mlp_name)
    if not layer_lists:
        raise ValueError(
            f"mlp_name: expected layers with a {mlp_name!r} submodule inside an nn.ModuleList "
            f"of {type(model).__name__}, found none"
        )
    _check_every_reaches_a_layer(every, [layers for _, layers in layer_lists], "converted")
    for _, layers in layer_lists:
        for index, layer in enumerate(layers):
            if (index + 1) % every != 0:
                continue
            mlp: nn.Module = getattr(layer, mlp_name)
            if isinstance(mlp, MoELayer):
                raise ValueError(f"model: layer {index}'s {mlp_name} is already a MoELayer")
            experts = _experts_from_mlp(mlp, num_experts, float(noise), generator)
            router = TopKRouter(
                experts.dim,
                num_experts,
                top_k,
                capacity_factor=capacity_factor,
                balance_loss_coef=balance_loss_coef,
                z_loss_coef=z_loss_coef,
                init_std=router_init_std,
            )
            reference = next(mlp.parameters())
            with torch.no_grad():
                weight = torch.randn(router.gate.weight.shape, generator=generator)
                router.gate.weight.copy_(weight * router_init_std)
            router.to(device=reference.device, dtype=reference.dtype)
            setattr(layer, mlp_name, HFMoELayer(experts.dim, router, experts, causal=True))
    if attach_loss:
        attach_aux_loss(model)
    if route_mask:
        route_attention_mask(model)
    return model


def _check_every_reaches_a_layer(every: int, layer_lists: list[nn.ModuleList], done: str) -> None:
    """``every`` larger than every layer list would change nothing: say so, do not do nothing."""
    most_layers = max(len(layers) for layers in layer_lists)
    if every > most_layers:
        raise ValueError(
            f"every: expected at most {most_layers} (the model's decoder layers), got {every}: "
            f"no layer would be {done}"
        )


def _micro_batch_share(module: nn.Module, kwargs: dict[str, Any]) -> Tensor | float | None:
    """This call's share of the accumulated batch's label tokens, or None outside accumulation.

    ``transformers.Trainer`` (with a model that accepts loss kwargs, as every causal LM does)
    passes ``num_items_in_batch``: the label tokens of all micro-batches of one optimizer step.
    The model's LM loss is then ``sum / num_items_in_batch`` and Trainer does *not* divide it by
    the accumulation steps, so a per-call aux loss added unscaled would be counted once per
    micro-batch (twice the weight at ``gradient_accumulation_steps=2``). Weighting it by the
    call's own label count over ``num_items_in_batch``, counted as Trainer counts (``shift_labels``
    if given, else ``labels[..., 1:]`` for a decoder-only causal LM, else ``labels``), gives it
    the weight its LM loss has; the weights of one optimizer step sum to 1.
    """
    total = kwargs.get("num_items_in_batch")
    if total is None:
        return None
    labels = kwargs.get("shift_labels")
    if not isinstance(labels, Tensor):
        labels = kwargs.get("labels")
        if not isinstance(labels, Tensor):
            return None
        config = getattr(module, "config", None)
        shifts = getattr(module, "loss_type", None) == "ForCausalLM" and not getattr(
            config, "is_encoder_decoder", False
        )
        if shifts:
            labels = labels[..., 1:]
    count = labels.ne(-100).sum()
    if isinstance(total, Tensor):
        return count / total.to(count.device)
    return float(count) / float(total)


def _add_aux_loss(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
    """The forward hook of :func:`attach_aux_loss` (module level: a hooked model pickles)."""
    loss = getattr(output, "loss", None)
    if not isinstance(loss, Tensor):
        return output
    extra = aux_loss(module).to(device=loss.device, dtype=loss.dtype)
    share = _micro_batch_share(module, kwargs)
    if share is not None:
        # transformers' own router term (converted MoE models with output_router_logits) is
        # added per call unscaled too: give it the same micro-batch weight as the LM loss
        own_aux = getattr(output, "aux_loss", None)
        coef = getattr(module, "router_aux_loss_coef", None)
        if isinstance(own_aux, Tensor) and isinstance(coef, (int, float)) and coef != 0:
            own = coef * own_aux.to(device=loss.device, dtype=loss.dtype)
            loss = loss - own
            extra = extra + own
        extra = extra * share
    output.loss = loss + extra
    return output


def attach_aux_loss(model: nn.Module) -> RemovableHandle:
    """Make ``model(...).loss`` include ``pm.aux_loss(model)`` whenever the model returns a loss.

    A forward hook on ``model``: when the output has a ``loss`` that is not None (a
    ``transformers`` ``ModelOutput`` computed with ``labels``), it becomes
    ``loss + pm.aux_loss(model)``; ``outputs.loss``, ``outputs["loss"]`` and ``outputs[0]``
    all see the sum. This is what ``transformers.Trainer`` reads, so no callback or
    ``compute_loss`` override is needed. Calls without labels (``generate()``, evaluation
    logits) are untouched. Attaching twice is a no-op returning the first handle.

    Gradient accumulation: when the call carries ``num_items_in_batch`` (``transformers.Trainer``
    passes it; the LM loss is then a share of the whole accumulated batch and Trainer does not
    divide by the accumulation steps), the aux terms (``pm.aux_loss(model)`` and, for a converted
    MoE model, ``transformers``' own ``router_aux_loss_coef * outputs.aux_loss``) are weighted by
    the call's share of the accumulated label tokens, the weight its LM loss has. The aux loss
    of one optimizer step is then the token-weighted mean of its micro-batches' aux losses, not
    their sum: with identical micro-batches, accumulated gradients equal one big batch's. A call
    without ``num_items_in_batch`` (a plain loop, ``gradient_accumulation_steps=1`` without
    loss kwargs) adds ``pm.aux_loss(model)`` as is.

    Tuple outputs (``return_dict=False``) are not modified: add ``pm.aux_loss(model)`` to the
    loss yourself there.

    Returns:
        The hook's handle; ``handle.remove()`` detaches it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    existing = getattr(model, _HOOK_ATTR, None)
    if isinstance(existing, RemovableHandle) and existing.id in model._forward_hooks:
        return existing
    handle = model.register_forward_hook(_add_aux_loss, with_kwargs=True)
    object.__setattr__(model, _HOOK_ATTR, handle)
    return handle
