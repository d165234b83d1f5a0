"""Dispatch against a per-slot loop: the plan sorts kept slots by expert (stable), the combine
is the weighted per-token sum with dropped slots contributing nothing, and run_experts (fused
or not) equals dispatch -> experts -> combine done by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from pytorch_mixtures import dispatch

DIM, EXPERTS = 6, 4


def routed(capacity_factor: float | None, masked: bool, seed: int = 0) -> pm.RouterOutput:
    torch.manual_seed(seed)
    router = pm.TopKRouter(DIM, EXPERTS, 2, capacity_factor=capacity_factor, init_std=1.0)
    x = torch.randn(3, 5, DIM, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]) if masked else None
    return router.double()(x, mask)


CASES = [(None, False), (None, True), (0.5, False), (0.7, True)]


@pytest.mark.parametrize(("capacity_factor", "masked"), CASES)
def test_plan_sorts_kept_slots_by_expert_and_counts_them(capacity_factor, masked):
    route = routed(capacity_factor, masked)
    plan = dispatch.plan_dispatch(route)
    kept = route.kept.tolist()
    experts = route.expert_ids.tolist()
    # the naive order: kept slots by (expert, slot index), then dropped slots by index
    want = sorted(
        range(len(kept)), key=lambda s: (0, experts[s], s) if kept[s] else (1, EXPERTS, s)
    )
    assert plan.order.tolist() == want
    counts = [sum(1 for s in range(len(kept)) if kept[s] and experts[s] == e) for e in range(4)]
    assert plan.tokens_per_expert.tolist() == counts
    assert plan.token_rows.tolist() == [int(route.token_ids[s]) for s in want]
    for row, slot in enumerate(want):
        expected = float(route.weights[slot].detach()) if kept[slot] else 0.0
        assert float(plan.weights[row].detach()) == expected


@pytest.mark.parametrize(("capacity_factor", "masked"), CASES)
def test_combine_is_the_weighted_sum_per_token(capacity_factor, masked):
    route = routed(capacity_factor, masked)
    plan = dispatch.plan_dispatch(route)
    num_kept = int(plan.tokens_per_expert.sum())
    y_sorted = torch.randn(route.token_ids.numel(), DIM, dtype=torch.float64)
    y_sorted[num_kept:] = 0.0  # the experts' contract: padding rows are zero
    y_sorted.requires_grad_(True)
    got = dispatch.combine(y_sorted, plan)
    want = [torch.zeros(DIM, dtype=torch.float64) for _ in range(route.num_tokens)]
    for row, slot in enumerate(plan.order.tolist()):
        if route.kept[slot]:
            token = int(route.token_ids[slot])
            want[token] = want[token] + route.weights[slot] * y_sorted[row]
    want_t = torch.stack(want)
    torch.testing.assert_close(got, want_t)
    probe = torch.randn_like(got)
    (g_got,) = torch.autograd.grad((got * probe).sum(), y_sorted)
    (g_want,) = torch.autograd.grad((want_t * probe).sum(), y_sorted)
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize(("capacity_factor", "masked"), CASES)
@pytest.mark.parametrize("kind", ["swiglu", "list"])
def test_run_experts_equals_dispatch_experts_combine_by_hand(capacity_factor, masked, kind):
    route = routed(capacity_factor, masked)
    torch.manual_seed(1)
    if kind == "swiglu":
        experts: pm.experts.ExpertsBase = pm.SwiGLUExperts(EXPERTS, DIM, 8).double()
    else:
        modules = [nn.Linear(DIM, DIM).double() for _ in range(EXPERTS)]
        experts = pm.ModuleListExperts(modules, DIM)
    x = torch.randn(route.num_tokens, DIM, dtype=torch.float64, requires_grad=True)
    got, plan = dispatch.run_experts(experts, x, route)
    assert plan.fuse_combine == (kind == "swiglu")  # SwiGLU on CPU fuses the combine
    by_hand = dispatch.combine(experts(dispatch.permute(x, plan), plan.tokens_per_expert), plan)
    torch.testing.assert_close(got, by_hand)
    probe = torch.randn_like(got)
    grads = torch.autograd.grad((got * probe).sum(), [x, *experts.parameters()])
    grads_hand = torch.autograd.grad((by_hand * probe).sum(), [x, *experts.parameters()])
    for a, b in zip(grads, grads_hand, strict=True):
        torch.testing.assert_close(a, b)


def test_noop_slots_run_nothing_and_add_zero():
    """Slots routed past the real experts (integrated MoDE's no-op experts) sort last and
    contribute exactly zero."""
    torch.manual_seed(2)
    router = pm.TopKRouter(DIM, EXPERTS + 2, 1, normalize_weights=False, init_std=1.0)
    experts = pm.MLPExperts(EXPERTS, DIM, 8)
    x = torch.randn(12, DIM)
    route = router(x)
    got, plan = dispatch.run_experts(experts, x, route)
    noop = route.expert_ids >= EXPERTS
    assert noop.any() and (~noop).any()
    assert torch.equal(got[noop], torch.zeros(int(noop.sum()), DIM))
    assert int(plan.tokens_per_expert[:EXPERTS].sum()) == int((~noop).sum())


@pytest.mark.parametrize("num_tokens", [1, 3])
@pytest.mark.parametrize("grad", [False, True])
def test_run_chosen_experts_is_the_weighted_sum_of_the_chosen_experts(num_tokens, grad):
    """The decode path's primitive against a per-token loop, with and without autograd (no
    grad takes plain-float weights), no-op ids (>= E) adding nothing."""
    torch.manual_seed(3)
    experts = pm.SwiGLUExperts(EXPERTS, DIM, 8).double()
    x = torch.randn(num_tokens, DIM, dtype=torch.float64)
    ids = torch.tensor([[2, EXPERTS + 1], [0, 3], [3, 1]])[:num_tokens]
    weights = torch.rand(num_tokens, 2, dtype=torch.float64)
    want = torch.zeros(num_tokens, DIM, dtype=torch.float64)
    for n in range(num_tokens):
        for k in range(2):
            if ids[n, k] < EXPERTS:
                rows = torch.zeros(EXPERTS, dtype=torch.long)
                rows[ids[n, k]] = 1
                want[n] += weights[n, k] * experts(x[n : n + 1], rows)[0]
    with torch.set_grad_enabled(grad):
        got = dispatch.run_chosen_experts(experts, x, ids, weights)
    torch.testing.assert_close(got, want.detach())
    assert got.requires_grad == grad
