"""Multi-head self-attention on ``scaled_dot_product_attention`` (the seed package's ``MHSA``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_features, check_flag, check_input_matches, check_int, check_mask

__all__ = ["MHSA"]


class MHSA(nn.Module):
    """Multi-head self-attention, ``[B, T, D] -> [B, T, D]``, on PyTorch's fused SDPA.

    Args:
        dim: model dimension D (divisible by ``num_heads``).
        num_heads: attention heads.
        causal: mask future positions (decoder self-attention).
        dropout: attention-probability dropout, training only.
        bias: biases on the qkv and output projections.

    ``forward(x, attention_mask=None)``: ``attention_mask`` ``[B, T]`` marks real tokens (1) and
    padding (0); padding keys are never attended to, and padding queries return zeros.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("num_heads", num_heads, low=None)
        check_flag("causal", causal)
        check_flag("bias", bias)
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(
                f"num_heads: expected a divisor of dim={dim}, got num_heads={num_heads}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout: expected a float in [0, 1), got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {dropout}")
        self.dim, self.num_heads, self.causal, self.dropout = dim, num_heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        check_features(x, self.dim, (3,), f"[B, T, {self.dim}]")
        check_input_matches(x, self)
        keep_BT = check_mask(attention_mask, x, (tuple(x.shape[:2]),))
        batch, seq_len, _ = x.shape
        head_dim = self.dim // self.num_heads
        q, k, v = (
            self.qkv(x).view(batch, seq_len, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        )
        dropout = self.dropout if self.training else 0.0
        if keep_BT is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        else:
            allowed = keep_BT[:, None, None, :]  # [B, 1, 1(query), T(key)]
            if self.causal:
                ones = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device)
                allowed = allowed & ones.tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
            # rows with no allowed key (padding queries) come out NaN: zero them, don't multiply
            out = torch.where(keep_BT[:, None, :, None], out, 0.0)
        out_BTD: Tensor = self.proj(out.transpose(1, 2).reshape(batch, seq_len, self.dim))
        return out_BTD
