"""The Hugging Face Llama decoder-layer adapter (pm.HFDecoderLayerAdapter) inside
Mixture-of-Depths: per-row reference with true-position RoPE, and the full-capacity layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(attn: str):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0)
    for p in layer.parameters():  # norms start at 1: perturb so every weight matters
        nn.init.normal_(p, std=0.3)
    return layer, LlamaRotaryEmbedding(config)


def _hf_reference(layer, rotary, x_1KD, pos_1K):
    """The layer run the ordinary way on one row's chosen tokens: index-causal mask, RoPE at the
    given positions."""
    k = x_1KD.shape[1]
    mask = torch.full((k, k), torch.finfo(x_1KD.dtype).min).triu(1)[None, None]
    out = layer(
        x_1KD,
        attention_mask=mask,
        position_ids=pos_1K,
        position_embeddings=rotary(x_1KD, pos_1K),
    )
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_llama_adapter_matches_per_row_reference(attn):
    layer, rotary = _llama(attn)
    mod = pm.MixtureOfDepths(pm.HFDecoderLayerAdapter(layer, rotary), 32, capacity=0.4)
    batch, seq_len = 3, 10
    x = torch.randn(batch, seq_len, 32, requires_grad=True)
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[1, :4] = False  # left padding: fewer real tokens, invalid slots
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0) + 5
    out = mod(x, attention_mask=mask, position_ids=pos)
    scores = x @ mod.router.weight[0]
    rows = []
    for b in range(batch):
        real = [t for t in range(seq_len) if mask[b, t]]
        k = math.ceil(0.4 * len(real))
        picks = sorted(sorted(real, key=lambda t: (-float(scores[b, t]), t))[:k])
        y = _hf_reference(layer, rotary, x[b, picks][None], pos[b, picks][None])[0]
        row = list(x[b])
        for j, t in enumerate(picks):
            row[t] = x[b, t] + torch.sigmoid(scores[b, t]) * (y[j] - x[b, t])
        rows.append(torch.stack(row))
        # RoPE at true positions matters: renumbered positions give another output
        renumbered = _hf_reference(layer, rotary, x[b, picks][None], torch.arange(k)[None])[0]
        assert not torch.allclose(renumbered, y, atol=1e-4)
    ref = torch.stack(rows)
    torch.testing.assert_close(out, ref)
    params = [x, mod.router.weight, *layer.parameters()]
    for a, b in zip(
        torch.autograd.grad(out.square().sum(), params),
        torch.autograd.grad(ref.square().sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_hf_llama_adapter_at_full_capacity_is_the_causal_layer():
    layer, rotary = _llama("sdpa")
    mod = pm.MixtureOfDepths(
        pm.HFDecoderLayerAdapter(layer, rotary), 32, capacity=1.0, gate="none", causal_router="none"
    ).eval()  # top-k at capacity 1: every token
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7).expand(2, -1)
    expected = torch.cat([_hf_reference(layer, rotary, x[b : b + 1], pos[:1]) for b in range(2)])
    torch.testing.assert_close(mod(x), expected)
