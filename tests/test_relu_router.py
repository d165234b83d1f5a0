"""ReLURouter (ReMoE, Wang et al. 2025, arXiv 2412.14711) against the naive per-token reference:
forward, gradients, the L1 term, the adaptive coefficient and the active-count statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from reference.frontier import naive_relu_l1, naive_relu_moe
from reference.moe import expert_fns

DIM, EXPERTS, HIDDEN = 6, 5, 8


def layer(seed: int = 0, **router_kwargs) -> pm.MoELayer:
    torch.manual_seed(seed)
    # a wide init: about half of the logits are positive, so tokens use varying expert counts
    router = pm.ReLURouter(DIM, EXPERTS, target_k=2, init_std=0.5, **router_kwargs)
    return pm.MoELayer(DIM, router, pm.MLPExperts(EXPERTS, DIM, HIDDEN)).double()


def outputs_and_grads(fn, x, params, seed=0):
    for p in [x, *params]:
        p.grad = None
    out = fn(x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * probe).sum().backward()
    return out.detach(), [p.grad.clone() for p in [x, *params]]


@pytest.mark.parametrize("masked", [False, True])
def test_forward_and_gradients_match_naive_reference(masked):
    moe = layer()
    x = torch.randn(3, 4, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    mask = mask if masked else None
    params = [moe.router.gate.weight, moe.experts.w_in, moe.experts.w_out]
    got, got_grads = outputs_and_grads(lambda v: moe(v, mask), x, params)
    fns = expert_fns(moe.experts)
    token_mask = None if mask is None else mask.reshape(-1).tolist()

    def naive(v):
        return naive_relu_moe(v.reshape(-1, DIM), moe.router.gate.weight, fns, token_mask)[
            0
        ].reshape(v.shape)

    want, want_grads = outputs_and_grads(naive, x, params)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
    # the router learns from the task loss through the weights
    assert got_grads[1].abs().sum() > 0


def test_experts_run_only_on_active_slots_and_stats_count_them():
    moe = layer()
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    _, active = naive_relu_moe(x.reshape(-1, DIM), moe.router.gate.weight, expert_fns(moe.experts))
    rows = []
    handle = moe.experts.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    moe(x)
    handle.remove()
    pairs = sum(len(a) for a in active)
    assert rows == [pairs]  # one call on exactly the nonzero (token, expert) slots
    assert 0 < pairs < x.shape[0] * x.shape[1] * EXPERTS  # some slots are zero, some are not
    stats = moe.stats
    want_counts = [sum(e in a for a in active) for e in range(EXPERTS)]
    assert stats.tokens_per_expert.tolist() == want_counts
    assert int(stats.requested_slots) == pairs and int(stats.dropped_slots) == 0
    assert int(stats.unrouted_tokens) == sum(not a for a in active)
    want_active = pairs / len(active)
    assert float(stats.active_experts_per_token) == pytest.approx(want_active)
    row = pm.routing_stats(moe)["<root>"]
    assert row["active_experts_per_token"] == pytest.approx(want_active)


def test_active_count_excludes_padding():
    moe = layer()
    x = torch.randn(2, 3, DIM, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    _, active = naive_relu_moe(
        x.reshape(-1, DIM),
        moe.router.gate.weight,
        expert_fns(moe.experts),
        mask.reshape(-1).tolist(),
    )
    moe(x, mask)
    want = sum(len(a) for a in active) / 3
    assert float(moe.stats.active_experts_per_token) == pytest.approx(want)


@pytest.mark.parametrize("load_balance", [True, False])
def test_l1_term_and_its_gradient_match_the_paper(load_balance):
    moe = layer(load_balance=load_balance, l1_coef_init=0.3, adaptive=False)
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    weight = moe.router.gate.weight
    moe(x)
    got = moe.router(x).aux_losses["relu_l1"]
    want = naive_relu_l1(x.reshape(-1, DIM), weight, 2, load_balance)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # aux_loss = lambda * L1, gradient through R only (f_e is a count: no gradient)
    (g_got,) = torch.autograd.grad(moe.router(x).aux_loss, weight)
    (g_want,) = torch.autograd.grad(
        0.3 * naive_relu_l1(x.reshape(-1, DIM), weight, 2, load_balance), weight
    )
    torch.testing.assert_close(g_got, g_want.to(g_got.dtype), rtol=1e-5, atol=1e-9)


def test_adaptive_coefficient_follows_the_update_rule_by_hand():
    # W = I: logits are x itself, so the active experts of a token are its positive entries
    router = pm.ReLURouter(4, 4, target_k=2, l1_coef_init=1e-8, l1_coef_alpha=1.2)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))

    def tokens(active_counts):
        rows = [[1.0] * k + [-1.0] * (4 - k) for k in active_counts]
        return torch.tensor([rows, rows])  # batch 2

    lam = 1e-8
    # realised k (mean over tokens): 3 > 2, 1 < 2, 2 == 2, 2.5 > 2, 1.5 < 2, 0 < 2
    for counts, sign in [
        ([3, 3], 1), ([1, 1], -1), ([2, 2], 0), ([3, 2], 1), ([1, 2], -1), ([0, 0], -1)
    ]:  # fmt: skip
        coef_used = float(router.l1_coef)
        out = router(tokens(counts))
        l1 = float(out.aux_losses["relu_l1"].detach())
        assert float(out.aux_loss.detach()) == pytest.approx(coef_used * l1)
        lam *= 1.2**sign
        assert float(router.l1_coef) == pytest.approx(lam, rel=1e-6)
    router.eval()  # no update outside training
    router(tokens([4, 4]))
    assert float(router.l1_coef) == pytest.approx(lam, rel=1e-6)
    frozen = pm.ReLURouter(4, 4, target_k=2, adaptive=False)
    frozen(torch.ones(2, 4))
    assert float(frozen.l1_coef) == pytest.approx(1e-8)
    assert "l1_coef" in router.state_dict()


def test_train_and_eval_give_the_same_output_and_aux_loss_reaches_the_router():
    torch.manual_seed(1)
    moe = pm.MoELayer(DIM, pm.ReLURouter(DIM, EXPERTS, target_k=2), pm.MLPExperts(EXPERTS, DIM, 16))
    x = torch.randn(2, 7, DIM)
    y_train = moe(x)
    loss = y_train.square().mean() + pm.aux_loss(moe)
    loss.backward()
    assert moe.router.gate.weight.grad is not None
    moe.eval()
    with torch.no_grad():
        y_eval = moe(x)
        y_decode = moe(x[:, :1])  # few tokens: no decode path for this router, the full one
    torch.testing.assert_close(y_eval, y_train.detach())
    torch.testing.assert_close(y_decode, y_train.detach()[:, :1])


def test_dropless_only():
    with pytest.raises(ValueError, match="capacity_factor"):
        pm.MoELayer(DIM, pm.ReLURouter(DIM, EXPERTS), pm.MLPExperts(EXPERTS, DIM, 8), 1.25)


def test_relu_router_in_a_module_list_of_experts():
    torch.manual_seed(2)
    experts = [
        nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, DIM)) for _ in range(EXPERTS)
    ]
    router = pm.ReLURouter(DIM, EXPERTS, target_k=2, init_std=0.5)
    moe = pm.MoELayer(DIM, router, experts)
    x = torch.randn(2, 3, DIM)
    want, _ = naive_relu_moe(x.reshape(-1, DIM), router.gate.weight, expert_fns(experts))
    torch.testing.assert_close(moe(x), want.reshape(x.shape), rtol=1e-5, atol=1e-6)
