"""The reference transformer: causality, padding, and KV-cache decoding."""

from __future__ import annotations

import pytest
import torch

import pytorch_mixtures as pm
from pytorch_mixtures.models import ModelConfig, TransformerLM


def tiny(kind: str = "dense", **kwargs) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=50, dim=32, num_layers=2, num_heads=4, ffn_hidden=64, kind=kind, **kwargs
    )
    return TransformerLM(config).eval()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_future_tokens_do_not_change_past_logits(kind):
    model = tiny(kind, num_experts=4, top_k=2)
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = torch.randint(0, 50, (2, 4))
    torch.testing.assert_close(model(idx).logits[:, :8], model(changed).logits[:, :8])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_left_padding_does_not_change_real_tokens(kind):
    model = tiny(kind, num_experts=4, top_k=2)
    idx = torch.randint(0, 50, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    out = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(out, model(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_cached_greedy_decoding_equals_full_recompute(kind):
    model = tiny(kind, num_experts=4, top_k=2)
    prompt = torch.randint(1, 50, (3, 6))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left padding in one row
    mask[2, :4] = 0
    cached = model.generate(prompt, 10, attention_mask=mask, use_cache=True)
    full = model.generate(prompt, 10, attention_mask=mask, use_cache=False)
    assert cached.shape == (3, 16)
    assert torch.equal(cached, full)
    # each row decodes as it would alone, without its padding
    alone = model.generate(prompt[2:, 4:], 10)
    assert torch.equal(alone[:, 2:], cached[2:, 6:])


def test_matched_active_params_and_aux_loss():
    dense, moe = tiny("dense"), tiny("moe", num_experts=8, top_k=2)
    router_params = 2 * 32 * 8  # per layer: dim x experts
    assert moe.num_params(active=True) == dense.num_params() + router_params
    assert moe.num_params() > dense.num_params()
    idx = torch.randint(0, 50, (2, 9))
    out = moe.train()(idx, targets=idx)
    assert out.loss is not None and out.logits.shape == (2, 9, 50)
    aux = pm.aux_loss(moe)
    assert aux.requires_grad and float(aux) > 0


def test_bad_config_raises():
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(kind="sparse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(dim=30, num_heads=4)
