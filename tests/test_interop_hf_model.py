"""Converted Hugging Face models: transformers' own aux loss and router logits, padding.

Tiny random 2-layer MoE language models (no downloads). A model converted with
``pm.interop.from_hf_model`` must give what the original gives: ``outputs.router_logits``,
``outputs.aux_loss`` (transformers' pooled ``load_balancing_loss_func``), ``outputs.loss`` and
the routers' gradients, with and without a padded attention mask.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import hf_models
import pytorch_mixtures as pm

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, SEQ = 53, 3, 7
ATOL = RTOL = 1e-5


def batch(seed: int = 0, padded: bool = True):
    """Token ids [3, 7], a right-padded 0/1 mask (or None) and labels ignoring the padding."""
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    if not padded:
        return ids, None, ids.clone()
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def hf_pooled_loss(router_logits, config, mask):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    return load_balancing_loss_func(router_logits, num_experts, config.num_experts_per_tok, mask)


def moe_layers(model: nn.Module) -> list[pm.interop.HFMoELayer]:
    return [m for m in model.modules() if isinstance(m, pm.interop.HFMoELayer)]


def hf_gates(model: nn.Module) -> list[torch.Tensor]:
    return [layer.mlp.gate.weight for layer in model.model.layers]


def pm_gates(model: nn.Module) -> list[torch.Tensor]:
    return [layer.router.gate.weight for layer in moe_layers(model)]


@pytest.mark.parametrize("padded", [False, True])
def test_converted_mixtral_adds_exactly_transformers_aux_loss(padded):
    hf = hf_models.tiny_moe_lm("mixtral", VOCAB).train()
    model = pm.interop.from_hf_model(copy.deepcopy(hf)).train()
    assert len(moe_layers(model)) == 2
    ids, mask, labels = batch(padded=padded)
    kwargs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    want = hf(**kwargs, output_router_logits=True)
    got = model(**kwargs, output_router_logits=True)

    # transformers' pooled formula over both layers, its coefficient, padding masked
    pooled = hf_pooled_loss(got.router_logits, model.config, mask)
    torch.testing.assert_close(got.aux_loss, pooled)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(
        want.aux_loss, hf_pooled_loss(want.router_logits, hf.config, mask), atol=ATOL, rtol=RTOL
    )
    # about top_k = 2 for the whole model, not 2 per layer
    assert 1.9 < float(got.aux_loss.detach()) < 2.6
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=RTOL)
    # the layers' own losses are not added a second time (coefficients 0 by default)
    assert float(pm.aux_loss(model).detach()) == 0.0
    for layer in moe_layers(model):
        assert layer.router.balance_loss_coef == 0.0 and layer.router.z_loss_coef == 0.0

    # the aux loss alone reaches the routers, with transformers' gradients
    want.aux_loss.backward(retain_graph=True)
    got.aux_loss.backward(retain_graph=True)
    for ours, theirs in zip(pm_gates(model), hf_gates(hf), strict=True):
        assert ours.grad is not None and float(ours.grad.abs().sum()) > 0
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4)
    model.zero_grad()
    hf.zero_grad()
    want.loss.backward()
    got.loss.backward()
    for ours, theirs in zip(pm_gates(model), hf_gates(hf), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(hf_models.MOE_FAMILIES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_router_logits_recorded_as_transformers_does(family, mode):
    hf = hf_models.tiny_moe_lm(family, VOCAB, seed=3)
    # per-block conversion (no model-level helper): the recorder alone must satisfy transformers
    model = copy.deepcopy(hf)
    for layer in model.model.layers:
        layer.mlp = pm.interop.from_hf(layer.mlp)
    hf.train(mode == "train")
    model.train(mode == "train")
    model.config.output_router_logits = True
    hf.config.output_router_logits = True
    ids, _, labels = batch(seed=4, padded=False)
    want = hf(input_ids=ids, labels=labels)
    got = model(input_ids=ids, labels=labels)
    assert len(got.router_logits) == len(want.router_logits) == 2
    for ours, theirs in zip(got.router_logits, want.router_logits, strict=True):
        assert ours.shape == theirs.shape == (BATCH * SEQ, theirs.shape[-1])
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=RTOL)
    if mode == "train":
        got.loss.backward()
        want.loss.backward()
        for ours, theirs in zip(pm_gates(model), hf_gates(hf), strict=True):
            torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4)


def test_recorder_keeps_hooks_installed_before_conversion_and_copies():
    hf = hf_models.tiny_moe_lm("mixtral", VOCAB, seed=5)
    ids, _, _ = batch(seed=5, padded=False)
    hf(input_ids=ids, output_router_logits=True)  # transformers installs its recorders now
    model = pm.interop.from_hf_model(copy.deepcopy(hf))
    want = hf(input_ids=ids, output_router_logits=True).router_logits
    got = model(input_ids=ids, output_router_logits=True).router_logits
    assert len(got) == 2
    for ours, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    # the recorder is a stand-in: no parameters, no state, pickles and copies
    recorder = moe_layers(model)[0].router_logits
    assert isinstance(recorder, type(hf.model.layers[0].mlp.gate))
    assert list(recorder.parameters()) == [] and recorder.state_dict() == {}
    # (transformers' own recorder hooks are closures that do not pickle: a fresh block's layer)
    fresh = pm.interop.from_hf(hf_models.tiny_moe_lm("mixtral", VOCAB, seed=5).model.layers[0].mlp)
    layer = pickle.loads(pickle.dumps(fresh))
    assert type(layer.router_logits) is type(recorder)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(layer(x), fresh(x))
    twin = copy.deepcopy(model)
    out = twin(input_ids=ids, output_router_logits=True)
    for ours, theirs in zip(out.router_logits, want, strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


def hf_layer_logits(hf: nn.Module, ids, mask):
    return hf(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits


def test_padding_reaches_converted_layers_as_transformers_masks_it():
    hf = hf_models.tiny_moe_lm("mixtral", VOCAB, seed=7).train()
    model = pm.interop.from_hf_model(copy.deepcopy(hf), balance_loss_coef=0.01).train()
    ids, mask, _ = batch(seed=7)
    hf_logits = hf_layer_logits(hf, ids, mask)
    model(input_ids=ids, attention_mask=mask)
    layers = moe_layers(model)
    config = hf.config
    for layer, logits in zip(layers, hf_logits, strict=True):
        # each layer's balance loss: transformers' formula on its logits with the mask
        want = hf_pooled_loss((logits,), config, mask)
        torch.testing.assert_close(layer.aux_losses["load_balancing"], want, atol=ATOL, rtol=RTOL)
        unmasked = hf_pooled_loss((logits,), config, None)
        assert not torch.allclose(want, unmasked, atol=1e-3)
        assert int(layer.stats.num_tokens) == int(mask.sum())
        assert not layer._model_call_live  # the hand-over ended with the call

    # a call without a mask hands None: no mask carries over from the previous call
    model(input_ids=ids)
    for layer, logits in zip(layers, hf_layer_logits(hf, ids, None), strict=True):
        want = hf_pooled_loss((logits,), config, None)
        torch.testing.assert_close(layer.aux_losses["load_balancing"], want, atol=ATOL, rtol=RTOL)
        assert int(layer.stats.num_tokens) == BATCH * SEQ
    # a positional mask is read too, and a layer called on its own afterwards sees none
    model(ids, mask)
    assert int(layers[0].stats.num_tokens) == int(mask.sum())
    layers[0](torch.randn(BATCH, SEQ, 32))
    assert int(layers[0].stats.num_tokens) == BATCH * SEQ
    # the library's per-layer losses add up in pm.aux_loss (not transformers' pooled form)
    model(input_ids=ids, attention_mask=mask)
    total = sum(0.01 * layer.aux_losses["load_balancing"] for layer in layers)
    torch.testing.assert_close(pm.aux_loss(model), total)


def test_mask_routing_survives_checkpointing_generate_and_copies():
    hf = hf_models.tiny_moe_lm("mixtral", VOCAB, seed=8)
    model = pm.interop.from_hf_model(copy.deepcopy(hf))
    ids, mask, labels = batch(seed=8)
    # left-padded greedy generation with a KV cache: the mask's last columns follow the steps
    left = torch.flip(mask, dims=[1])
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(
        model.generate(ids, attention_mask=left, **kwargs),
        hf.generate(ids, attention_mask=left, **kwargs),
    )
    # gradient checkpointing recomputes the layers inside backward with the call's mask
    plain = copy.deepcopy(model).train()
    checkpointed = copy.deepcopy(model).train()
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)
    (enable or checkpointed.gradient_checkpointing_enable)()
    for net in (plain, checkpointed):
        out = net(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        out.loss.backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    # a deep copy's hooks hand the mask to the copy's layers only
    twin = copy.deepcopy(model)
    twin(input_ids=ids, attention_mask=mask)
    assert all(layer._model_mask is mask for layer in moe_layers(twin))
    assert all(layer._model_mask is not mask for layer in moe_layers(model))
    # idempotent, removable
    handle = pm.interop.route_attention_mask(model)
    assert pm.interop.route_attention_mask(model) is handle
    handle.remove()
    model(input_ids=ids, attention_mask=mask)
    assert all(layer._model_mask is not mask for layer in moe_layers(model))


def test_mask_routing_bad_inputs():
    model = pm.interop.from_hf_model(hf_models.tiny_moe_lm("mixtral", VOCAB, seed=9))
    ids, mask, _ = batch(seed=9)
    with pytest.raises(TypeError, match=r"attention_mask: expected a \[B, S\] tensor .* got list"):
        model(input_ids=ids, attention_mask=mask.tolist())
    with pytest.raises(TypeError, match=r"model: expected an nn\.Module, got int"):
        pm.interop.route_attention_mask(3)
    with pytest.raises(ValueError, match="model: expected a model holding one of"):
        pm.interop.from_hf_model(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="route_mask: expected a bool, got 1"):
        pm.interop.from_hf_model(model, route_mask=1)
    layer = moe_layers(model)[0]
    layer.__dict__.update(_model_mask=torch.ones(2, 3), _model_call_live=True)
    with pytest.raises(ValueError, match=r"attention_mask: expected the model's \[B, S\] mask"):
        layer(torch.randn(4, 3, 32))
    with pytest.raises(ValueError, match="attention_mask: expected at least 5 columns"):
        layer(torch.randn(2, 5, 32))
    layer.__dict__.update(_model_mask=None, _model_call_live=False)


def test_upcycled_layers_exclude_padding_as_transformers_does():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = pm.interop.moeify(hf_models.tiny_llama(VOCAB, num_layers=2), num_experts=4, top_k=2)
    for layer in moe_layers(model):
        with torch.no_grad():
            layer.router.gate.weight.normal_(0.0, 1.0)
    inputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
        for layer in moe_layers(model)
    ]
    ids, mask, labels = batch(seed=10)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    for hook in hooks:
        hook.remove()
    total = torch.zeros(())
    for layer, x in zip(moe_layers(model), inputs, strict=True):
        logits = layer.router.gate(x.reshape(-1, 32))
        want = load_balancing_loss_func((logits,), 4, 2, mask)
        torch.testing.assert_close(layer.aux_losses["load_balancing"], want, atol=ATOL, rtol=RTOL)
        total = total + layer.aux_loss
    torch.testing.assert_close(pm.aux_loss(model), total)
    assert out.loss.requires_grad
