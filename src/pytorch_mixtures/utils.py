"""Small building blocks: multi-head self-attention on ``scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
        if dim < 1:
            raise ValueError(f"dim: expected an integer >= 1, got {dim}")
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(
                f"num_heads: expected a divisor of dim={dim}, got num_heads={num_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {dropout}")
        self.dim, self.num_heads, self.causal, self.dropout = dim, num_heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"x: expected a floating-point Tensor [B, T, {self.dim}], got {got}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape [B, T, {self.dim}], got {tuple(x.shape)}")
        batch, seq_len, _ = x.shape
        head_dim = self.dim // self.num_heads
        q, k, v = (
            self.qkv(x).view(batch, seq_len, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        )
        dropout = self.dropout if self.training else 0.0
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        else:
            if not isinstance(attention_mask, Tensor):
                raise TypeError(
                    f"attention_mask: expected a Tensor of shape {(batch, seq_len)}, "
                    f"got {type(attention_mask).__name__}"
                )
            if attention_mask.shape != (batch, seq_len):
                raise ValueError(
                    f"attention_mask: expected shape {(batch, seq_len)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            keep_BT = attention_mask.bool()
            allowed = keep_BT[:, None, None, :]  # [B, 1, 1(query), T(key)]
            if self.causal:
                ones = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device)
                allowed = allowed & ones.tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
            # rows with no allowed key (padding queries) come out NaN: zero them, don't multiply
            out = torch.where(keep_BT[:, None, :, None], out, 0.0)
        out_BTD: Tensor = self.proj(out.transpose(1, 2).reshape(batch, seq_len, self.dim))
        return out_BTD
