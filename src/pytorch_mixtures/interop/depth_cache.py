"""A Hugging Face KV cache for Mixture-of-Depths layers: per routed layer, only the routed tokens.

A layer wrapped by :func:`~pytorch_mixtures.interop.route_depths` processes a subset of the
tokens, so its cache holds only those tokens' keys and values, with their true positions and a
validity flag (the gathered ``[B, K]`` batch pads rows that routed fewer tokens with invalid
slots), exactly as the reference LM's :class:`~pytorch_mixtures.models.transformer.KVCache`.
Its attention then masks by positions (``pos_k <= pos_q`` and the key valid), never by the
cache length. :class:`MoDCacheLayer` is that layer cache, a ``transformers`` ``DynamicLayer``;
:class:`MoDCache` is a ``DynamicCache`` whose routed layers are ones. A plain ``DynamicCache``
(what ``generate()`` and ``model(..., use_cache=True)`` build) works too: a routed layer turns
its still-empty entry into a :class:`MoDCacheLayer` on first use (:func:`routed_cache_layer`).

This module imports ``transformers``; :mod:`pytorch_mixtures.interop` loads it only on demand.

Shape legend: B batch, H key/value heads, K this call's routed slots, L stored slots, Hd head dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

__all__ = ["MoDCache", "MoDCacheLayer", "routed_cache_layer"]


class MoDCacheLayer(DynamicLayer):
    """One routed layer's cache: the keys and values of the tokens it processed, with positions.

    Attributes:
        keys, values: ``[B, H, L, Hd]`` (None before the first stored token), as ``DynamicLayer``.
        positions: ``[B, L]`` int64 true positions of the stored slots (None before any).
        valid: ``[B, L]`` bool, False for the padding slots of a row that routed fewer tokens
            than the widest row of its step (attention never sees them).
        seen_tokens: tokens the model has passed through this layer, routed or not. It is what
            :meth:`get_seq_length` reports, so the model's position ids and masks, which read the
            cache's length, are those of a dense layer; the stored count is :attr:`num_stored`.

    The wrapped decoder layer's attention calls ``cache.update(keys, values, layer_idx)``; the
    positions and validity of those keys are handed over just before by :meth:`stage` (the
    attention does not pass them). ``crop`` (assisted decoding's rollback) is not supported.
    """

    is_croppable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.positions: Tensor | None = None
        self.valid: Tensor | None = None
        self.seen_tokens = 0
        self._staged: tuple[Tensor, Tensor] | None = None

    @property
    def num_stored(self) -> int:
        """Slots stored (valid or not): ``L``."""
        return 0 if self.positions is None else int(self.positions.shape[1])

    def stored_positions(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(positions [B, L], valid [B, L])`` of the stored slots; empty ``[B, 0]`` if none."""
        if self.positions is None or self.valid is None:
            empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
            return empty, empty.bool()
        if self.positions.shape[0] != batch:
            raise ValueError(
                f"cache: expected a batch of {self.positions.shape[0]} rows (as the cache was "
                f"filled), got {batch}"
            )
        return self.positions, self.valid

    def stage(self, positions: Tensor, valid: Tensor) -> None:
        """Give the positions ``[B, K]`` and validity ``[B, K]`` of the next :meth:`update`."""
        self._staged = (positions, valid.bool())

    def clear_stage(self) -> None:
        """Drop staged positions that no :meth:`update` consumed (the layer did not attend)."""
        self._staged = None

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Append ``key_states`` / ``value_states`` ``[B, H, K, Hd]`` at the staged positions;
        return the layer's full keys and values ``[B, H, L, Hd]``."""
        if self._staged is None:
            raise ValueError(
                "cache: a Mixture-of-Depths layer's cache got keys without their positions; "
                "call the layer through pm.interop.MoDDecoderLayer / pm.HFDecoderLayerAdapter"
            )
        positions, valid = self._staged
        self._staged = None
        if positions.shape != key_states.shape[:1] + key_states.shape[2:3]:
            raise ValueError(
                f"cache: expected positions of shape {tuple(key_states.shape[:1])} + "
                f"{tuple(key_states.shape[2:3])} (batch, new keys), got {tuple(positions.shape)}"
            )
        keys, values = super().update(key_states, value_states)
        if self.positions is None or self.valid is None:
            self.positions, self.valid = positions, valid
        else:
            self.positions = torch.cat([self.positions, positions], dim=1)
            self.valid = torch.cat([self.valid, valid], dim=1)
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # as a dense layer's: the model builds one mask for all layers from these sizes
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.positions = self.valid = None
        self.seen_tokens = 0
        self._staged = None

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "cache: cropping a Mixture-of-Depths layer's cache is not supported (assisted "
            "decoding); generate without an assistant model"
        )

    def _select_rows(self, pick: Any) -> None:
        """Apply a batch-dimension selection ``pick`` (a callable on ``[B, ...]``) to every part."""
        if self.positions is None or self.valid is None:
            return
        self.keys, self.values = pick(self.keys), pick(self.values)
        self.positions, self.valid = pick(self.positions), pick(self.valid)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_rows(lambda t: t[indices, ...])


def routed_cache_layer(cache: object, layer_idx: int) -> MoDCacheLayer:
    """The :class:`MoDCacheLayer` of layer ``layer_idx`` in ``cache``, made from an empty one.

    A ``DynamicCache`` built without knowing of Mixture-of-Depths (by ``generate()`` or the
    model's forward with ``use_cache=True``) holds a plain, still empty ``DynamicLayer`` there:
    it is replaced in place, so the cache object the caller holds keeps working.

    Raises:
        TypeError: ``cache`` is not a ``transformers`` ``Cache``.
        ValueError: the layer's entry is another kind of cache (static, sliding, quantized), or
            a ``DynamicLayer`` that already holds every token (filled without routing).
    """
    if not isinstance(cache, Cache):
        raise TypeError(
            f"cache: expected a transformers Cache (DynamicCache or pm.interop.MoDCache), got "
            f"{type(cache).__name__}"
        )
    layers = cache.layers
    if len(layers) <= layer_idx:
        factory = getattr(cache, "layer_class_to_replicate", None)
        if factory is None:
            raise ValueError(
                f"cache: expected an entry for layer {layer_idx}, got {len(layers)} layers"
            )
        while len(layers) <= layer_idx:
            layers.append(factory())
    layer = layers[layer_idx]
    if isinstance(layer, MoDCacheLayer):
        return layer
    if type(layer) is DynamicLayer and layer.get_seq_length() == 0:
        routed = MoDCacheLayer()
        layers[layer_idx] = routed
        return routed
    held = layer.get_seq_length() if isinstance(layer, DynamicLayer) else "its own"
    raise ValueError(
        f"cache: expected layer {layer_idx} (routed by Mixture-of-Depths) to hold an empty "
        f"DynamicLayer or a MoDCacheLayer (use a DynamicCache or pm.interop.MoDCache), got "
        f"{type(layer).__name__} holding {held} tokens"
    )


class MoDCache(DynamicCache):
    """A ``DynamicCache`` for a :func:`~pytorch_mixtures.interop.route_depths` model.

    Its routed layers are :class:`MoDCacheLayer` s from the start (a plain ``DynamicCache`` gets
    them on first use, so passing this one is optional: ``generate()`` works without it). Use it
    to inspect what each routed layer stored, or to hand the model a cache yourself::

        cache = pm.interop.MoDCache(model)
        out = model.generate(ids, cache=cache, max_new_tokens=8)
        cache.layers[1].positions      # [B, L]: the positions layer 1 processed

    Args:
        model: the routed model (or its base model); its ``config`` sizes the layer list.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        from .depths import MoDDecoderLayer  # depths imports this module lazily: no cycle

        config = getattr(model, "config", None)
        super().__init__(config=None if config is None else config.get_text_config(decoder=True))
        routed = [
            module.layer_idx
            for module in model.modules()
            if isinstance(module, MoDDecoderLayer) and module.layer_idx is not None
        ]
        if not routed:
            raise ValueError(
                f"model: expected a model routed by pm.interop.route_depths, got "
                f"{type(model).__name__} with no MoDDecoderLayer"
            )
        for index in routed:
            routed_cache_layer(self, index)
