"""Balance loss and z-loss against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

import pytorch_mixtures as pm
from pytorch_mixtures.losses import load_balancing_loss, router_z_loss
from reference.routing import naive_noisy_losses, naive_sequence_balance

DIM, EXPERTS = 6, 4


def test_balance_loss_is_top_k_at_perfect_balance():
    # cyclic shifts of one row: each expert is in exactly half the tokens' top-2, mean prob 1/4
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    logits = torch.stack([row.roll(i) for i in range(4)])
    assert float(load_balancing_loss(logits, 4, 2)) == pytest.approx(2.0, abs=1e-6)
    assert float(load_balancing_loss(logits, 4, 1)) == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_hand_computed_collapse():
    # probs [0.75, 0.25] for both tokens; both pick expert 0: f = [1, 0], P = [0.75, 0.25]
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    assert float(load_balancing_loss(logits, 2, 1)) == pytest.approx(2 * 0.75, abs=1e-6)


def test_balance_loss_matches_per_token_formula_on_random_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 6)
    mask = torch.ones(2, 9)
    mask[0, 5:] = 0
    got = load_balancing_loss(logits, 6, 3, attention_mask=mask)
    real = [(b, t) for b in range(2) for t in range(9) if mask[b, t]]
    f = [0.0] * 6
    p = [0.0] * 6
    for b, t in real:
        probs = logits[b, t].softmax(-1)
        for e in probs.topk(3).indices.tolist():
            f[e] += 1 / len(real)
        for e in range(6):
            p[e] += float(probs[e]) / len(real)
    assert float(got) == pytest.approx(6 * sum(fe * pe for fe, pe in zip(f, p, strict=True)))


def test_balance_loss_accepts_per_layer_tuple_and_repeats_mask():
    torch.manual_seed(1)
    layers = (torch.randn(8, 4), torch.randn(8, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = load_balancing_loss(layers, 4, 2, attention_mask=mask)
    keep = mask.reshape(-1).bool().repeat(2)
    want = load_balancing_loss(torch.cat(layers)[keep], 4, 2)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_z_loss_hand_computed():
    assert float(router_z_loss(torch.zeros(5, 8))) == pytest.approx(math.log(8) ** 2, rel=1e-6)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = log 4
    assert float(router_z_loss(logits)) == pytest.approx(math.log(4.0) ** 2, rel=1e-6)


def test_z_loss_excludes_padding():
    logits = torch.zeros(1, 3, 4)
    logits[0, 2] = 1e4  # padding with a huge logit must not count
    mask = torch.tensor([[1, 1, 0]])
    assert float(router_z_loss(logits, mask)) == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_losses_are_float32_for_half_logits():
    logits = torch.randn(4, 4).bfloat16()
    assert load_balancing_loss(logits, 4, 2).dtype == torch.float32
    assert router_z_loss(logits).dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: load_balancing_loss(torch.randn(3, 4), 5, 2), ValueError),
        (lambda: load_balancing_loss(torch.randn(3, 4), 4, 0), ValueError),
        (lambda: load_balancing_loss(torch.randn(3, 4), 4, 5), ValueError),
        (lambda: load_balancing_loss(torch.randn(3, 4), 4, 2, torch.ones(2)), ValueError),
        (lambda: load_balancing_loss(torch.ones(3, 4, dtype=torch.long), 4, 2), TypeError),
        (lambda: router_z_loss("logits"), TypeError),  # type: ignore[arg-type]
    ],
)
def test_loss_argument_errors(call, error):
    with pytest.raises(error):
        call()


def test_router_aux_loss_uses_its_coefficients():
    torch.manual_seed(0)
    router = pm.TopKRouter(8, 4, 2, balance_loss_coef=0.5, z_loss_coef=0.25)
    route = router(torch.randn(2, 5, 8))
    want = 0.5 * load_balancing_loss(route.logits, 4, 2) + 0.25 * router_z_loss(route.logits)
    torch.testing.assert_close(route.aux_loss, want)
    torch.testing.assert_close(
        route.aux_losses["load_balancing"], load_balancing_loss(route.logits, 4, 2)
    )


@pytest.mark.parametrize("top_k", [2, 3])
def test_noisy_gating_losses_match_hand_computation(top_k):
    torch.manual_seed(3 + top_k)
    router = pm.TopKRouter(DIM, EXPERTS, top_k, noisy_gating=True, init_std=0.7).double()
    with torch.no_grad():
        router.noise_gate.weight.normal_(0.0, 0.5)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    torch.manual_seed(11)
    route = router(x, mask)
    torch.manual_seed(11)
    noise = torch.randn(12, EXPERTS, dtype=torch.float64)
    importance, load = naive_noisy_losses(
        x.reshape(-1, DIM),
        router.gate.weight,
        router.noise_gate.weight,
        noise,
        top_k,
        token_mask=mask.reshape(-1).tolist(),
    )
    torch.testing.assert_close(route.aux_losses["importance"], importance.float())
    torch.testing.assert_close(route.aux_losses["load"], load.float())
    assert float(load.detach()) > 0 and float(importance.detach()) > 0
    # gradients of the load loss reach both the gate and the noise weights, as by hand
    params = [router.gate.weight, router.noise_gate.weight]
    got = torch.autograd.grad(route.aux_losses["load"], params)
    want = torch.autograd.grad(load, params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    expected = (
        0.01 * route.aux_losses["load_balancing"]
        + 0.001 * route.aux_losses["router_z"]
        + 0.01 * route.aux_losses["importance"]
        + 0.01 * route.aux_losses["load"]
    )
    torch.testing.assert_close(route.aux_loss, expected)


def test_cv_squared_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, population variance 3.5
    torch.testing.assert_close(pm.balancing.cv_squared(values), torch.tensor(3.5 / 9.0))
    assert float(pm.balancing.cv_squared(torch.full((5,), 2.0))) == 0.0


def test_sequence_balance_loss_matches_naive_with_padding():
    torch.manual_seed(4)
    router = pm.TopKRouter(DIM, EXPERTS, 2, balance="sequence", init_std=1.0).double()
    x = torch.randn(3, 5, DIM, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    route = router(x, mask)
    chosen = route.expert_ids.view(3, 5, 2).tolist()
    probs = (x @ router.gate.weight.T).softmax(-1)  # computed apart from the router
    want = naive_sequence_balance(probs, chosen, mask)
    torch.testing.assert_close(route.aux_losses["load_balancing"], want.float())
    (g_got,) = torch.autograd.grad(route.aux_losses["load_balancing"], [router.gate.weight])
    (g_want,) = torch.autograd.grad(want, [router.gate.weight])
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
    # one sequence: the batch and sequence forms agree
    batch_router = pm.TopKRouter(DIM, EXPERTS, 2, init_std=1.0).double()
    batch_router.load_state_dict(router.state_dict())
    torch.testing.assert_close(
        router(x[1:2]).aux_losses["load_balancing"],
        batch_router(x[1:2]).aux_losses["load_balancing"],
    )
