"""Mixture-of-Depths for Hugging Face decoders: ``route_depths(model, capacity=..., every=2)``.

Each chosen decoder layer is wrapped in :class:`~pytorch_mixtures.MixtureOfDepths` (Raposo et al.
2024) through :class:`~pytorch_mixtures.HFDecoderLayerAdapter`: in training each sequence's top
``ceil(capacity * T)`` tokens run through the layer (with their true positions' rotary
embeddings), the rest skip it; in eval a causal per-token predictor decides, so the model stays
causal. The wrapper accepts the decoder layer's call from the Hugging Face model and turns its
inputs into what the MoD layer needs: the padding mask ``[B, T]`` (read off the 4-D causal mask
the model builds: a token is real iff it may attend to itself) and the position ids ``[B, T]``.
With a KV cache (``generate()``'s default) a routed layer caches only the tokens it processed,
with their positions (:mod:`pytorch_mixtures.interop.depth_cache`).

Shape legend: B batch, T sequence, D model dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_flag, check_int
from ..depth import MixtureOfDepths
from .adapters import HFDecoderLayerAdapter
from .upcycle import _check_every_reaches_a_layer, _mlp_dim, attach_aux_loss

__all__ = ["MoDDecoderLayer", "route_depths"]


def padding_mask_from_hf(attention_mask: Tensor | None, batch: int, seq_len: int) -> Tensor | None:
    """``[B, T]`` bool (True = real token) from the mask a HF model hands its decoder layers.

    ``None`` (no padding, SDPA's fast path) stays None; a 2-D ``[B, L]`` mask (flash attention;
    ``L >= T`` with a cache) gives its last ``T`` columns; a 4-D ``[B, 1, T, L]`` mask (bool:
    True = may attend; float: 0 = may attend) gives the diagonal of its last ``T`` keys: a
    padding token may not attend to itself, a real one always may.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        # with a cache the 2-D mask covers the past keys too: the current tokens are the last T
        return attention_mask[:, -seq_len:].bool()
    if attention_mask.dim() != 4 or attention_mask.shape[-1] < seq_len:
        raise ValueError(
            f"attention_mask: expected None, [B, T] or [B, 1, T, T] from the model, got "
            f"{tuple(attention_mask.shape)}"
        )
    # keys may extend past T (a cache); the current tokens are the last T keys
    diag_BT = attention_mask[:, 0, -seq_len:, -seq_len:].diagonal(dim1=-2, dim2=-1)
    allowed_BT = diag_BT if diag_BT.dtype == torch.bool else diag_BT == 0
    return allowed_BT.expand(batch, seq_len)


class MoDDecoderLayer(nn.Module):
    """A Hugging Face decoder layer behind Mixture-of-Depths, called like the layer itself.

    ``forward(hidden_states [B, T, D], attention_mask=None, position_ids=None, cache=None,
    use_cache=False, position_embeddings=None, **kwargs) -> [B, T, D]``. The model's rotary
    embeddings are recomputed inside for the routed tokens' true positions, so
    ``position_embeddings`` is ignored. ``cache`` (``past_key_values`` before transformers 5)
    is the model's KV cache: this layer's entry becomes a
    :class:`~pytorch_mixtures.interop.MoDCacheLayer`, which stores only the tokens this layer
    processed, with their positions (see :mod:`pytorch_mixtures.interop.depth_cache`).

    Attributes:
        mod: the :class:`~pytorch_mixtures.MixtureOfDepths` (its ``aux_loss``, ``stats``,
            ``threshold``).
        layer_idx: the index the wrapped layer's attention uses in a KV cache (None when the
            layer has no ``self_attn.layer_idx``; then caches are refused).
    """

    def __init__(self, mod: MixtureOfDepths) -> None:
        super().__init__()
        self.mod = mod
        block = mod.block
        self.layer_idx = block.layer_idx if isinstance(block, HFDecoderLayerAdapter) else None

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        legacy = kwargs.pop("past_key_values", None)
        cache = legacy if cache is None else cache
        batch, seq_len, _ = hidden_states.shape
        valid_BT = padding_mask_from_hf(attention_mask, batch, seq_len)
        routed = None
        if cache is not None:
            if self.layer_idx is None:
                raise ValueError(
                    f"cache: expected a decoder layer with self_attn.layer_idx to cache, got "
                    f"{type(self.mod.block).__name__} without one; call with use_cache=False"
                )
            from .depth_cache import routed_cache_layer  # a cache exists: transformers is here

            routed = routed_cache_layer(cache, self.layer_idx)
        if position_ids is None:
            # no ids from the model: the tokens follow the ones this layer has already seen
            past = 0 if routed is None else routed.seen_tokens
            position_ids = torch.arange(past, past + seq_len, device=hidden_states.device)
        pos_BT = position_ids.reshape(-1, seq_len).expand(batch, seq_len)
        if routed is None:
            out: Tensor = self.mod(hidden_states, attention_mask=valid_BT, position_ids=pos_BT)
            return out
        # the cache goes along as a block kwarg: MixtureOfDepths then passes every row (per-row
        # state), and the adapter stores only the routed slots, flagged valid or not
        out = self.mod(hidden_states, attention_mask=valid_BT, position_ids=pos_BT, cache=cache)
        # counted even when no token was routed (the block not called): the model reads the
        # cache's length for the next step's positions and mask, which count every token
        routed.seen_tokens += seq_len
        return out


def _decoder_layer_lists(model: nn.Module) -> list[tuple[nn.Module, nn.ModuleList]]:
    """(rotary_emb, layers) for every ModuleList of attention layers next to a ``rotary_emb``."""
    found = []
    for owner in model.modules():
        rotary = getattr(owner, "rotary_emb", None)
        if not isinstance(rotary, nn.Module):
            continue
        for child in owner.children():
            if (
                isinstance(child, nn.ModuleList)
                and len(child) > 0
                and all(
                    hasattr(layer, "self_attn") or isinstance(layer, MoDDecoderLayer)
                    for layer in child
                )
            ):
                found.append((rotary, child))
    return found


def route_depths(
    model: nn.Module,
    *,
    capacity: float = 0.125,
    every: int = 2,
    attach_loss: bool = True,
    **mod_kwargs: Any,
) -> nn.Module:
    """Wrap a Hugging Face decoder's layers in Mixture-of-Depths, in place (Raposo et al. 2024).

    Layers ``i`` with ``(i + 1) % every == 0`` (the paper routes every other block) of each
    decoder layer list (a ``ModuleList`` of layers with ``self_attn`` whose owner has a
    ``rotary_emb``: Llama, Mistral, Qwen2, Qwen3, Gemma, ... in ``transformers`` >= 5) become
    :class:`MoDDecoderLayer` s around ``MixtureOfDepths(HFDecoderLayerAdapter(layer,
    rotary_emb), dim, capacity, **mod_kwargs)``.

    Training processes each sequence's top ``ceil(capacity * real tokens)`` tokens per routed
    layer; ``eval()`` decides per token with the causal predictor (train it first: its BCE loss
    is part of ``pm.aux_loss(model)``). The routed layer's attention sees only the routed
    tokens, as in the paper. KV caches work unchanged: ``generate(use_cache=True)`` (the
    default) and ``model(..., use_cache=True)`` give each routed layer a
    :class:`~pytorch_mixtures.interop.MoDCacheLayer` in the model's ``DynamicCache``, holding
    only the tokens it processed with their positions, so cached decoding equals recomputing
    the prefix (``use_cache=False``); :class:`~pytorch_mixtures.interop.MoDCache` builds such a
    cache up front. (Before, ``route_depths`` turned ``use_cache`` off.)

    Args:
        model: a ``transformers`` causal LM (or its base model).
        capacity: fraction of each sequence's tokens a routed layer processes, in (0, 1].
        every: route every ``every``-th layer.
        attach_loss: call :func:`~pytorch_mixtures.interop.attach_aux_loss` so
            ``outputs.loss`` includes ``pm.aux_loss(model)``.
        **mod_kwargs: passed to :class:`~pytorch_mixtures.MixtureOfDepths` (``gate``,
            ``causal_router``, ``threshold``, ``aux_loss_coef``, ...).

    Returns:
        ``model`` itself, modified in place.

    Raises:
        ValueError: bad arguments or no decoder layer list with a rotary embedding found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    every = check_int("every", every)
    check_flag("attach_loss", attach_loss)
    layer_lists = _decoder_layer_lists(model)
    if not layer_lists:
        raise ValueError(
            f"model: expected decoder layers (with self_attn) next to a rotary_emb module in "
            f"{type(model).__name__}, found none"
        )
    _check_every_reaches_a_layer(every, [layers for _, layers in layer_lists], "routed")
    for rotary, layers in layer_lists:
        for index in range(len(layers)):
            if (index + 1) % every != 0:
                continue
            layer = layers[index]
            if isinstance(layer, MoDDecoderLayer):
                raise ValueError(f"model: layer {index} is already routed by Mixture-of-Depths")
            dim = getattr(layer, "hidden_size", None) or _mlp_dim(layer)
            adapter = HFDecoderLayerAdapter(layer, rotary)
            mod = MixtureOfDepths(adapter, int(dim), capacity, **mod_kwargs)
            reference = next(layer.parameters())
            # only the MoD's own router/predictor move: the shared rotary_emb keeps its dtype
            for part in (mod.router, mod.predictor):
                if part is not None:
                    part.to(device=reference.device, dtype=reference.dtype)
            layers[index] = MoDDecoderLayer(mod)
    if attach_loss:
        attach_aux_loss(model)
    return model
