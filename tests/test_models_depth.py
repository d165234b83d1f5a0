"""Mixture-of-Depths inside models: the reference decoder (KV-cache decoding, MoDE) and no-op
experts. The Hugging Face decoder-layer adapter is tested in test_interop_adapters.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from pytorch_mixtures.models import ModelConfig, TransformerLM
from reference.moe import expert_fns, naive_topk_moe

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


@pytest.mark.parametrize(("kind", "extra"), MODELS, ids=IDS)
def test_static_cache_decoding_equals_the_dynamic_cache(kind, extra):
    """Routed layers write only the steps they run into the preallocated cache; decoding
    through it equals decoding through the growing cache (batch 3, left padding, batch 1)."""
    model = calibrated(kind, **extra)
    prompt = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    mask[2, :4] = 0
    dynamic = model.generate(prompt, 12, attention_mask=mask)
    assert torch.equal(model.generate(prompt, 12, attention_mask=mask, static_cache=True), dynamic)
    alone = model.generate(prompt[2:, 4:], 12, static_cache=True)
    assert torch.equal(alone, model.generate(prompt[2:, 4:], 12))


@pytest.mark.slow
def test_compiled_decode_step_equals_eager():
    """The MoD decode step under torch.compile(fullgraph) runs the block masked (static
    shapes) and decodes what eager decoding, which skips unselected steps, does."""
    model = calibrated("mod")
    prompt = torch.randint(1, 50, (3, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    eager = model.generate(prompt, 8, attention_mask=mask)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(prompt, 8, attention_mask=mask, compile=True)
    assert torch.equal(compiled, eager)


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
