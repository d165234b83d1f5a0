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
    whose first item is the hidden states; both are handled. Hugging Face's own KV ``Cache``
    assumes every token reaches every layer, so decode with the full model there, or use the
    reference decoder in :mod:`pytorch_mixtures.models`, whose cache is position-based.

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

    def forward(
        self, x: Tensor, position_ids: Tensor, valid: Tensor | None, **kwargs: Any
    ) -> Tensor:
        cos, sin = self.rotary_emb(x, position_ids)
        allowed_B1KK = position_causal_mask(position_ids, position_ids, valid).unsqueeze(1)
        mask = torch.zeros(allowed_B1KK.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~allowed_B1KK, torch.finfo(x.dtype).min)
        out = self.layer(
            x,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=(cos, sin),
            **kwargs,
        )
        if isinstance(out, (tuple, list)):
            out = out[0]
        y: Tensor = out
        return y
