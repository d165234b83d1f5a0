"""The reference transformer: causality, padding, and KV-cache decoding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from pytorch_mixtures.models import ModelConfig, TransformerLM
from pytorch_mixtures.models.transformer import Block, SwiGLU


def tiny(kind: str = "dense", **kwargs) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=50, dim=32, num_layers=2, num_heads=4, ffn_hidden=64, kind=kind, **kwargs
    )
    return TransformerLM(config).eval()


@pytest.mark.parametrize("scale", [None, 1.0])
def test_moe_under_uniform_routing_is_the_dense_ffn_it_replaces(scale):
    """Weights summing to top_k (the default): with every expert chosen at equal weight, the
    MoE layer is the dense SwiGLU whose hidden units are the experts' concatenated; with
    Mixtral's weights summing to 1 it is that FFN scaled by 1 / top_k."""
    torch.manual_seed(0)
    dim, width, k = 16, 8, 3
    config = ModelConfig(
        dim=dim,
        num_heads=2,
        ffn_hidden=k * width,
        kind="moe",
        num_experts=k,
        top_k=k,
        routed_scaling_factor=scale,
    )
    moe = Block(config, layer=0).ffn
    nn.init.zeros_(moe.router.gate.weight)  # uniform routing: every expert at weight 1/k
    dense = SwiGLU(dim, k * width)
    gate_EDH, up_EDH = moe.experts.w_gate_up.detach().chunk(2, dim=-1)
    with torch.no_grad():
        # nn.Linear stores [out, in]; hidden unit e*width + j is expert e's unit j
        gate_DH = torch.cat(list(gate_EDH), dim=1)
        up_DH = torch.cat(list(up_EDH), dim=1)
        dense.gate_up.weight.copy_(torch.cat([gate_DH, up_DH], dim=1).T)
        dense.down.weight.copy_(torch.cat(list(moe.experts.w_down.detach()), dim=0).T)
    x = torch.randn(2, 5, dim, dtype=torch.float32, requires_grad=True)
    expected = dense(x) * (1.0 if scale is None else 1.0 / k)
    got = moe(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(got)
    (gx_moe,) = torch.autograd.grad(got, x, grad)
    (gx_dense,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(gx_moe, gx_dense, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_static_cache_steps_equal_the_dynamic_cache(kind):
    """Per step, logits through a preallocated cache (unwritten slots masked) equal those
    through the growing one, with left padding in a batch of 3."""
    model = tiny(kind, num_experts=4, top_k=2)
    idx = torch.randint(0, 50, (3, 12))
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :3] = False
    mask[2, :5] = False
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    dynamic, static = model.new_cache(), model.new_static_cache(3, 16)
    for cut in ((0, 7), *((t, t + 1) for t in range(7, 12))):
        sl = slice(*cut)
        args = {"attention_mask": mask[:, sl], "position_ids": pos[:, sl]}
        want = model(idx[:, sl], cache=dynamic, **args).logits
        got = model(idx[:, sl], cache=static, **args).logits
        torch.testing.assert_close(got[mask[:, sl]], want[mask[:, sl]], rtol=1e-5, atol=1e-6)
    assert static.length(0) == dynamic.length(0) == 12
    assert static.layers[0][0].shape == (3, 4, 16, 8)  # [B, H, max_len, Hd], never grown
    greedy = model.generate(idx, 4, attention_mask=mask)
    assert torch.equal(model.generate(idx, 4, attention_mask=mask, static_cache=True), greedy)


@pytest.mark.slow
def test_compiled_decode_step_equals_eager():
    """generate(compile=True): the decode steps run as one fullgraph torch.compile graph over
    the static cache, compiled once, and decode exactly what eager decoding does (MoD: in
    test_models_depth)."""
    prompt = torch.randint(1, 50, (3, 5))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    for kind in ("dense", "moe"):
        model = tiny(kind, num_experts=4, top_k=2)
        eager = model.generate(prompt, 6, attention_mask=mask)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = model.generate(prompt, 6, attention_mask=mask, compile=True)
        assert torch.equal(compiled, eager), kind


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
