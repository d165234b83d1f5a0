"""Sparse upcycling of a tiny random Llama: equal logits at init, training, generate, aux loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_models
import pytorch_mixtures as pm

transformers = pytest.importorskip("transformers")

VOCAB, LAYERS = 61, 4


def tiny_llama(seed: int = 0) -> nn.Module:
    return hf_models.tiny_llama(VOCAB, num_layers=LAYERS, seed=seed)


def tokens(batch: int = 3, seq: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("top_k", "every"), [(2, 1), (3, 2)])
def test_upcycled_logits_equal_dense_logits_at_init(top_k, every):
    dense = tiny_llama()
    model = pm.interop.moeify(copy.deepcopy(dense), num_experts=4, top_k=top_k, every=every)
    converted = [
        i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, pm.MoELayer)
    ]
    assert converted == [i for i in range(LAYERS) if (i + 1) % every == 0]
    moe = model.model.layers[converted[0]].mlp
    assert isinstance(moe.experts, pm.SwiGLUExperts) and moe.router.top_k == top_k
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding goes through the attention mask as usual
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    # real tokens only: the mask now reaches the MoE layers, which do not route padding
    # (zero MLP output there; the dense MLP's padding output was never meaningful)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert int(moe.stats.num_tokens) == int(mask.sum())
    # the routers did route: tokens spread over several experts, every slot kept
    assert int((moe.stats.tokens_per_expert > 0).sum()) > 1
    assert float(moe.stats.dropped_fraction) == 0.0


def test_noise_breaks_symmetry_and_generic_mlps_are_copied():
    dense = tiny_llama()
    noisy = pm.interop.moeify(
        copy.deepcopy(dense), num_experts=4, noise=0.05, generator=torch.Generator().manual_seed(0)
    )
    experts = noisy.model.layers[0].mlp.experts
    assert not torch.equal(experts.w_gate_up[0], experts.w_gate_up[1])
    ids = tokens()
    with torch.no_grad():
        assert not torch.allclose(noisy(ids).logits, dense(ids).logits, atol=1e-5)

    # an MLP that is not Llama-shaped becomes a list of deep copies, still exact at init
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(x)

    net = nn.Sequential(nn.ModuleList([Block(), Block()]))
    x = torch.randn(2, 5, 8)
    want = net[0][1](net[0][0](x))
    pm.interop.moeify(net, num_experts=3, top_k=2)
    assert isinstance(net[0][0].mlp.experts, pm.ModuleListExperts)
    torch.testing.assert_close(net[0][1](net[0][0](x)), want, atol=1e-6, rtol=1e-6)


def test_generate_after_conversion_matches_dense_greedy():
    dense = tiny_llama()
    model = pm.interop.moeify(copy.deepcopy(dense), num_experts=4, top_k=2)
    prompt = tokens(batch=2, seq=5, seed=1)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    out = model.generate(prompt, **kwargs)
    assert out.shape == (2, 11)
    assert torch.equal(out, dense.generate(prompt, **kwargs))


def test_outputs_loss_includes_aux_loss_and_training_lowers_it():
    model = pm.interop.moeify(tiny_llama(), num_experts=4, top_k=2, every=2, noise=0.01)
    model.train()
    ids = tokens(batch=4, seq=12, seed=2)
    out = model(input_ids=ids, labels=ids)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    task = F.cross_entropy(logits, ids[:, 1:].reshape(-1))
    aux = pm.aux_loss(model)
    assert float(aux.detach()) > 0
    torch.testing.assert_close(out.loss, task + aux)
    # what transformers.Trainer reads: outputs["loss"] (dict) or outputs[0] (tuple)
    assert out["loss"] is out.loss and out[0] is out.loss
    # attaching again does not add the aux loss twice
    pm.interop.attach_aux_loss(model)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, out.loss)
    # the aux loss reaches the routers
    out.loss.backward()
    router = model.model.layers[1].mlp.router
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses

    handle = pm.interop.attach_aux_loss(model)
    handle.remove()
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(
        out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    )


def test_moeify_bad_inputs():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"top_k: expected an integer in \[1, 4\], got 5"):
        pm.interop.moeify(model, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="every: expected an integer"):
        pm.interop.moeify(model, num_experts=4, every=0)
    with pytest.raises(ValueError, match=r"every: expected at most .* no layer would be converted"):
        pm.interop.moeify(model, num_experts=4, every=10)
    with pytest.raises(ValueError, match=r"noise: expected a finite float >= 0, got -0\.1"):
        pm.interop.moeify(model, num_experts=4, noise=-0.1)
    with pytest.raises(ValueError, match="mlp_name: expected layers with a 'ffn' submodule"):
        pm.interop.moeify(model, num_experts=4, mlp_name="ffn")
    pm.interop.moeify(model, num_experts=2, every=4)
    with pytest.raises(ValueError, match="already a MoELayer"):
        pm.interop.moeify(model, num_experts=2, every=4)


def test_geglu_mlps_upcycle_to_stacked_gated_experts():
    dense = hf_models.tiny_gemma(VOCAB)
    model = pm.interop.moeify(copy.deepcopy(dense), num_experts=3, top_k=2)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, pm.SwiGLUExperts) and experts.activation == "gelu_tanh"
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
