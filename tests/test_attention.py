"""MHSA against a hand-written softmax attention."""

from __future__ import annotations

import math

import pytest
import torch

import pytorch_mixtures as pm


def naive_attention(mhsa: pm.MHSA, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    batch, seq_len, dim = x.shape
    heads, head_dim = mhsa.num_heads, dim // mhsa.num_heads
    q, k, v = mhsa.qkv(x).split(dim, dim=-1)
    out = torch.zeros_like(x)
    for b in range(batch):
        for t in range(seq_len):
            if mask is not None and not mask[b, t]:
                continue
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                keys = [
                    s
                    for s in range(seq_len)
                    if (not mhsa.causal or s <= t) and (mask is None or mask[b, s])
                ]
                scores = torch.stack([q[b, t, cols] @ k[b, s, cols] for s in keys])
                probs = (scores / math.sqrt(head_dim)).softmax(-1)
                out[b, t, cols] = sum(p * v[b, s, cols] for p, s in zip(probs, keys, strict=True))
    return mhsa.proj(out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_mhsa_matches_naive_attention(causal, masked):
    torch.manual_seed(0)
    mhsa = pm.MHSA(12, 3, causal=causal).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool() if masked else None
    got = mhsa(x, mask)
    want = naive_attention(mhsa, x, mask)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g_got, g_want)
    assert torch.isfinite(got).all()
