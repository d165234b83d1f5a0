"""The library layer inside a Hugging Face model: router-logit recording and the padding mask.

A ``transformers`` decoder calls its MLP as ``mlp(hidden_states)``: no attention mask, and the
model collects router logits (``output_router_logits=True``) with forward hooks on modules of
its router class (``_can_record_outputs``: ``OutputRecorder(MixtralTopKRouter, index=0)`` and
the like, installed lazily on the first call that asks for them). Two things bring a library
layer up to what a native block does there:

* :class:`HFMoELayer` (what :func:`~pytorch_mixtures.interop.from_hf` and
  :func:`~pytorch_mixtures.interop.moeify` build): a :class:`MoELayer` that, for converted
  blocks, calls a parameter-free ``router_logits`` submodule whose class derives from the
  block's own router class, with the tuple that router returns (``(logits [N, E], weights
  [N, K], experts [N, K])``, Switch's ``(one-hot [B, T, E], probs [B, T, 1], logits [B, T,
  E])``). transformers' recorders match it as they match their own router, so
  ``outputs.router_logits`` and ``outputs.aux_loss`` are transformers' own, computed from the
  library's (float32) logits, with gradient to the library's router.
* :func:`route_attention_mask` (done by :func:`~pytorch_mixtures.interop.from_hf_model` and
  :func:`~pytorch_mixtures.interop.moeify`): hooks on the model that hand the ``attention_mask``
  of each call to its :class:`HFMoELayer` s, so padding is not routed and is left out of the
  layers' aux losses and statistics, as :meth:`MoELayer.forward` does with a mask.

Shape legend: B batch, T sequence (S with a KV cache's past), N = B*T tokens, D model dim,
E experts, K experts per token.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import ExpertsBase
from ..moe_layer import MoELayer
from ..routing import Router, RouterOutput
from ..routing.base import _in_autograd_backward

__all__ = ["HFMoELayer", "MaskRouting", "route_attention_mask"]

# the formats of the tuple a transformers router returns (what its recorder indexes into)
_FORMATS = ("topk", "switch")


class RouterLogitsRecorder(nn.Module):
    """Base of the stand-ins for a transformers router class inside an :class:`HFMoELayer`.

    A concrete recorder class derives from this class and from the block's router class
    (:func:`recorder_class`), so the model's ``OutputRecorder`` matches it; it holds no
    parameters, computes nothing (``forward`` returns the routing it is given, in the router's
    tuple format) and is skipped by transformers' weight init (``_is_hf_initialized``).
    """

    #: ``(module, qualified name)`` of the transformers router class this one stands in for
    hf_router_class: tuple[str, str] = ("", "")

    def __init__(self) -> None:
        nn.Module.__init__(self)  # not the transformers router's __init__: no weight, no config
        # transformers' _initialize_weights skips flagged modules (its _init_weights would
        # look for the router's `weight`, which a recorder does not have)
        self._is_hf_initialized = True

    def forward(self, *routing: Tensor) -> tuple[Tensor, ...]:
        """Return ``routing`` as given: the router's output tuple, for the recorder hooks."""
        return tuple(routing)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the class is made at run time: pickle it by the router class it stands in for
        return (_rebuild_recorder, self.hf_router_class, self.__getstate__())

    def extra_repr(self) -> str:
        return f"records like {'.'.join(self.hf_router_class)}"


_RECORDER_CLASSES: dict[type, type[RouterLogitsRecorder]] = {}


def recorder_class(hf_router_class: type) -> type[RouterLogitsRecorder]:
    """The :class:`RouterLogitsRecorder` subclass standing in for ``hf_router_class`` (cached)."""
    cls = _RECORDER_CLASSES.get(hf_router_class)
    if cls is None:
        name = f"{hf_router_class.__name__}LogitsRecorder"
        cls = type(
            name,
            (RouterLogitsRecorder, hf_router_class),
            {
                "__module__": __name__,
                "__doc__": f"Records router outputs as {hf_router_class.__name__} does.",
                "hf_router_class": (hf_router_class.__module__, hf_router_class.__qualname__),
            },
        )
        _RECORDER_CLASSES[hf_router_class] = cls
    return cls


def _rebuild_recorder(module: str, qualname: str) -> RouterLogitsRecorder:
    router_class: Any = importlib.import_module(module)
    for part in qualname.split("."):
        router_class = getattr(router_class, part)
    cls = recorder_class(router_class)
    # an empty instance: pickle / deepcopy then restore its state with __setstate__
    instance: RouterLogitsRecorder = cls.__new__(cls)
    return instance


def make_recorder(hf_router: nn.Module) -> RouterLogitsRecorder:
    """A recorder standing in for ``hf_router``, carrying over the forward hooks it already has
    (transformers installs its recorders once; a model that recorded outputs before the
    conversion keeps recording through the converted layer)."""
    recorder = recorder_class(type(hf_router))()
    with_kwargs = getattr(hf_router, "_forward_hooks_with_kwargs", {})
    always = getattr(hf_router, "_forward_hooks_always_called", {})
    for hook_id, hook in hf_router._forward_hooks.items():
        recorder.register_forward_hook(
            hook, with_kwargs=hook_id in with_kwargs, always_call=hook_id in always
        )
    return recorder


class HFMoELayer(MoELayer):
    """A :class:`MoELayer` that lives inside a Hugging Face model (``from_hf``, ``moeify``).

    It computes exactly what :class:`MoELayer` computes; in addition:

    * with ``router_logits`` (a :class:`RouterLogitsRecorder`, set by ``from_hf``), every
      forward calls it with the routing in the converted block's router format, so
      transformers' ``output_router_logits`` records this layer's logits (``[N, E]`` float32,
      with gradient; training jitter included, as the block's router sees it);
    * a forward without an ``attention_mask`` uses the one :func:`route_attention_mask` handed
      over for the model's current call (the last ``T`` columns of the model's ``[B, S]`` mask:
      with a KV cache the mask covers the past too), and none outside such calls. Checkpoint
      recomputation during backward sees the mask of the call it recomputes.

    Args:
        (as :class:`MoELayer`), and
        router_logits: the recorder, or None (an upcycled dense model has no router to mimic).
        logits_format: ``"topk"`` (Mixtral, Qwen, OLMoE, DeepSeek-V3 routers) or ``"switch"``.
    """

    def __init__(
        self,
        dim: int | None = None,
        router: Router | None = None,
        experts: ExpertsBase | Iterable[nn.Module] | None = None,
        capacity_factor: float | None = None,
        *,
        router_logits: RouterLogitsRecorder | None = None,
        logits_format: str = "topk",
        **kwargs: Any,
    ) -> None:
        super().__init__(dim, router, experts, capacity_factor, **kwargs)
        if router_logits is not None and not isinstance(router_logits, RouterLogitsRecorder):
            raise TypeError(
                f"router_logits: expected a RouterLogitsRecorder or None, "
                f"got {type(router_logits).__name__}"
            )
        if logits_format not in _FORMATS:
            raise ValueError(f"logits_format: expected one of {_FORMATS}, got {logits_format!r}")
        self.router_logits = router_logits
        self.logits_format = logits_format
        # the mask handed over by route_attention_mask, and whether the model's call is running
        self._model_mask: Tensor | None = None
        self._model_call_live = False
        self._last_route: RouterOutput | None = None
        # a bound method, so deepcopy and pickle rebind it to the copy
        self.router.register_forward_hook(self._keep_route)

    def _keep_route(self, router: nn.Module, args: Any, output: Any) -> None:
        if self.router_logits is not None and isinstance(output, RouterOutput):
            self.__dict__["_last_route"] = output

    def _handed_mask(self, x: Tensor) -> Tensor | None:
        mask = self._model_mask
        if mask is None or not (self._model_call_live or _in_autograd_backward()):
            return None
        if x.dim() != 3 or mask.dim() != 2 or mask.shape[0] != x.shape[0]:
            raise ValueError(
                f"attention_mask: expected the model's [B, S] mask with B={x.shape[0]} and "
                f"S >= {x.shape[-2]} for this layer's input of shape {tuple(x.shape)}, got "
                f"shape {tuple(mask.shape)} (route_attention_mask serves decoder-only models)"
            )
        if mask.shape[1] < x.shape[1]:
            raise ValueError(
                f"attention_mask: expected at least {x.shape[1]} columns (this layer's "
                f"sequence length), got shape {tuple(mask.shape)}"
            )
        return mask[:, mask.shape[1] - x.shape[1] :]

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, token_ids: Tensor | None = None
    ) -> Tensor:
        """As :meth:`MoELayer.forward`; ``attention_mask`` defaults to the model's (see above)."""
        if attention_mask is None:
            attention_mask = self._handed_mask(x)
        y = super().forward(x, attention_mask, token_ids)
        if self.router_logits is not None:
            self.router_logits(*self._routing_tuple(x))
        return y

    def _routing_tuple(self, x: Tensor) -> tuple[Tensor, ...]:
        """The converted router's output for the last forward: logits, weights, experts."""
        route, self.__dict__["_last_route"] = self._last_route, None
        if self._pending is not None:  # the decode path kept its decision
            decision = self._pending[0]
            logits_NE, weights_NK, experts_NK = (
                decision.logits,
                decision.weights,
                decision.expert_ids,
            )
        elif route is not None and route.slots_per_token is not None:
            top_k = route.slots_per_token
            logits_NE = route.logits
            weights_NK = route.weights.reshape(-1, top_k)
            experts_NK = route.expert_ids.reshape(-1, top_k)
        else:  # an empty input: nothing was routed
            num_routes = self.num_experts + self.num_noop_experts
            logits_NE = x.new_zeros(0, num_routes, dtype=torch.float32)
            weights_NK = x.new_zeros(0, 1, dtype=torch.float32)
            experts_NK = torch.zeros(0, 1, dtype=torch.long, device=x.device)
        if self.logits_format == "topk":
            return logits_NE, weights_NK, experts_NK
        # Switch: [B, T, E] logits, one-hot of the chosen expert, its probability [B, T, 1]
        leading = tuple(x.shape[:-1])
        logits_BTE = logits_NE.reshape(*leading, logits_NE.shape[-1])
        one_hot_BTE = F.one_hot(experts_NK[:, 0], logits_NE.shape[-1]).reshape(logits_BTE.shape)
        probs_BT1 = logits_BTE.softmax(dim=-1).amax(dim=-1, keepdim=True)
        return one_hot_BTE, probs_BT1, logits_BTE

    def __getstate__(self) -> dict[str, object]:
        state = dict(super().__getstate__())
        # per-call state hangs on the caller's tensors and graph: a copy starts without it
        state.update(_model_mask=None, _model_call_live=False, _last_route=None)
        return state


# --- handing the model's attention mask to its layers -------------------------------------------

_MASK_HOOK_ATTR = "_pytorch_mixtures_mask_routing"


class MaskRouting:
    """The two hooks of :func:`route_attention_mask`; ``remove()`` detaches both."""

    def __init__(self, model: nn.Module) -> None:
        self.pre = model.register_forward_pre_hook(_hand_mask, with_kwargs=True)
        self.post = model.register_forward_hook(_end_call, always_call=True)

    def remove(self) -> None:
        self.pre.remove()
        self.post.remove()


def _mask_argument(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a forward without a signature: keyword use only
        return None
    if "attention_mask" in names and names.index("attention_mask") < len(args):
        return args[names.index("attention_mask")]
    return None


def _hand_mask(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    mask = _mask_argument(model, args, kwargs)
    if mask is not None and not isinstance(mask, Tensor):
        raise TypeError(
            f"attention_mask: expected a [B, S] tensor (1 = token, 0 = padding) or None, "
            f"got {type(mask).__name__}"
        )
    # every call sets every layer's mask, None included: nothing carries over between calls
    for module in model.modules():
        if isinstance(module, HFMoELayer):
            module.__dict__.update(_model_mask=mask, _model_call_live=True)


def _end_call(model: nn.Module, args: Any, output: Any) -> None:
    # the mask stays for checkpoint recomputation inside backward; plain calls no longer see it
    for module in model.modules():
        if isinstance(module, HFMoELayer):
            module.__dict__["_model_call_live"] = False


def route_attention_mask(model: nn.Module) -> MaskRouting:
    """Hand each call's ``attention_mask`` to the :class:`HFMoELayer` s inside ``model``.

    Hugging Face decoder layers call their MLP without the mask, so a converted or upcycled
    layer would route padding and count it in its aux losses and statistics. This registers a
    forward pre-hook on ``model`` that reads the call's ``attention_mask`` (keyword or
    positional; ``[B, S]``, 1 = token, 0 = padding) and hands it to every :class:`HFMoELayer`
    in ``model`` for that call only (a call without a mask hands None), and a forward hook
    (run even when the forward raises) that ends the hand-over. A layer uses the last ``T``
    columns of the mask for its ``[B, T, D]`` input (the current tokens of a KV-cached step).

    For decoder-only models (the mask must cover every MoE layer's sequence; an
    encoder-decoder's decoder has its own). Idempotent: a second call returns the first's
    handle.

    Args:
        model: a ``transformers`` model (or any module called with ``attention_mask=``).

    Returns:
        The hooks' handle; ``handle.remove()`` detaches them.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` is an encoder-decoder (``config.is_encoder_decoder``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model: expected a decoder-only model (its attention_mask covers every layer), "
            f"got an encoder-decoder {type(model).__name__}"
        )
    existing = getattr(model, _MASK_HOOK_ATTR, None)
    if isinstance(existing, MaskRouting) and existing.pre.id in model._forward_pre_hooks:
        return existing
    routing = MaskRouting(model)
    object.__setattr__(model, _MASK_HOOK_ATTR, routing)
    return routing
