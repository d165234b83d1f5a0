"""route_depths: Mixture-of-Depths around a tiny random Llama's decoder layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hf_models
import pytorch_mixtures as pm

transformers = pytest.importorskip("transformers")

VOCAB, LAYERS = 53, 4


def tiny_llama(attn: str = "sdpa") -> nn.Module:
    return hf_models.tiny_llama(VOCAB, num_layers=LAYERS, attn=attn)


def tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_full_capacity_ungated_routing_is_the_dense_model(attn):
    """Capacity 1 without gate processes every real token: the wiring (padding read off the
    model's 4-D mask, true positions, rotary embeddings) must reproduce the dense logits."""
    dense = tiny_llama(attn)
    model = pm.interop.route_depths(
        copy.deepcopy(dense), capacity=1.0, every=2, gate="none", causal_router="none"
    )
    routed = [i for i, layer in enumerate(model.model.layers) if hasattr(layer, "mod")]
    assert routed == [1, 3]
    ids = tokens(3, 9, seed=0)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    stats = model.model.layers[1].mod.stats
    assert int(stats.processed_tokens) == int(mask.sum())  # padding never processed


def test_padding_mask_from_hf_masks():
    from pytorch_mixtures.interop.depths import padding_mask_from_hf

    allowed = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    allowed[1, :, :, :2] = False  # two left-padding keys in row 1
    want = torch.tensor([[True] * 4, [False, False, True, True]])
    assert torch.equal(padding_mask_from_hf(allowed, 2, 4), want)
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert torch.equal(padding_mask_from_hf(additive, 2, 4), want)
    assert padding_mask_from_hf(None, 2, 4) is None
    with pytest.raises(ValueError, match="attention_mask: expected None"):
        padding_mask_from_hf(torch.ones(2, 4, 4), 2, 4)


def test_training_lowers_loss_and_eval_routing_is_causal():
    model = pm.interop.route_depths(tiny_llama(), capacity=0.5, every=2)
    model.train()
    ids = tokens(4, 12, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    mod = model.model.layers[1].mod
    assert int(mod.stats.processed_tokens) == 4 * 6  # ceil(0.5 * 12) per sequence
    assert float(pm.aux_loss(model).detach()) > 0  # the predictor's BCE is trained too

    # eval: per-token decisions, so a prefix's logits do not depend on later tokens
    model.eval()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        prefix = model(input_ids=ids[:, :7]).logits
    torch.testing.assert_close(prefix, full[:, :7], atol=1e-5, rtol=1e-5)
    out = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 9)


def test_route_depths_bad_inputs():
    model = tiny_llama()
    with pytest.raises(ValueError, match="every: expected an integer"):
        pm.interop.route_depths(model, every=0)
    with pytest.raises(ValueError, match="rotary_emb"):
        pm.interop.route_depths(nn.Sequential(nn.Linear(2, 2)))
    pm.interop.route_depths(model, every=4)
    with pytest.raises(ValueError, match="already routed"):
        pm.interop.route_depths(model, every=4)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=tokens(1, 4, seed=2), use_cache=True)
