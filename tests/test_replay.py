"""Routing replay (Megatron-Core's R3): a replayed forward equals the recorded one bit for bit on
the same weights, gradients reach the routers, and under a changed router the recorded experts
(and MoD tokens) are kept while the weights follow the current router (naive reference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from reference.frontier import dropped_slots, naive_replayed_topk_moe
from reference.moe import expert_fns

D, E = 8, 4

ROUTERS = {
    "softmax": {},
    "sigmoid_scaled": {"score_func": "sigmoid", "routed_scaling_factor": 2.5},
    "unnormalised": {"normalize_weights": False},
    "capacity": {"capacity_factor": 1.0, "drop_policy": "probs"},
    "bias_groups": {"expert_bias": True, "num_groups": 2, "topk_groups": 1},
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.proj(x))


class Net(nn.Module):
    """Two MoE layers (top-k and ReLU routing) and a MoD layer."""

    def __init__(self, **router_kwargs) -> None:
        super().__init__()
        self.moe = pm.MoELayer(D, pm.TopKRouter(D, E, 2, **router_kwargs), pm.MLPExperts(E, D, 16))
        relu = pm.ReLURouter(D, E, target_k=2, init_std=0.5)
        self.relu_moe = pm.MoELayer(D, relu, pm.MLPExperts(E, D, 16))
        self.mod = pm.MixtureOfDepths(Block(), D, capacity=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.moe(x)
        x = x + self.relu_moe(x)
        return self.mod(x)


def loss_and_grads(net: Net, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad()
    y = net(x)
    (y.square().mean() + pm.aux_loss(net)).backward()
    return y.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_replay_equals_the_recorded_forward_bit_for_bit(name):
    torch.manual_seed(0)
    net = Net(**ROUTERS[name])
    x = torch.randn(3, 6, D)
    torch.manual_seed(1)
    with pm.record_routing(net) as record:
        y_rec, g_rec = loss_and_grads(net, x)
        aux_rec = pm.aux_loss(net).detach()
    assert set(record) == {"moe.router", "relu_moe.router", "mod"}
    assert record["moe.router"][0].shape == (18, 2) and record["moe.router"][0].dtype == torch.long
    assert record["relu_moe.router"][0].shape == (18, E)
    assert record["mod"][0].shape == (3, 6) and record["mod"][0].dtype == torch.bool
    # the recording forward moved the ReLU router's adaptive lambda: put it back
    net.relu_moe.router.l1_coef.fill_(1e-8)
    torch.manual_seed(1)
    with pm.replay_routing(net, record):
        y_rep, g_rep = loss_and_grads(net, x)
    assert torch.equal(y_rep, y_rec)
    assert len(g_rep) == len(g_rec)
    for a, b in zip(g_rep, g_rec, strict=True):
        assert torch.equal(a, b)
    # gradients reach every router through the replayed weights
    assert net.moe.router.gate.weight.grad.abs().sum() > 0
    assert net.relu_moe.router.gate.weight.grad.abs().sum() > 0
    assert net.mod.router.weight.grad.abs().sum() > 0
    assert torch.isfinite(aux_rec)


@pytest.mark.parametrize("name", ["softmax", "sigmoid_scaled", "unnormalised"])
def test_replay_under_a_changed_router_keeps_the_recorded_experts(name):
    torch.manual_seed(0)
    kwargs = ROUTERS[name]
    router = pm.TopKRouter(D, E, 2, **kwargs)
    moe = pm.MoELayer(D, router, pm.MLPExperts(E, D, 16)).double()
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    with pm.record_routing(moe) as record:
        moe(x)
    ids_NK = record["router"][0]
    with torch.no_grad():
        router.gate.weight.add_(torch.randn_like(router.gate.weight))  # a different router
    assert not torch.equal(router(x).expert_ids.view(-1, 2), ids_NK)  # it would choose others
    with pm.replay_routing(moe, record):
        y = moe(x)
    assert torch.equal(moe.stats.tokens_per_expert, torch.bincount(ids_NK.view(-1), minlength=E))
    fns = expert_fns(moe.experts)
    want = naive_replayed_topk_moe(
        x.reshape(-1, D), router.gate.weight, fns, ids_NK, kwargs.get("score_func", "softmax"),
        kwargs.get("normalize_weights", True), kwargs.get("routed_scaling_factor", 1.0),
    ).reshape(x.shape)  # fmt: skip
    torch.testing.assert_close(y, want)
    # gradients: the same as the naive reference's, the router's included
    (g_got,) = torch.autograd.grad(y.sum(), router.gate.weight)
    (g_want,) = torch.autograd.grad(want.sum(), router.gate.weight)
    torch.testing.assert_close(g_got, g_want)
    assert g_got.abs().sum() > 0


def test_capacity_drops_are_recomputed_on_the_recorded_assignment():
    torch.manual_seed(3)
    router = pm.TopKRouter(D, E, 2, capacity_factor=0.75, drop_policy="probs")
    x = torch.randn(2, 6, D)
    with pm.record_routing(router) as record:
        router(x)
    ids_NK = record[""][0]
    with torch.no_grad():
        router.gate.weight.mul_(-3.0)
    with pm.replay_routing(router, record):
        out = router(x)
    assert torch.equal(out.expert_ids.view(-1, 2), ids_NK)
    probs = (x.reshape(-1, D) @ router.gate.weight.T).softmax(-1)
    gates = probs.gather(-1, ids_NK)
    gates = gates / gates.sum(-1, keepdim=True)
    torch.testing.assert_close(out.weights.view(-1, 2), gates)
    choices = [[(int(ids_NK[n, k]), gates[n, k]) for k in range(2)] for n in range(ids_NK.shape[0])]
    want = dropped_slots(choices, E, 0.75, "probs", [True] * len(choices))
    kept = out.kept.view(-1, 2)
    got = {(n, k) for n in range(kept.shape[0]) for k in range(2) if not kept[n, k]}
    assert got == want and want  # some drops, on the recorded experts with the new weights


def test_mod_replay_keeps_the_recorded_tokens_and_the_router_learns():
    torch.manual_seed(0)
    mod = pm.MixtureOfDepths(Block(), D, capacity=0.25)
    x = torch.randn(2, 8, D)
    with pm.record_routing(mod) as record:
        mod(x)
    chosen = record[""][0]
    with torch.no_grad():
        mod.router.weight.neg_()  # would now select the other tokens
    with pm.replay_routing(mod, record):
        y = mod(x)
    assert torch.equal(mod.stats.processed_per_row, chosen.sum(-1))
    untouched = ~chosen
    assert torch.equal(y[untouched], x[untouched])
    assert not torch.equal(y[chosen], x[chosen])
    y.square().sum().backward()
    assert mod.router.weight.grad.abs().sum() > 0


def test_several_forwards_replay_in_order_and_errors_are_clear():
    torch.manual_seed(0)
    moe = pm.MoELayer(D, pm.TopKRouter(D, E, 2), pm.MLPExperts(E, D, 16))
    x1, x2 = torch.randn(2, 3, D), torch.randn(1, 5, D)
    with pm.record_routing(moe) as record:
        y1, y2 = moe(x1), moe(x2)
    assert [t.shape for t in record["router"]] == [(6, 2), (5, 2)]
    with pm.replay_routing(moe, record):
        assert torch.equal(moe(x1), y1) and torch.equal(moe(x2), y2)
        with pytest.raises(ValueError, match="ran out"):
            moe(x1)
    with pm.replay_routing(moe, record), pytest.raises(ValueError, match=r"shape \(5, 2\)"):
        moe(x2)  # the first recorded call had 6 tokens
    # the contexts clean up, also after an error: the decode path and plain forwards are back
    assert "_routing_replay" not in moe.router.__dict__
    moe.eval()
    assert moe.router.decide(x1.reshape(-1, D)) is not None


def test_eval_decode_shaped_calls_replay_through_the_full_path():
    torch.manual_seed(0)
    moe = pm.MoELayer(D, pm.TopKRouter(D, E, 2), pm.MLPExperts(E, D, 16)).eval()
    x = torch.randn(1, 1, D)  # one token: the decode path outside replay
    with pm.record_routing(moe) as record:
        y = moe(x)
    assert len(record["router"]) == 1  # recorded: the full path ran
    with torch.no_grad():
        moe.router.gate.weight.add_(torch.randn_like(moe.router.gate.weight))
    with pm.replay_routing(moe, record):
        moe(x)
    assert torch.equal(
        moe.stats.tokens_per_expert, torch.bincount(record["router"][0][0], minlength=E)
    )
    del y


def test_record_is_saved_and_loaded_with_weights_only(tmp_path):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 4, D)
    with pm.record_routing(net) as record:
        y = net(x)
    torch.save(record, tmp_path / "record.pt")
    loaded = torch.load(tmp_path / "record.pt", weights_only=True)
    net.relu_moe.router.l1_coef.fill_(1e-8)
    with pm.replay_routing(net, loaded):
        assert torch.equal(net(x), y)


def test_unsupported_and_nested_contexts_are_refused():
    ec = pm.MoELayer(D, pm.ExpertChoiceRouter(D, E), pm.MLPExperts(E, D, 16))
    with pytest.raises(ValueError, match="ExpertChoiceRouter"), pm.record_routing(ec):
        pass
    moe = pm.MoELayer(D, pm.TopKRouter(D, E), pm.MLPExperts(E, D, 16))
    with (
        pm.record_routing(moe),
        pytest.raises(ValueError, match="already"),
        pm.record_routing(moe),
    ):
        pass
    assert "_routing_replay" not in moe.router.__dict__


def test_compiled_router_still_works_outside_replay():
    torch.manual_seed(0)
    moe = pm.MoELayer(D, pm.TopKRouter(D, E, 2), pm.MLPExperts(E, D, 16))
    x = torch.randn(2, 4, D)
    with pm.record_routing(moe):
        moe(x)
    compiled = torch.compile(moe, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), moe(x))
