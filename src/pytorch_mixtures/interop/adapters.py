"""Mixture-of-Depths block adapters for Hugging Face ``transformers`` layers.

:class:`HFDecoderLayerAdapter` runs a Llama-style decoder layer on the tokens a
:class:`~pytorch_mixtures.MixtureOfDepths` routes to it (see
:func:`~pytorch_mixtures.interop.route_depths` for whole models). ``transformers`` is not
imported here: the adapter works on the layer and rotary embedding you pass in.

Shape legend: B batch, K gathered slots per row, D model dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..depth.adapters import BlockAdapter, position_causal_mask

__all__ = ["HFDecoderLayerAdapter"]


class HFDecoderLayerAdapter(BlockAdapter):
    """Runs a Hugging Face Llama-style decoder layer on a routed subset of tokens.

    The layer gets the rotary embeddings of the tokens' *true* positions (computed by
    ``rotary_emb(x, position_ids)``, the model's ``LlamaRotaryEmbedding``), and a 4-D additive
    float mask ``[B, 1, K, K]`` built from positions and validity (0 where ``pos_k <= pos_q`` and
    the key is valid, the dtype's minimum elsewhere), which is what eager and SDPA attention in
    ``transformers`` accept. Decoder layers return a tensor (transformers >= 4.56) or a tuple
    whose first item is the hidden states; both are handled.

    KV caches: with ``cache=`` a ``transformers`` ``Cache`` (a ``DynamicCache`` or
    :class:`~pytorch_mixtures.interop.MoDCache`), this layer's entry is a
    :class:`~pytorch_mixtures.interop.MoDCacheLayer` holding only the routed tokens' keys and
    values with their positions and validity; the mask is then ``[B, 1, K, L_past + K]`` over
    the stored keys and this call's, by the same position rule (never by the cache length).

    Args:
        layer: e.g. ``transformers.models.llama.modeling_llama.LlamaDecoderLayer``.
        rotary_emb: the model's rotary embedding (``LlamaRotaryEmbedding``), a module with
            ``forward(x, position_ids) -> (cos, sin)``. Its ``inv_freq`` buffer is not
            persistent, so registering it here adds nothing to the state dict.
    """

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module) -> None:
        super().__init__()
        for name, value in (("layer", layer), ("rotary_emb", rotary_emb)):
            if not isinstance(value, nn.Module):
                raise TypeError(f"{name}: expected an nn.Module, got {type(value).__name__}")
        self.layer = layer
        self.rotary_emb = rotary_emb

    @property
    def layer_idx(self) -> int | None:
        """The index the layer's attention updates a KV cache under (``self_attn.layer_idx``)."""
        index = getattr(getattr(self.layer, "self_attn", None), "layer_idx", None)
        return index if isinstance(index, int) else None

    def forward(
        self, x: Tensor, position_ids: Tensor, valid: Tensor | None, **kwargs: Any
    ) -> Tensor:
        """``x`` ``[B, K, D]``, ``position_ids`` ``[B, K]``, ``valid`` ``[B, K]`` or None ->
        ``[B, K, D]``; ``cache`` (or ``past_key_values``) in ``kwargs`` is a KV cache."""
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = legacy if cache is None else cache
        cos, sin = self.rotary_emb(x, position_ids)
        if cache is None:
            allowed_B1QK = position_causal_mask(position_ids, position_ids, valid).unsqueeze(1)
            return self._call_layer(x, allowed_B1QK, position_ids, (cos, sin), kwargs)
        # only here: a cache object exists, so transformers is installed
        from .depth_cache import routed_cache_layer

        index = self.layer_idx
        if index is None:
            raise ValueError(
                f"cache: expected the layer to have self_attn.layer_idx (the index its attention "
                f"updates the cache under), got {type(self.layer).__name__} without one"
            )
        routed = routed_cache_layer(cache, index)
        batch = x.shape[0]
        valid_BK = torch.ones_like(position_ids, dtype=torch.bool) if valid is None else valid
        past_pos_BL, past_valid_BL = routed.stored_positions(batch, x.device)
        # the attention will see the stored keys followed by this call's (DynamicLayer order)
        key_pos = torch.cat([past_pos_BL, position_ids], dim=1)
        key_valid = torch.cat([past_valid_BL, valid_BK.bool()], dim=1)
        allowed_B1QK = position_causal_mask(position_ids, key_pos, key_valid).unsqueeze(1)
        routed.stage(position_ids, valid_BK)
        try:
            return self._call_layer(x, allowed_B1QK, position_ids, (cos, sin), kwargs, cache)
        finally:
            routed.clear_stage()  # consumed by update; if the layer never attended, not kept

    def _call_layer(
        self,
        x: Tensor,
        allowed_B1QK: Tensor,
        position_ids: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        kwargs: dict[str, Any],
        cache: object = None,
    ) -> Tensor:
        """Run the layer with the bool ``allowed`` mask as the additive float mask HF takes."""
        mask = torch.zeros(allowed_B1QK.shape, dtype=x.dtype, device=x.device)
        # the dtype's minimum, not -inf: an all-masked row (an invalid slot) stays finite
        mask = mask.masked_fill(~allowed_B1QK, torch.finfo(x.dtype).min)
        if cache is not None:
            kwargs = {**kwargs, "cache": cache}
        out = self.layer(
            x,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if isinstance(out, (tuple, list)):
            out = out[0]
        y: Tensor = out
        return y
