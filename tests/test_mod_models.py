"""Mixture-of-Depths inside models: the reference decoder (KV-cache decoding, MoDE), no-op experts,
and the Hugging Face Llama decoder-layer adapter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from naive import expert_fns, naive_topk_moe
from pytorch_mixtures.models import ModelConfig, TransformerLM

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str, **kwargs) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=4,
        num_heads=4,
        ffn_hidden=64,
        kind=kind,
        num_experts=4,
        top_k=2,
        mod_capacity=0.5,
        **kwargs,
    )
    return TransformerLM(config)


def calibrated(kind: str, **kwargs) -> TransformerLM:
    """A model whose MoD layers process about half the tokens in eval (random init alone would
    put every predictor probability near 0.5 and make the routing trivial)."""
    model = tiny(kind, **kwargs)
    layers = mod_layers(model)
    for layer in layers:
        # the LM's 0.02 init makes an untrained predictor nearly constant: spread it out
        for module in layer.predictor.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    if layers:
        pm.calibrate_thresholds(model, [torch.randint(0, 50, (4, 24))], capacity=0.5)
        model(torch.randint(0, 50, (4, 24)))
        for layer in layers:  # the routing is not trivial on fresh data
            assert 0.2 < float(layer.stats.realized_capacity) < 0.8
    return model.eval()


def mod_layers(model: nn.Module) -> list[pm.MixtureOfDepths]:
    return [m for m in model.modules() if isinstance(m, pm.MixtureOfDepths)]


MODELS = [("mod", {}), ("mode", {}), ("mode", {"mode_variant": "integrated"})]
IDS = ["mod", "mode-staged", "mode-integrated"]


def test_layer_layout_of_mod_and_mode_models():
    mod = tiny("mod")
    assert [isinstance(layer, pm.MixtureOfDepths) for layer in mod.layers] == [
        False,
        True,
        False,
        True,
    ]
    staged = tiny("mode")
    assert len(mod_layers(staged)) == 2
    assert all(isinstance(m.block.ffn, pm.MoELayer) for m in mod_layers(staged))
    integrated = tiny("mode", mode_variant="integrated")
    assert mod_layers(integrated) == []
    moes = [m for m in integrated.modules() if isinstance(m, pm.MoELayer)]
    assert len(moes) == 4 and all(m.num_noop_experts == 4 for m in moes)
    with pytest.raises(ValueError, match=r"mode_variant.*fused"):
        ModelConfig(kind="mode", mode_variant="fused")  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "extra"), MODELS, ids=IDS)
def test_training_step_collects_mod_and_moe_aux_losses(kind, extra):
    model = tiny(kind, **extra).train()
    idx = torch.randint(0, 50, (2, 12))
    out = model(idx, targets=idx)
    aux = pm.aux_loss(model)
    assert out.loss is not None and aux.requires_grad and float(aux.detach()) > 0
    (out.loss + aux).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    for layer in mod_layers(model):
        assert "mod_bce" in layer.aux_losses
        assert int(layer.stats.processed_tokens) == 2 * math.ceil(0.5 * 12)
        assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("kind", "extra"), MODELS, ids=IDS)
def test_eval_model_is_causal(kind, extra):
    model = calibrated(kind, **extra)
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(model(idx).logits[:, :10], model(changed).logits[:, :10])


@pytest.mark.parametrize(("kind", "extra"), MODELS, ids=IDS)
def test_cached_logits_equal_the_full_forward(kind, extra):
    model = calibrated(kind, **extra)
    idx = torch.randint(0, 50, (3, 14))
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, :6] = False
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    full = model(idx, attention_mask=mask, position_ids=pos).logits
    cache = model.new_cache()
    steps = [model(idx[:, :8], attention_mask=mask[:, :8], position_ids=pos[:, :8], cache=cache)]
    for t in range(8, 14):
        sl = slice(t, t + 1)
        steps.append(
            model(idx[:, sl], attention_mask=mask[:, sl], position_ids=pos[:, sl], cache=cache)
        )
    cached = torch.cat([s.logits for s in steps], dim=1)
    torch.testing.assert_close(cached[mask], full[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("kind", "extra"), MODELS, ids=IDS)
def test_cached_greedy_decoding_equals_recompute(kind, extra):
    model = calibrated(kind, **extra)
    prompt = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    mask[2, :4] = 0
    cached = model.generate(prompt, 12, attention_mask=mask, use_cache=True)
    full = model.generate(prompt, 12, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, full)
    alone = model.generate(prompt[2:, 4:], 12)  # batch 1, no padding
    assert torch.equal(alone, model.generate(prompt[2:, 4:], 12, use_cache=False))
    assert torch.equal(alone[:, 3:], cached[2:, 7:])


def test_routed_layer_caches_only_the_tokens_it_processed():
    model = calibrated("mod")
    prompt = torch.randint(1, 50, (1, 10))
    cache = model.new_cache()
    processed = {
        i: 0 for i, layer in enumerate(model.layers) if isinstance(layer, pm.MixtureOfDepths)
    }
    idx, pos = prompt, torch.arange(10)[None]
    with torch.no_grad():
        for _ in range(8):
            logits = model(idx, position_ids=pos, cache=cache).logits
            for i in processed:
                processed[i] += int(model.layers[i].stats.processed_tokens)
            idx, pos = logits[:, -1:].argmax(-1), pos[:, -1:] + 1
    total = 10 + 7
    assert cache.length(0) == total  # a dense layer caches every token
    for i, count in processed.items():
        assert 0 < count < total
        assert cache.length(i) == count  # batch 1: exactly the processed tokens
        assert bool(cache.layers[i][3].all())


# ---------------------------------------------------------------- integrated MoDE: no-op experts


def test_noop_experts_match_naive_and_skip_compute():
    torch.manual_seed(0)
    dim, real, noop = 12, 3, 2
    seen = []

    class Counted(nn.Linear):
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    experts = [Counted(dim, dim) for _ in range(real)]
    router = pm.TopKRouter(dim, real + noop, top_k=2, init_std=0.5)
    moe = pm.MoELayer(dim, router, experts, num_noop_experts=noop)
    x = torch.randn(2, 9, dim, requires_grad=True)
    out = moe(x)
    rows_computed = sum(seen)
    fns = expert_fns(experts) + [lambda v: torch.zeros_like(v)] * noop
    ref, _ = naive_topk_moe(x.reshape(-1, dim), router.gate.weight, fns, 2)
    torch.testing.assert_close(out.reshape(-1, dim), ref)
    params = [x, router.gate.weight, *moe.experts.parameters()]
    g_out = torch.autograd.grad(out.square().sum(), params)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b)
    load = moe.stats.tokens_per_expert
    assert load.shape == (real + noop,) and int(load[real:].sum()) > 0
    assert rows_computed == int(load[:real].sum()) < 18 * 2  # no-op slots reach no expert
    with pytest.raises(ValueError, match="experts: the router routes to 5 experts"):
        pm.MoELayer(dim, router, [nn.Linear(dim, dim) for _ in range(real)])
    with pytest.raises(ValueError, match=r"num_noop_experts.*5"):
        pm.MoELayer(dim, router, experts, num_noop_experts=5)


# ---------------------------------------------------------------- Hugging Face adapter


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
