"""Routers against naive per-token references: top-k schemes (bias balancing, group limits,
noisy gating), expert choice capacity, hash and uniform routing; padding in every loss."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import pytorch_mixtures as pm
from reference.moe import expert_fns
from reference.routing import (
    naive_expert_choice,
    naive_scheme_topk,
)
from test_moe_layer import assert_same, make_experts, run_and_grad

DIM, EXPERTS, HIDDEN = 6, 4, 10


# --------------------------------------------------------------------------- top-k schemes

SCHEME_CASES = [
    # kwargs for TopKRouter, experts, num_experts
    (dict(top_k=2, score_func="sigmoid", expert_bias=True), "swiglu", 4),
    (dict(top_k=2, score_func="softmax", expert_bias=True, normalize_weights=False), "mlp", 4),
    (dict(top_k=2, score_func="sigmoid", num_groups=4, topk_groups=2), "mlp", 8),
    (dict(top_k=3, score_func="softmax", num_groups=2, topk_groups=1), "swiglu", 8),
    (
        dict(
            top_k=2,
            score_func="sigmoid",
            expert_bias=True,
            num_groups=4,
            topk_groups=2,
            routed_scaling_factor=2.5,
        ),
        "list",
        8,
    ),
    (
        dict(top_k=1, score_func="softmax", normalize_weights=False, routed_scaling_factor=0.5),
        "mlp",
        4,
    ),
]


@pytest.mark.parametrize(("kwargs", "kind", "num_experts"), SCHEME_CASES)
def test_topk_schemes_match_naive_reference(kwargs, kind, num_experts):
    torch.manual_seed(len(kwargs) + num_experts)
    router = pm.TopKRouter(DIM, num_experts, init_std=1.0, **kwargs)
    if router.expert_bias is not None:
        # a bias large enough to change choices, so "selection only" is exercised
        router.expert_bias.copy_(torch.randn(num_experts) * 0.3)
    moe = pm.MoELayer(DIM, router, make_experts(kind, num_experts)).double()
    assert router.expert_bias is None or router.expert_bias.dtype == torch.float32
    x = torch.randn(3, 5, DIM, dtype=torch.float64, requires_grad=True)
    params = list(moe.parameters())
    y, g = run_and_grad(moe, x, params)
    fns = expert_fns(moe.experts if kind != "list" else moe.experts.experts)

    def reference(inp):
        out, _ = naive_scheme_topk(
            inp.reshape(-1, DIM),
            router.gate.weight,
            fns,
            router.top_k,
            score_func=router.score_func,
            normalize=router.normalize_weights,
            bias_E=router.expert_bias,
            num_groups=router.num_groups,
            topk_groups=router.topk_groups,
            group_score=router.group_score,
            scaling=router.routed_scaling_factor,
        )
        return out.reshape(inp.shape)

    y_ref, g_ref = run_and_grad(reference, x, params)
    assert_same(y, y_ref, g, g_ref)


def test_bias_changes_selection_not_weights():
    torch.manual_seed(0)
    router = pm.TopKRouter(DIM, EXPERTS, 1, score_func="sigmoid", expert_bias=True).double()
    x = torch.randn(20, DIM, dtype=torch.float64)
    before = router(x)
    router.expert_bias[2] = 10.0  # everyone now picks expert 2
    after = router(x)
    assert after.expert_ids.tolist() == [2] * 20
    torch.testing.assert_close(after.probs, before.probs)  # the scores are unbiased
    torch.testing.assert_close(after.weights, torch.ones(20, dtype=torch.float64))
    unnorm = pm.TopKRouter(
        DIM, EXPERTS, 1, score_func="sigmoid", expert_bias=True, normalize_weights=False
    ).double()
    unnorm.expert_bias[2] = 10.0
    route = unnorm(x)
    torch.testing.assert_close(route.weights, route.probs[:, 2])


def test_group_limited_routing_stays_in_best_groups():
    torch.manual_seed(1)
    router = pm.TopKRouter(
        DIM, 8, 2, score_func="sigmoid", num_groups=4, topk_groups=1, init_std=1.0
    )
    route = router(torch.randn(2, 16, DIM))
    ids_NK = route.expert_ids.view(-1, 2)
    assert torch.equal(ids_NK[:, 0] // 2, ids_NK[:, 1] // 2)  # both from one group of 2
    assert router.group_score == "top2_sum"


def test_noisy_gating_matches_naive_forward_and_backward():
    torch.manual_seed(2)
    router = pm.TopKRouter(DIM, EXPERTS, 2, noisy_gating=True, init_std=1.0)
    moe = pm.MoELayer(DIM, router, make_experts("mlp")).double()
    with torch.no_grad():
        router.noise_gate.weight.normal_(0.0, 0.5)
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    params = list(moe.parameters())
    torch.manual_seed(7)
    y, g = run_and_grad(moe, x, params)
    torch.manual_seed(7)
    noise = torch.randn(10, EXPERTS, dtype=torch.float64)  # the router's first random draw

    def reference(inp):
        out, _ = naive_scheme_topk(
            inp.reshape(-1, DIM),
            router.gate.weight,
            expert_fns(moe.experts),
            2,
            noise_NE=noise,
            noise_weight_ED=router.noise_gate.weight,
        )
        return out.reshape(inp.shape)

    y_ref, g_ref = run_and_grad(reference, x, params)
    assert_same(y, y_ref, g, g_ref)
    assert router.noise_gate.weight.grad is not None
    assert router.noise_gate.weight.grad.abs().sum() > 0  # the noise std is learned
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x))  # no noise in eval


ROUTER_FACTORIES = {
    "batch": lambda: pm.TopKRouter(DIM, EXPERTS, 2, init_std=1.0),
    "sequence": lambda: pm.TopKRouter(DIM, EXPERTS, 2, balance="sequence", init_std=1.0),
    "sigmoid_bias_groups": lambda: pm.TopKRouter(
        DIM, EXPERTS, 2, score_func="sigmoid", expert_bias=True, num_groups=2, init_std=1.0
    ),
    "noisy": lambda: pm.TopKRouter(DIM, EXPERTS, 2, noisy_gating=True, init_std=1.0),
    "expert_choice": lambda: pm.ExpertChoiceRouter(DIM, EXPERTS, z_loss_coef=0.1, init_std=1.0),
}


@pytest.mark.parametrize("name", sorted(ROUTER_FACTORIES))
def test_padding_excluded_from_every_loss(name):
    torch.manual_seed(5)
    router = ROUTER_FACTORIES[name]()
    x = torch.randn(2, 6, DIM)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    garbage = x.clone()
    garbage[mask == 0] = 50.0 * torch.randn(int((mask == 0).sum()), DIM)
    torch.manual_seed(0)
    a = router(x, mask)
    torch.manual_seed(0)
    b = router(garbage, mask)
    assert a.aux_losses.keys() == b.aux_losses.keys()
    for key in a.aux_losses:
        torch.testing.assert_close(a.aux_losses[key], b.aux_losses[key], msg=key)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)


# --------------------------------------------------------------------------- bias balancing


def skewed_router(seed: int = 0) -> tuple[pm.TopKRouter, torch.Tensor]:
    """A sigmoid router whose gate favours experts 0 and 1 for inputs along ``direction``."""
    torch.manual_seed(seed)
    router = pm.TopKRouter(16, 8, 2, score_func="sigmoid", expert_bias=True)
    direction = torch.randn(16)
    direction /= direction.norm()
    with torch.no_grad():
        router.gate.weight.normal_(0.0, 0.2)
        router.gate.weight[:2] += 2.0 * direction
    return router, direction


def test_bias_balancing_fixes_a_skewed_router(one_thread):
    router, direction = skewed_router()
    router.train()
    held_out = torch.randn(2048, 16, generator=torch.Generator().manual_seed(1)) + direction

    def imbalance() -> float:
        loads = torch.bincount(router(held_out).expert_ids, minlength=8).float()
        router.update_expert_bias(0.0)  # measuring must not feed the bias
        return float(loads.max() / loads.mean())

    start = imbalance()
    assert start > 2.5, start
    history = []
    with torch.no_grad():
        for step in range(300):
            router(torch.randn(512, 16) + direction)  # fresh random data every step
            pm.update_expert_bias(router, rate=1e-3)  # DeepSeek-V3's rate
            if step % 50 == 49:
                history.append(imbalance())
    assert history[-1] < 1.2, (start, history)
    assert router.expert_bias[:2].max() < router.expert_bias[2:].min()
    assert router.gate.weight.grad is None  # no aux loss involved


def test_bias_counts_once_per_real_forward_with_checkpointing_and_accumulation(one_thread):
    router, direction = skewed_router(1)
    x = torch.randn(4, 16, 16) + direction
    moe = pm.MoELayer(16, router, pm.MLPExperts(8, 16, 8)).train()
    micro = [x[:2], x[2:]]
    expected = sum(torch.bincount(router(m).expert_ids, minlength=8) for m in micro)
    router.update_expert_bias(0.0)
    for reentrant in (False, True):
        for m in micro:  # gradient accumulation over two micro-batches, checkpointed
            inp = m.clone().requires_grad_(True)
            checkpoint(moe, inp, use_reentrant=reentrant).sum().backward()
        assert torch.equal(router.pending_loads, expected), reentrant
        loads = pm.update_expert_bias(moe, rate=0.0)["router"]  # keep routing fixed
        assert torch.equal(loads, expected)
        assert router.pending_loads is None
    moe.eval()
    moe(x)
    assert router.pending_loads is None  # eval forwards do not count


def test_bias_update_all_reduces_loads_across_ranks(monkeypatch):
    """Under torch.distributed the update must use the loads summed over ranks.

    The collective is stood in for by a function adding another rank's counts (a spawned
    2-rank gloo run costs more than this file's time budget on a shared 2-core machine).
    """
    router = pm.TopKRouter(8, 4, 2, score_func="sigmoid", expert_bias=True)
    router(torch.randn(3, 16, 8))
    local = router.pending_loads.clone()
    other_rank = torch.tensor([40, 0, 0, 0])
    calls = []

    def fake_all_reduce(tensor, group=None):
        calls.append(group)
        tensor += other_rank

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    loads = pm.update_expert_bias(router, rate=1e-2, group="the-group")[""]
    total = local + other_rank
    assert calls == ["the-group"] and torch.equal(loads, total)
    expected = 1e-2 * torch.sign(total.float().mean() - total.float())
    torch.testing.assert_close(router.expert_bias, expected)
    router(torch.randn(3, 16, 8))
    pm.update_expert_bias(router, rate=1e-2, all_reduce=False)
    assert len(calls) == 1


def test_padding_not_counted_by_bias():
    router, direction = skewed_router(2)
    x = torch.randn(4, 64, 16) + direction
    mask = torch.zeros(4, 64, dtype=torch.long)
    mask[:, :10] = 1
    route = router(x, mask)
    want = torch.bincount(route.expert_ids.view(4, 64, 2)[:, :10].reshape(-1), minlength=8)
    assert torch.equal(router.pending_loads, want)


def test_bias_is_float32_buffer_in_state_dict():
    router = pm.TopKRouter(DIM, EXPERTS, 2, expert_bias=True)
    router.expert_bias.copy_(torch.tensor([1e-3, -2e-3, 3e-3, 1.0 + 1e-3]))
    saved = router.expert_bias.clone()
    assert "expert_bias" in router.state_dict()
    router.to(torch.bfloat16)
    assert router.expert_bias.dtype == torch.float32
    assert torch.equal(router.expert_bias, saved)
    assert router.gate.weight.dtype == torch.bfloat16
    other = pm.TopKRouter(DIM, EXPERTS, 2, expert_bias=True)
    other.load_state_dict(router.float().state_dict())
    assert torch.equal(other.expert_bias, saved)
    with pytest.raises(ValueError, match="model: contains no"):
        pm.update_expert_bias(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="expert_bias=False"):
        pm.TopKRouter(DIM, EXPERTS).update_expert_bias()


def test_scheme_arguments_are_checked():
    with pytest.raises(ValueError, match="num_groups"):
        pm.TopKRouter(DIM, 6, 2, num_groups=4)
    with pytest.raises(ValueError, match="topk_groups"):
        pm.TopKRouter(DIM, 8, 3, num_groups=4, topk_groups=1)
    with pytest.raises(ValueError, match="balance"):
        pm.TopKRouter(DIM, 8, 2, balance="everything")
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        pm.TopKRouter(DIM, 8, 2, routed_scaling_factor=0.0)
    with pytest.raises(ValueError, match="group_score"):
        pm.TopKRouter(DIM, 8, 2, num_groups=2, group_score="mean")
    with pytest.raises(ValueError, match="noisy_gating"):
        pm.TopKRouter(DIM, 8, 2, noisy_gating=True, expert_bias=True)


# --------------------------------------------------------------------------- expert choice


@pytest.mark.parametrize(("capacity", "expected_c"), [(3, 3), (0.25, 2), (20, 8)])
def test_expert_choice_capacity_count_or_fraction(capacity, expected_c):
    torch.manual_seed(6)
    router = pm.ExpertChoiceRouter(DIM, EXPERTS, capacity=capacity, init_std=1.0)
    assert router.capacity(8) == expected_c
    moe = pm.MoELayer(DIM, router, make_experts("mlp")).double()
    x = torch.randn(2, 8, DIM, dtype=torch.float64, requires_grad=True)
    params = list(moe.parameters())
    y, g = run_and_grad(moe, x, params)
    fns = expert_fns(moe.experts)
    y_ref, g_ref = run_and_grad(
        lambda inp: naive_expert_choice(inp, router.gate.weight, fns, expected_c), x, params
    )
    assert_same(y, y_ref, g, g_ref)
    assert moe.stats.tokens_per_expert.tolist() == [2 * expected_c] * EXPERTS
    assert int(moe.stats.requested_slots) == 2 * expected_c * EXPERTS
    torch.testing.assert_close(moe.stats.utilisation, torch.ones(EXPERTS))


def test_expert_choice_capacity_with_padding_stats():
    torch.manual_seed(7)
    router = pm.ExpertChoiceRouter(DIM, EXPERTS, capacity=4, init_std=1.0)
    moe = pm.MoELayer(DIM, router, make_experts("mlp"))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    moe(torch.randn(2, 6, DIM), mask)
    # sequence 0 has 3 real tokens: each expert keeps 3 there, and 4 in sequence 1
    assert moe.stats.tokens_per_expert.tolist() == [7] * EXPERTS
    assert int(moe.stats.requested_slots) == 7 * EXPERTS


def test_expert_choice_capacity_arguments():
    with pytest.raises(ValueError, match="not both"):
        pm.ExpertChoiceRouter(DIM, EXPERTS, 2.0, capacity=3)
    with pytest.raises(ValueError, match="fraction"):
        pm.ExpertChoiceRouter(DIM, EXPERTS, capacity=1.5)
    with pytest.raises(TypeError, match="capacity"):
        pm.ExpertChoiceRouter(DIM, EXPERTS, capacity="3")
    router = pm.ExpertChoiceRouter(DIM, EXPERTS, capacity=3)
    pm.MoELayer(DIM, router, make_experts("mlp"), capacity_factor=2.0)
    assert router.capacity(8) == 4  # the layer's factor replaces the count


# --------------------------------------------------------------------------- hash, uniform


def test_hash_router_matches_naive_table_lookup():
    torch.manual_seed(8)
    vocab = 50
    router = pm.HashRouter(DIM, EXPERTS, vocab, seed=3)
    assert torch.equal(router.hash_table, pm.HashRouter(DIM, EXPERTS, vocab, seed=3).hash_table)
    assert "hash_table" in router.state_dict() and not list(router.parameters())
    moe = pm.MoELayer(DIM, router, make_experts("swiglu")).double()
    x = torch.randn(2, 7, DIM, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(vocab, (2, 7))
    params = list(moe.parameters())
    y, g = run_and_grad(lambda inp: moe(inp, token_ids=ids), x, params)
    fns = expert_fns(moe.experts)
    table = router.hash_table.tolist()

    def reference(inp):
        rows = [
            fns[table[int(v)]](row)
            for v, row in zip(ids.reshape(-1), inp.reshape(-1, DIM), strict=True)
        ]
        return torch.stack(rows).reshape(inp.shape)

    y_ref, g_ref = run_and_grad(reference, x, params)
    assert_same(y, y_ref, g, g_ref)
    assert int(moe.stats.tokens_per_expert.sum()) == 14
    assert float(moe.stats.router_entropy) == 0.0 and float(moe.stats.top1_confidence) == 1.0
    with pytest.raises(ValueError, match="token_ids"):
        moe(x)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        moe(x, token_ids=ids + vocab)
    with pytest.raises(ValueError, match="token_ids: expected shape"):
        moe(x, token_ids=ids[:, :3])


def test_token_ids_ignored_by_other_routers():
    moe = pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS), make_experts("mlp"))
    x = torch.randn(2, 3, DIM)
    torch.testing.assert_close(moe(x, token_ids=torch.zeros(2, 3, dtype=torch.long)), moe(x))


def test_uniform_router_round_robin_is_exactly_balanced():
    router = pm.UniformRouter(DIM, EXPERTS, 2, mode="round_robin")
    moe = pm.MoELayer(DIM, router, make_experts("mlp")).double()
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    y = moe(x)
    assert moe.stats.tokens_per_expert.tolist() == [6] * EXPERTS
    assert float(moe.stats.load_imbalance) == 1.0
    fns = expert_fns(moe.experts)
    rows = [
        0.5 * (fns[(2 * n) % EXPERTS](v) + fns[(2 * n + 1) % EXPERTS](v))
        for n, v in enumerate(x.reshape(-1, DIM))
    ]
    torch.testing.assert_close(y, torch.stack(rows).reshape(x.shape))
    torch.testing.assert_close(moe.stats.router_entropy, torch.tensor(math.log(EXPERTS)))


def test_uniform_router_random_picks_distinct_experts_with_balanced_loads():
    torch.manual_seed(9)
    router = pm.UniformRouter(DIM, 8, 3)
    route = router(torch.randn(4, 500, DIM))
    ids_NK = route.expert_ids.view(-1, 3)
    assert all(len(set(row)) == 3 for row in ids_NK.tolist())
    loads = torch.bincount(route.expert_ids, minlength=8).float()
    # 6000 slots over 8 experts: expected 750 each, std ~ 25
    assert float(loads.max() / loads.mean()) < 1.15
    assert torch.equal(route.weights, torch.full((6000,), 1 / 3))
    assert not torch.equal(router(torch.randn(4, 500, DIM)).expert_ids, route.expert_ids)


# --------------------------------------------------------------------------- shared experts


# --------------------------------------------------------------------------- Soft MoE


# --------------------------------------------------------------------------- telemetry


def test_topk_schemes_are_read_only_and_validated_together():
    router = pm.TopKRouter(DIM, 8, 2, num_groups=4, topk_groups=2)
    assert router.schemes.num_groups == 4 and router.topk_groups == 2
    assert router.schemes.group_limited and router.group_score == "max"
    with pytest.raises(AttributeError, match="topk_groups: a TopKRouter's routing schemes"):
        router.topk_groups = 4
    assert router.topk_groups == 2  # unchanged, not shadowed
    assert isinstance(pm.TopKRouter.num_groups, object)  # class access does not crash
    copy = pickle.loads(pickle.dumps(router))
    assert copy.schemes == router.schemes


def test_capacities_are_exact_integers_over_a_grid():
    """ceil(cf * tokens * k / E) read as the decimals written, for token choice (with and
    without padding) and expert choice: 2.2 * 45 / 3 is 33, not the float formula's 34."""
    from fractions import Fraction

    from pytorch_mixtures.routing.capacity import expert_choice_capacity, token_choice_keep

    assert math.ceil(2.2 * 45 / 3) == 34  # the float formula is off here
    for cf in (0.1, 0.3, 0.7, 1.0, 1.1, 1.25, 2.2, 2.5, 3.3):
        for tokens in (1, 7, 10, 45, 64, 99):
            for top_k, experts in ((1, 3), (2, 4), (3, 6), (2, 8)):
                want = math.ceil(Fraction(str(cf)) * tokens * top_k / experts)
                ids = torch.zeros(tokens, top_k, dtype=torch.long)
                _, got = token_choice_keep(ids, None, cf, experts)
                assert got == want, (cf, tokens, top_k, experts)
                mask = torch.ones(tokens + 3, dtype=torch.bool)
                mask[-3:] = False
                padded_ids = torch.zeros(tokens + 3, top_k, dtype=torch.long)
                _, got_masked = token_choice_keep(padded_ids, mask, cf, experts)
                assert int(got_masked) == want, (cf, tokens, "masked")
            want_ec = min(math.ceil(Fraction(str(cf)) * tokens / 3), tokens)
            assert expert_choice_capacity(tokens, 3, cf, None) == want_ec
            assert pm.ExpertChoiceRouter(DIM, 3, cf).capacity(tokens) == want_ec
    assert pm.TopKRouter(DIM, 3, 1, capacity_factor=2.2)(torch.randn(45, DIM)).capacity == 33


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_normalized_top1_warns_because_every_weight_is_one(score_func):
    with pytest.warns(UserWarning, match="every weight is 1"):
        router = pm.TopKRouter(8, 4, top_k=1, score_func=score_func, normalize_weights=True)
    out = router(torch.randn(3, 5, 8))
    torch.testing.assert_close(out.weights, torch.ones_like(out.weights))


# --------------------------------------------------------------------------- drop policies

DROP_CASES = [
    # top_k, score_func, normalize, capacity_factor, experts, masked
    (1, "softmax", False, 0.5, "mlp", False),
    (2, "softmax", True, 0.75, "swiglu", True),
    (2, "sigmoid", False, 0.6, "list", False),
    (3, "sigmoid", True, 0.5, "mlp", True),
]


@pytest.mark.parametrize(("top_k", "score_func", "normalize", "cf", "kind", "masked"), DROP_CASES)
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_drop_policies_match_naive_reference(
    top_k, score_func, normalize, cf, kind, masked, policy
):
    """Both drop policies against a per-token reference, forward and backward, batch > 1,
    with padding: the same dropped slots, outputs and gradients, and the drops counted."""
    from reference.frontier import naive_frontier_moe

    torch.manual_seed(top_k * 5 + masked)
    router = pm.TopKRouter(
        DIM, EXPERTS, top_k, capacity_factor=cf, score_func=score_func,
        normalize_weights=normalize, init_std=1.5, drop_policy=policy,
    )  # fmt: skip
    moe = pm.MoELayer(DIM, router, make_experts(kind)).double()
    x = torch.randn(3, 7, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 7) > 0.25 if masked else None
    params = list(moe.parameters())
    fns = expert_fns(moe.experts if kind != "list" else moe.experts.experts)
    flat_mask = None if mask is None else mask.reshape(-1).tolist()

    y, g = run_and_grad(lambda inp: moe(inp, attention_mask=mask), x, params)

    def reference(inp):
        out, _, _ = naive_frontier_moe(
            inp.reshape(-1, DIM), router.gate.weight, fns, top_k, score_func=score_func,
            normalize=normalize, capacity_factor=cf, drop_policy=policy, token_mask=flat_mask,
        )  # fmt: skip
        return out.reshape(inp.shape)

    y_ref, g_ref = run_and_grad(reference, x, params)
    assert_same(y, y_ref, g, g_ref)
    _, dropped, _ = naive_frontier_moe(
        x.detach().reshape(-1, DIM), router.gate.weight.detach(), fns, top_k,
        score_func=score_func, normalize=normalize, capacity_factor=cf, drop_policy=policy,
        token_mask=flat_mask,
    )  # fmt: skip
    route = router(x.detach(), mask)
    real_S = torch.ones_like(route.kept) if mask is None else mask.reshape(-1)[route.token_ids]
    got = {(s // top_k, s % top_k) for s in (real_S & ~route.kept).nonzero().flatten().tolist()}
    assert dropped and got == dropped
    moe(x.detach(), attention_mask=mask)
    assert int(moe.stats.dropped_slots) == len(dropped)  # dropped slots stay counted


def test_probs_policy_keeps_each_experts_highest_weights():
    """With "probs" every kept slot of an expert outweighs every dropped one of it; with
    "position" that fails for some expert on the same input (the policies differ)."""
    torch.manual_seed(3)
    x = torch.randn(4, 16, DIM)
    outcome = {}
    for policy in ("position", "probs"):
        torch.manual_seed(0)
        router = pm.TopKRouter(DIM, EXPERTS, 2, capacity_factor=0.5, init_std=2.0,
                               drop_policy=policy)  # fmt: skip
        route = router(x)
        ordered = True
        for e in range(EXPERTS):
            mine = route.expert_ids == e
            kept, dropped = route.weights[mine & route.kept], route.weights[mine & ~route.kept]
            if kept.numel() and dropped.numel() and kept.min() < dropped.max():
                ordered = False
        outcome[policy] = ordered
        assert int((~route.kept).sum()) > 0
    assert outcome == {"position": False, "probs": True}


def test_drop_policy_is_validated_and_settable():
    router = pm.TopKRouter(DIM, EXPERTS, 2, capacity_factor=1.0)
    assert router.drop_policy == "position"
    router.drop_policy = "probs"
    assert "drop_policy='probs'" in repr(router)
    with pytest.raises(ValueError, match="drop_policy: expected one of 'position', 'probs'"):
        router.drop_policy = "random"
    # expert choice keeps each expert's highest scores by construction
    assert pm.ExpertChoiceRouter(DIM, EXPERTS, drop_policy="probs").drop_policy == "probs"
    with pytest.raises(ValueError, match="drop_policy: expected 'probs' for ExpertChoiceRouter"):
        pm.ExpertChoiceRouter(DIM, EXPERTS, drop_policy="position")
    # dropless: the policy changes nothing
    torch.manual_seed(1)
    x = torch.randn(2, 5, DIM)
    a = pm.TopKRouter(DIM, EXPERTS, 2, drop_policy="probs")
    b = pm.TopKRouter(DIM, EXPERTS, 2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x).weights, b(x).weights) and bool(a(x).kept.all())


def test_bias_update_rate_moves_the_bias_after_every_training_forward():
    """bias_update_rate applies update_expert_bias's rule from each training forward's own
    loads (a hand computation), never in eval, and needs expert_bias."""
    torch.manual_seed(0)
    router = pm.TopKRouter(DIM, 4, 2, expert_bias=True, bias_update_rate=0.1, init_std=1.0)
    x = torch.randn(3, 5, DIM)
    for _ in range(3):
        before = router.expert_bias.clone()
        out = router(x)
        loads = torch.bincount(out.expert_ids, minlength=4).float()
        assert torch.equal(router.expert_bias, before + 0.1 * torch.sign(loads.mean() - loads))
    assert router.pending_loads is None  # consumed by the update
    router.eval()
    before = router.expert_bias.clone()
    router(x)
    assert torch.equal(router.expert_bias, before)
    with pytest.raises(ValueError, match="bias_update_rate"):
        pm.TopKRouter(DIM, 4, 2, bias_update_rate=0.1)
