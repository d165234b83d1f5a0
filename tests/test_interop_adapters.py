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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_llama_adapter_with_a_kv_cache_equals_the_full_call(attn):
    """Prefill then one token at a time through a DynamicCache: each step's output equals the
    full sequence's (eval, per-token decisions), left padding included; the layer's cache
    holds only the processed tokens."""
    from transformers.cache_utils import DynamicCache

    layer, rotary = _llama(attn)
    mod = pm.MixtureOfDepths(pm.HFDecoderLayerAdapter(layer, rotary), 32, capacity=0.5).eval()
    for linear in mod.predictor.modules():  # spread the untrained predictor's decisions
        if isinstance(linear, nn.Linear):
            nn.init.normal_(linear.weight, std=1.0)
    x = torch.randn(3, 10, 32)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, :3] = False
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    mod.calibrate_threshold(x, mask)
    with torch.no_grad():
        want = mod(x, attention_mask=mask, position_ids=pos)
        processed = mod.stats.processed_per_row
        assert 0 < int(processed.sum()) < int(mask.sum())
        cache = DynamicCache()
        steps = [mod(x[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], cache=cache)]
        for t in range(6, 10):
            sl = slice(t, t + 1)
            steps.append(
                mod(x[:, sl], attention_mask=mask[:, sl], position_ids=pos[:, sl], cache=cache)
            )
    got = torch.cat(steps, dim=1)
    torch.testing.assert_close(got[mask], want[mask])
    entry = cache.layers[0]
    assert isinstance(entry, pm.interop.MoDCacheLayer)
    assert torch.equal(entry.valid.sum(-1), processed)


def test_hf_adapter_cache_needs_a_layer_index():
    transformers = pytest.importorskip("transformers")
    layer, rotary = _llama("sdpa")
    adapter = pm.HFDecoderLayerAdapter(nn.Identity(), rotary)
    assert adapter.layer_idx is None and pm.HFDecoderLayerAdapter(layer, rotary).layer_idx == 0
    x, pos = torch.randn(1, 2, 32), torch.arange(2)[None]
    cache = transformers.DynamicCache()
    with pytest.raises(ValueError, match=r"cache: expected the layer to have self_attn.layer_idx"):
        adapter(x, pos, None, cache=cache)
