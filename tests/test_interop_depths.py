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
    # route_depths used to refuse KV caches (use_cache=True raised, use_cache defaulted to
    # False); now the model's own DynamicCache holds a MoDCacheLayer for the routed layer
    out = model(input_ids=tokens(1, 4, seed=2), use_cache=True)
    assert isinstance(out.cache.layers[3], pm.interop.MoDCacheLayer)
    assert model.generation_config.use_cache is not False


# --- KV caches: each routed layer caches only the tokens it processed, with their positions


def calibrated_routed(family: str) -> nn.Module:
    """A 4-layer tiny Llama or Qwen3 routed on layers 1 and 3, eval thresholds calibrated to
    half the tokens (an untrained predictor alone is nearly constant: routing would be trivial)."""
    build = hf_models.tiny_llama if family == "llama" else hf_models.tiny_qwen3
    model = pm.interop.route_depths(build(VOCAB, num_layers=LAYERS), capacity=0.5, every=2)
    gen = torch.Generator().manual_seed(5)
    for mod in mod_layers(model):
        for linear in mod.predictor.modules():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=1.0, generator=gen)
    model.eval()
    pm.calibrate_thresholds(model, [tokens(4, 24, seed=9)], capacity=0.5)
    with torch.no_grad():
        model(input_ids=tokens(4, 24, seed=10))
    for mod in mod_layers(model):  # not trivial on fresh data
        assert 0.2 < float(mod.stats.realized_capacity) < 0.8
    return model


def mod_layers(model: nn.Module) -> list[pm.MixtureOfDepths]:
    return [m for m in model.modules() if isinstance(m, pm.MixtureOfDepths)]


def prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``batch`` prompts of 8 tokens; at batch 3 rows 1 and 2 are left-padded (3 and 5 pads)."""
    ids = tokens(3, 8, seed=1)[:batch]
    if batch == 1:
        return ids, None
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids, mask


def record_routing(model: nn.Module) -> tuple[dict[int, list], list]:
    """Per routed layer, every call's (position ids [B, T], processed [B, T], input [B, T, D]),
    processed computed by the causal rule on the layer's inputs; the caller removes the hooks
    (the returned handles)."""
    calls: dict[int, list] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        if not isinstance(layer, pm.interop.MoDDecoderLayer):
            continue
        calls[index] = []

        def hook(module, args, kwargs, index=index):
            x, mod = args[0], module
            pos = kwargs["position_ids"]
            real = kwargs["attention_mask"]
            chosen = torch.sigmoid(mod.causal_logits(x)) > mod.threshold
            if real is not None:
                chosen &= real
            calls[index].append((pos.clone(), chosen, x.detach().clone()))

        handles.append(layer.mod.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_with_cache_equals_recomputing(family, batch):
    """Greedy generate() with the KV cache (the model's own DynamicCache, nothing built by the
    user) gives exactly the tokens of use_cache=False, which recomputes the prefix each step."""
    model = calibrated_routed(family)
    ids, mask = prompts(batch)
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    if mask is not None:
        settings["attention_mask"] = mask
    want = model.generate(ids, use_cache=False, **settings)
    calls, handles = record_routing(model)
    try:
        got = model.generate(ids, use_cache=True, **settings)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(got, want)
    for layer_calls in calls.values():  # the cache was used: one new token per decode step
        assert [pos.shape[1] for pos, _, _ in layer_calls] == [8] + [1] * 11
        processed = torch.cat([chosen for _, chosen, _ in layer_calls], dim=1)
        num_real = batch * 20 - (0 if mask is None else int((mask == 0).sum()))
        assert 0.2 < float(processed.sum()) / num_real < 0.8  # decode steps route too


@pytest.mark.parametrize("batch", [1, 3])
def test_routed_layers_cache_exactly_the_tokens_they_processed(batch):
    """After generate(cache=pm.interop.MoDCache(model)) each routed layer's cache holds, per
    row, the positions of the tokens it processed (prefill and decode steps, in order) and
    nothing else; after the prefill its keys are the processed tokens' own (RoPE at their true
    positions); dense layers cache every token."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = calibrated_routed("llama")
    ids, mask = prompts(batch)
    cache = pm.interop.MoDCache(model)
    assert [type(c).__name__ for c in cache.layers[:4]] == [
        "DynamicLayer",
        "MoDCacheLayer",
        "DynamicLayer",
        "MoDCacheLayer",
    ]
    calls, handles = record_routing(model)
    try:
        with torch.no_grad():  # the prefill alone: check keys
            model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        for index, layer_calls in calls.items():
            (pos, chosen, x) = layer_calls[0]
            entry = cache.layers[index]
            attn = model.model.layers[index].mod.block.layer.self_attn
            layer = model.model.layers[index].mod.block.layer
            with torch.no_grad():
                k = attn.k_proj(layer.input_layernorm(x)).view(batch, 8, -1, attn.head_dim)
                cos, sin = model.model.rotary_emb(x, pos)
                _, k = apply_rotary_pos_emb(k.transpose(1, 2), k.transpose(1, 2), cos, sin)
            for b in range(batch):
                stored = entry.keys[b][:, entry.valid[b]]
                torch.testing.assert_close(stored, k[b][:, chosen[b]], atol=1e-6, rtol=1e-6)
        cache = pm.interop.MoDCache(model)
        for layer_calls in calls.values():
            layer_calls.clear()
        settings = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
        if mask is not None:
            settings["attention_mask"] = mask
        model.generate(ids, cache=cache, **settings)
    finally:
        for handle in handles:
            handle.remove()
    assert cache.get_seq_length() == 8 + 9  # the last new token is never fed back
    for index, layer_calls in calls.items():
        entry = cache.layers[index]
        assert isinstance(entry, pm.interop.MoDCacheLayer)
        assert entry.get_seq_length() == 8 + 9  # as a dense layer's, for the model's masks
        for b in range(batch):
            want = torch.cat([pos[b][chosen[b]] for pos, chosen, _ in layer_calls])
            assert torch.equal(entry.positions[b][entry.valid[b]], want)
            assert 0 < want.numel() < 17
        assert entry.keys.shape[2] == entry.positions.shape[1] < 17  # compute and memory saved
    assert cache.layers[0].keys.shape[2] == 8 + 9


def test_beam_search_with_cache_equals_recomputing():
    """Beam search reorders the cache rows (positions and validity with the keys)."""
    model = calibrated_routed("llama")
    ids, mask = prompts(3)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "num_beams": 3}
    want = model.generate(ids, attention_mask=mask, use_cache=False, **settings)
    got = model.generate(ids, attention_mask=mask, use_cache=True, **settings)
    assert torch.equal(got, want)


def test_mod_cache_bad_inputs():
    from transformers.cache_utils import DynamicCache, DynamicLayer

    model = calibrated_routed("llama")
    layer = model.model.layers[1]
    hidden = torch.randn(1, 4, 32)
    with pytest.raises(TypeError, match=r"cache: expected a transformers Cache.*got object"):
        layer(hidden, cache=object())
    filled = DynamicCache(config=model.config)
    filled.layers[1] = DynamicLayer()
    filled.layers[1].update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"cache: expected layer 1 .*got DynamicLayer holding 3"):
        layer(hidden, cache=filled)
    with pytest.raises(TypeError, match=r"model: expected an nn.Module, got str"):
        pm.interop.MoDCache("model")
    with pytest.raises(ValueError, match=r"model: expected a model routed .*got Linear"):
        pm.interop.MoDCache(nn.Linear(2, 2))
    cache = pm.interop.MoDCache(model)
    with pytest.raises(ValueError, match="cache: cropping"):
        cache.layers[1].crop(-1)
