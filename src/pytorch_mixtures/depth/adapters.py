"""Block adapters for Mixture-of-Depths: call a block with its own conventions on routed tokens.

:class:`~pytorch_mixtures.MixtureOfDepths` gathers each sequence's routed tokens into
``[B, K, D]`` with their true positions ``[B, K]`` and validity ``[B, K]``. A block whose
``forward`` takes ``attention_mask`` / ``position_ids`` gets them directly; any other block goes
through a :class:`BlockAdapter`: :class:`MaskAdapter` for blocks that take a full ``[B, K, K]``
mask (built by :func:`position_causal_mask`), :class:`~pytorch_mixtures.HFDecoderLayerAdapter`
(in :mod:`pytorch_mixtures.interop.adapters`) for Hugging Face Llama-style decoder layers.

Shape legend: B batch, Q query tokens, K gathered slots (key tokens) per row, D model dim.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["BlockAdapter", "MaskAdapter", "position_causal_mask"]


def position_causal_mask(
    pos_q_BQ: Tensor, pos_k_BK: Tensor, key_valid_BK: Tensor | None = None
) -> Tensor:
    """The position-based causal rule as a bool mask ``[B, Q, K]``: True where q may attend k.

    ``attend iff pos_k <= pos_q and key valid``. It holds for full sequences, left or right
    padding, KV caches and routed subsets alike, since every token carries its true position.
    """
    allowed_BQK = pos_k_BK[:, None, :] <= pos_q_BQ[:, :, None]
    if key_valid_BK is not None:
        allowed_BQK = allowed_BQK & key_valid_BK[:, None, :].bool()
    return allowed_BQK


class BlockAdapter(nn.Module):
    """Base of adapters: ``forward(x_BKD, position_ids_BK, valid_BK, **kwargs) -> y_BKD``.

    Subclass it to call a block with its own conventions (mask format, rotary embeddings, tuple
    outputs). ``valid_BK`` is None when every slot is a real token.
    """

    def forward(
        self, x: Tensor, position_ids: Tensor, valid: Tensor | None, **kwargs: Any
    ) -> Tensor:
        raise NotImplementedError


class MaskAdapter(BlockAdapter):
    """Calls a block that takes a full attention mask: ``block(x, **{mask_arg: mask_BKK})``.

    ``mask_BKK`` is the bool :func:`position_causal_mask` of the gathered tokens (True = may
    attend). With ``positions_arg`` the true positions ``[B, K]`` go along under that name (for
    blocks that apply RoPE themselves).
    """

    def __init__(
        self, block: nn.Module, mask_arg: str = "attn_mask", positions_arg: str | None = None
    ) -> None:
        super().__init__()
        self.block = block
        self.mask_arg = mask_arg
        self.positions_arg = positions_arg

    def forward(
        self, x: Tensor, position_ids: Tensor, valid: Tensor | None, **kwargs: Any
    ) -> Tensor:
        kwargs[self.mask_arg] = position_causal_mask(position_ids, position_ids, valid)
        if self.positions_arg is not None:
            kwargs[self.positions_arg] = position_ids
        y: Tensor = self.block(x, **kwargs)
        return y
