"""Property-based tests (hypothesis) over shapes, dtypes, top_k, capacities and routers.

Properties (each checked on every drawn example):

1. output shape and dtype equal the input's, and the output is finite;
2. dropless top-k keeps every real slot, and each token's kept weights sum to 1 when
   renormalised (to 1 exactly with ``normalize_weights``; to the token's top-k score mass
   without);
3. nothing is lost silently: kept + dropped slots = real tokens x top_k, per-expert loads equal
   the kept slots' expert histogram and never exceed the capacity, and the unrouted count is
   the number of real tokens with no kept slot;
4. with identical experts the layer equals that expert applied to every token, times the
   token's kept weight (exactly the expert's output for dropless normalised top-k);
5. 0-token and 1-token inputs work: finite aux losses, and backward runs;
6. whatever the input (any rank, size, dtype, mask), a layer either returns a correctly shaped
   output or raises ValueError/TypeError: no other exception type escapes.

The profile keeps examples few and derandomised (same examples every run). To cover a new
router, add a branch to :func:`routers`.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from reference.moe import expert_fns

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROFILE = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}


@st.composite
def routers(draw: st.DrawFn, dim: int, num_experts: int) -> pm.Router:
    """Any library router over ``num_experts`` experts, with its options drawn."""
    kind = draw(st.sampled_from(["topk", "topk", "expert_choice", "uniform"]))
    init_std = draw(st.sampled_from([0.02, 1.0]))
    capacity = draw(st.none() | st.floats(0.25, 3.0))
    if kind == "expert_choice":
        return pm.ExpertChoiceRouter(dim, num_experts, capacity or 1.0, init_std=init_std)
    top_k = draw(st.integers(1, num_experts))
    if kind == "uniform":
        mode = draw(st.sampled_from(["random", "round_robin"]))
        return pm.UniformRouter(dim, num_experts, top_k, mode=mode, capacity_factor=capacity)
    groups, topk_groups = 1, None
    if num_experts % 2 == 0 and draw(st.booleans()):  # DeepSeek-V3 group-limited routing
        groups, topk_groups = 2, draw(st.integers(1, 2))
        top_k = min(top_k, topk_groups * num_experts // 2)
    router = pm.TopKRouter(
        dim,
        num_experts,
        top_k,
        capacity_factor=capacity,
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        normalize_weights=draw(st.booleans()),
        init_std=init_std,
        expert_bias=draw(st.booleans()),
        num_groups=groups,
        topk_groups=topk_groups,
    )
    if router.expert_bias is not None:  # a trained-looking bias steers selection, not weights
        with torch.no_grad():
            router.expert_bias.copy_(torch.randn(num_experts) * 0.05)
    return router


def make_experts(kind: str, num_experts: int, dim: int) -> nn.Module | list[nn.Module]:
    if kind == "mlp":
        return pm.MLPExperts(num_experts, dim, 2 * dim)
    if kind == "swiglu":
        return pm.SwiGLUExperts(num_experts, dim, 2 * dim)
    return [
        nn.Sequential(nn.Linear(dim, 2 * dim), nn.Tanh(), nn.Linear(2 * dim, dim))
        for _ in range(num_experts)
    ]


@st.composite
def cases(draw: st.DrawFn, max_tokens: int = 24):
    """(layer, x, mask): a MoE layer of a drawn dtype and an input batch with optional padding."""
    dim = draw(st.sampled_from([4, 8]))
    num_experts = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # top_k=1 with normalised weights warns, by design
        router = draw(routers(dim, num_experts))
    kind = draw(st.sampled_from(["mlp", "swiglu", "list"]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = pm.MoELayer(dim, router, make_experts(kind, num_experts, dim)).to(dtype)
    batch = draw(st.integers(0, 3))
    seq = draw(st.integers(0, max_tokens // max(batch, 1)))
    x = torch.randn(batch, seq, dim, dtype=dtype) * draw(st.sampled_from([1.0, 10.0]))
    mask = None
    if draw(st.booleans()) and batch * seq:
        mask = torch.rand(batch, seq) < 0.7
    return layer, x, mask


@PROFILE
@given(cases())
def test_shape_dtype_finite_and_slot_accounting(case):
    layer, x, mask = case
    y = layer(x, attention_mask=mask)
    assert y.shape == x.shape and y.dtype == x.dtype  # property 1
    assert bool(torch.isfinite(y).all())
    stats = layer.stats
    assert stats is not None
    real = x.shape[0] * x.shape[1] if mask is None else int(mask.sum())
    assert int(stats.num_tokens) == real
    assert int(stats.nonfinite_tokens) == 0
    if x.numel() == 0:
        assert int(stats.tokens_per_expert.sum()) == 0
        return
    torch.manual_seed(0)
    layer(x, attention_mask=mask)  # the same random draws (uniform router) as the route below
    stats = layer.stats
    assert stats is not None
    torch.manual_seed(0)
    route = layer.router(x, mask)
    kept = int(stats.tokens_per_expert.sum())
    k = route.slots_per_token
    if k is not None:  # property 3
        assert int(stats.requested_slots) == real * k
        assert kept + int(stats.dropped_slots) == real * k
        if route.capacity is not None:
            assert int(stats.tokens_per_expert.max()) <= int(route.capacity)
    else:
        assert int(stats.dropped_slots) == 0 and kept == int(stats.requested_slots)
    hist = torch.bincount(route.expert_ids[route.kept], minlength=layer.num_experts)
    assert torch.equal(stats.tokens_per_expert, hist)
    kept_per_token = torch.zeros(route.num_tokens, dtype=torch.long)
    kept_per_token.index_add_(0, route.token_ids, route.kept.long())
    real_N = torch.ones_like(kept_per_token, dtype=torch.bool) if mask is None else mask.flatten()
    assert int(stats.unrouted_tokens) == int((real_N & (kept_per_token == 0)).sum())
    assert bool(torch.isfinite(layer.aux_loss)) and layer.aux_loss.dtype == torch.float32


@PROFILE
@given(cases())
def test_dropless_topk_conserves_routing_mass(case):
    layer, x, mask = case
    router = layer.router
    if not isinstance(router, pm.TopKRouter) or x.numel() == 0:
        return
    router.capacity_factor = None
    route = router(x, mask)
    real_S = torch.ones_like(route.kept) if mask is None else mask.flatten()[route.token_ids]
    assert torch.equal(route.kept, real_S)  # every real slot kept, padding never
    k = router.top_k
    weights_NK = route.weights.view(-1, k)
    kept_mass_N = (weights_NK * route.kept.view(-1, k)).sum(-1)
    renormalised_N = kept_mass_N / weights_NK.sum(-1).clamp_min(1e-30)
    real_N = real_S.view(-1, k)[:, 0]
    ones = torch.ones_like(renormalised_N[real_N])
    torch.testing.assert_close(renormalised_N[real_N], ones)
    chosen_mass_N = route.probs.gather(-1, route.expert_ids.view(-1, k)).sum(-1)
    if router.normalize_weights:
        torch.testing.assert_close(weights_NK.sum(-1), torch.ones_like(chosen_mass_N))
    else:  # the chosen experts' own scores (a bias steers the choice, not the weight)
        torch.testing.assert_close(weights_NK.sum(-1), chosen_mass_N)
        if router.score_func == "softmax":
            assert bool((chosen_mass_N <= 1 + 1e-6).all())


def share_expert_weights(experts: nn.Module) -> None:
    """Make every expert equal to expert 0."""
    with torch.no_grad():
        if isinstance(experts, pm.ModuleListExperts):
            for module in experts.experts[1:]:
                module.load_state_dict(experts.experts[0].state_dict())
        else:
            for param in experts.parameters():
                param.copy_(param[:1].expand_as(param))


@PROFILE
@given(cases())
def test_identical_experts_equal_one_expert_times_kept_weight(case):
    layer, x, mask = case
    share_expert_weights(layer.experts)
    x_ND = x.reshape(-1, x.shape[-1])
    torch.manual_seed(0)
    y = layer(x, attention_mask=mask).reshape(x_ND.shape)
    torch.manual_seed(0)
    route = layer.router(x, mask)
    with torch.no_grad():
        # expert 0 from its parameters, row by row (the list experts' modules take [1, D])
        expert0_fn = expert_fns(layer.experts)[0]
        expert0 = torch.stack([expert0_fn(row) for row in x_ND]) if x_ND.shape[0] else x_ND
    kept_weight_N = torch.zeros(x_ND.shape[0], dtype=route.weights.dtype)
    kept_weight_N.index_add_(0, route.token_ids, route.weights * route.kept)
    expected = (expert0.to(kept_weight_N.dtype) * kept_weight_N.unsqueeze(-1)).to(x.dtype)
    tol = TOL[x.dtype] * (1 + float(expert0.abs().max()) if x_ND.numel() else 1)
    torch.testing.assert_close(y, expected, rtol=TOL[x.dtype], atol=tol)
    router = layer.router
    if (
        isinstance(router, pm.TopKRouter)
        and router.capacity_factor is None
        and router.normalize_weights
        and mask is None
    ):
        torch.testing.assert_close(y, expert0, rtol=TOL[x.dtype], atol=tol)


@PROFILE
@given(cases(max_tokens=1), st.booleans())
def test_zero_and_one_token_inputs(case, training):
    layer, x, _ = case
    layer.train(training)
    x = x.reshape(-1, x.shape[-1])[:1].clone().requires_grad_(True)  # 0 or 1 token
    route = layer.router(x)
    assert route.num_tokens == x.shape[0]
    for value in route.aux_losses.values():
        assert bool(torch.isfinite(value))
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y.float().sum() + layer.aux_loss).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
any_dtype = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool])


@settings(PROFILE, max_examples=60)
@given(
    shape=shapes,
    last=st.sampled_from([None, 4, 5]),
    dtype=any_dtype,
    mask_shape=st.none() | shapes,
    target=st.sampled_from(["layer", "topk", "expert_choice", "uniform", "soft_moe", "mhsa"]),
)
def test_any_input_is_handled_or_named(shape, last, dtype, mask_shape, target):
    dim = 4
    torch.manual_seed(0)
    module: nn.Module = {
        "layer": lambda: pm.MoELayer(dim, pm.TopKRouter(dim, 3, 2), pm.MLPExperts(3, dim, 8)),
        "topk": lambda: pm.TopKRouter(dim, 3, 2, capacity_factor=1.0),
        "expert_choice": lambda: pm.ExpertChoiceRouter(dim, 3),
        "uniform": lambda: pm.UniformRouter(dim, 3, 2, capacity_factor=1.0),
        "soft_moe": lambda: pm.SoftMoE(dim, 3, 2, pm.MLPExperts(3, dim, 8)),
        "mhsa": lambda: pm.MHSA(dim, 2, causal=True),
    }[target]()
    full = (*shape, last) if last is not None else shape
    x = torch.zeros(full, dtype=dtype) if dtype.is_floating_point else torch.ones(full, dtype=dtype)
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    try:
        out = module(x, mask)
    except (ValueError, TypeError):
        return
    if isinstance(out, torch.Tensor):
        assert out.shape == x.shape and out.dtype == x.dtype
    else:
        assert out.num_tokens == math.prod(x.shape[:-1])
