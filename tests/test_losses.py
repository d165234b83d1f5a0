"""Balance loss and z-loss against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

import pytorch_mixtures as pm
from pytorch_mixtures.losses import load_balancing_loss, router_z_loss


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
