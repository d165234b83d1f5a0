"""MoELayer against the naive per-token references, forward and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from reference.moe import expert_fns, naive_expert_choice_moe, naive_topk_moe

DIM, EXPERTS, HIDDEN = 6, 4, 10


def make_experts(kind: str, num_experts: int = EXPERTS) -> nn.Module | list[nn.Module]:
    if kind == "mlp":
        return pm.MLPExperts(num_experts, DIM, HIDDEN)
    if kind == "swiglu":
        return pm.SwiGLUExperts(num_experts, DIM, HIDDEN)
    return [
        nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM))
        for _ in range(num_experts)
    ]


def grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]


def run_and_grad(fn, x: torch.Tensor, params: list[torch.Tensor], seed: int = 0):
    """Output of fn(x) and gradients of a random projection of it w.r.t. x and params."""
    for p in [x, *params]:
        p.grad = None
    out = fn(x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * probe).sum().backward()
    return out.detach(), grads([x, *params])


def assert_same(got, want, grads_got, grads_want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


TOPK_CASES = [
    # top_k, score_func, normalize, capacity_factor, experts
    (1, "softmax", False, None, "mlp"),
    (2, "softmax", True, None, "swiglu"),
    (EXPERTS, "softmax", True, None, "mlp"),
    (2, "sigmoid", True, None, "swiglu"),
    (2, "sigmoid", False, None, "list"),
    (2, "softmax", False, None, "list"),
    (1, "softmax", False, 0.5, "mlp"),
    (2, "softmax", True, 0.75, "swiglu"),
    (3, "sigmoid", True, 0.6, "list"),
]


@pytest.mark.parametrize(
    ("top_k", "score_func", "normalize", "capacity_factor", "kind"), TOPK_CASES
)
def test_topk_layer_matches_naive_reference(top_k, score_func, normalize, capacity_factor, kind):
    torch.manual_seed(top_k * 7 + (capacity_factor is not None))
    router = pm.TopKRouter(
        DIM,
        EXPERTS,
        top_k,
        capacity_factor=capacity_factor,
        score_func=score_func,
        normalize_weights=normalize,
        init_std=1.0,  # sharp routing, so drops and choices are exercised
    )
    moe = pm.MoELayer(DIM, router, make_experts(kind)).double()
    x = torch.randn(3, 7, DIM, dtype=torch.float64, requires_grad=True)
    params = list(moe.parameters())

    y, g = run_and_grad(moe, x, params)

    fns = expert_fns(moe.experts if kind != "list" else moe.experts.experts)

    def reference(inp: torch.Tensor) -> torch.Tensor:
        out, _ = naive_topk_moe(
            inp.reshape(-1, DIM),
            router.gate.weight,
            fns,
            top_k,
            score_func=score_func,
            normalize=normalize,
            capacity_factor=capacity_factor,
        )
        return out.reshape(inp.shape)

    y_ref, g_ref = run_and_grad(reference, x, params)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(g, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_capacity_drops_exactly_the_reference_set(top_k):
    torch.manual_seed(11 + top_k)
    router = pm.TopKRouter(DIM, EXPERTS, top_k, capacity_factor=0.5, init_std=2.0)
    moe = pm.MoELayer(router=router, experts=make_experts("mlp")).double()
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    route = router(x)
    _, dropped = naive_topk_moe(
        x.reshape(-1, DIM),
        router.gate.weight,
        expert_fns(moe.experts),
        top_k,
        capacity_factor=0.5,
    )
    got = {(s // top_k, s % top_k) for s in (~route.kept).nonzero().flatten().tolist()}
    assert dropped, "the case must drop something to test dropping"
    assert got == dropped
    moe(x)
    assert moe.stats is not None
    assert int(moe.stats.dropped_slots) == len(dropped)
    assert float(moe.stats.dropped_fraction) == pytest.approx(len(dropped) / (18 * top_k))
    capacity = -(-0.5 * 18 * top_k // EXPERTS)
    assert int(moe.stats.tokens_per_expert.max()) <= capacity
    assert int(moe.stats.tokens_per_expert.sum()) == 18 * top_k - len(dropped)


@pytest.mark.parametrize(
    ("capacity_factor", "kind"), [(1.0, "mlp"), (2.0, "list"), (0.5, "swiglu")]
)
def test_expert_choice_matches_naive_reference(capacity_factor, kind):
    torch.manual_seed(5)
    router = pm.ExpertChoiceRouter(DIM, EXPERTS, capacity_factor, init_std=1.0)
    moe = pm.MoELayer(DIM, router, make_experts(kind)).double()
    x = torch.randn(3, 8, DIM, dtype=torch.float64, requires_grad=True)
    params = list(moe.parameters())
    y, g = run_and_grad(moe, x, params)
    fns = expert_fns(moe.experts if kind != "list" else moe.experts.experts)
    unrouted_box: list[int] = []

    def reference(inp: torch.Tensor) -> torch.Tensor:
        out, unrouted = naive_expert_choice_moe(inp, router.gate.weight, fns, capacity_factor)
        unrouted_box.append(unrouted)
        return out

    y_ref, g_ref = run_and_grad(reference, x, params)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(g, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert moe.stats is not None
    assert int(moe.stats.unrouted_tokens) == unrouted_box[0]
    capacity = router.capacity(8)
    assert moe.stats.tokens_per_expert.tolist() == [3 * capacity] * EXPERTS
    if capacity_factor < 1:
        assert unrouted_box[0] > 0, "capacity 0.5 must leave tokens unrouted"
        assert float(moe.stats.dropped_fraction) == pytest.approx(unrouted_box[0] / 24)


def test_expert_choice_routes_within_each_sequence():
    """Batching sequences together must not change any sequence's routing."""
    torch.manual_seed(0)
    moe = pm.MoELayer(router=pm.ExpertChoiceRouter(DIM, EXPERTS), experts=make_experts("mlp"))
    x = torch.randn(4, 8, DIM)
    together = moe(x)
    alone = torch.cat([moe(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_stacked_and_module_list_experts_agree(kind):
    torch.manual_seed(3)
    stacked = make_experts(kind)
    assert isinstance(stacked, (pm.MLPExperts, pm.SwiGLUExperts))
    modules: list[nn.Module] = []
    for e in range(EXPERTS):
        if isinstance(stacked, pm.MLPExperts):
            up, down = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
            with torch.no_grad():
                up.weight.copy_(stacked.w_in[e].T)
                up.bias.copy_(stacked.b_in[e])
                down.weight.copy_(stacked.w_out[e].T)
                down.bias.copy_(stacked.b_out[e])
            modules.append(nn.Sequential(up, nn.GELU(), down))
        else:
            modules.append(SwiGLU(stacked.w_gate_up[e], stacked.w_down[e]))
    router = pm.TopKRouter(DIM, EXPERTS, 2)
    router_copy = pm.TopKRouter(DIM, EXPERTS, 2)
    router_copy.load_state_dict(router.state_dict())
    a = pm.MoELayer(DIM, router, stacked)
    b = pm.MoELayer(DIM, router_copy, modules)
    x = torch.randn(2, 5, DIM, requires_grad=True)
    ya, ga = run_and_grad(a, x, [router.gate.weight])
    yb, gb = run_and_grad(b, x, [router_copy.gate.weight])
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    for got, want in zip(ga, gb, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class SwiGLU(nn.Module):
    def __init__(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
        super().__init__()
        hidden = w_down.shape[0]
        self.gate = nn.Linear(DIM, hidden, bias=False)
        self.up = nn.Linear(DIM, hidden, bias=False)
        self.down = nn.Linear(hidden, DIM, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(w_gate_up[:, :hidden].T)
            self.up.weight.copy_(w_gate_up[:, hidden:].T)
            self.down.weight.copy_(w_down.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def test_input_shapes_and_dtype_preserved():
    moe = pm.MoELayer(router=pm.TopKRouter(DIM, EXPERTS), experts=make_experts("swiglu"))
    for shape in [(DIM,), (5, DIM), (2, 5, DIM), (2, 3, 4, DIM)]:
        x = torch.randn(shape)
        assert moe(x).shape == x.shape
    flat = torch.randn(12, DIM)
    torch.testing.assert_close(moe(flat.view(2, 2, 3, DIM)).reshape(12, DIM), moe(flat))


def test_empty_batch_returns_empty_output():
    moe = pm.MoELayer(router=pm.TopKRouter(DIM, EXPERTS), experts=make_experts("mlp"))
    x = torch.randn(0, 5, DIM, requires_grad=True)
    y = moe(x)
    assert y.shape == (0, 5, DIM)
    y.sum().backward()
    assert moe.stats is not None and int(moe.stats.num_tokens) == 0
    assert float(moe.aux_loss) == 0.0


def test_padding_is_not_routed_and_does_not_change_real_tokens():
    torch.manual_seed(1)
    router = pm.TopKRouter(DIM, EXPERTS, 2, capacity_factor=None)
    moe = pm.MoELayer(DIM, router, make_experts("mlp"))
    x = torch.randn(2, 6, DIM)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    y = moe(x, attention_mask=mask)
    assert moe.stats is not None
    assert int(moe.stats.num_tokens) == 10
    assert int(moe.stats.tokens_per_expert.sum()) == 20
    masked_losses = dict(moe.aux_losses)
    assert torch.equal(y[0, 4:], torch.zeros(2, DIM))
    torch.testing.assert_close(y[0, :4], moe(x[0:1, :4])[0])
    # padded tokens must not reach the losses: equal to the losses of the real tokens alone
    real_logits = router.gate(torch.cat([x[0, :4], x[1]])).detach()
    torch.testing.assert_close(
        masked_losses["router_z"], pm.losses.router_z_loss(real_logits), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        masked_losses["load_balancing"],
        pm.losses.load_balancing_loss(real_logits, EXPERTS, 2),
        rtol=1e-6,
        atol=0,
    )


def test_capacity_with_padding_counts_only_real_tokens():
    torch.manual_seed(2)
    router = pm.TopKRouter(DIM, EXPERTS, 1, capacity_factor=1.0, normalize_weights=False)
    moe = pm.MoELayer(DIM, router, make_experts("mlp")).double()
    x = torch.randn(1, 8, DIM, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    y = moe(x, attention_mask=mask)
    ref, dropped = naive_topk_moe(
        x[0],
        router.gate.weight,
        expert_fns(moe.experts),
        1,
        normalize=False,
        capacity_factor=1.0,
        token_mask=mask[0].tolist(),
    )
    torch.testing.assert_close(y[0], ref)
    assert moe.stats is not None
    assert int(moe.stats.dropped_slots) == len(dropped)
    assert int(moe.stats.requested_slots) == 5


def test_layer_capacity_factor_overrides_router():
    router = pm.TopKRouter(DIM, EXPERTS, 2, capacity_factor=None)
    pm.MoELayer(DIM, router, make_experts("mlp"), 1.25)
    assert router.capacity_factor == 1.25
    ec = pm.ExpertChoiceRouter(DIM, EXPERTS, capacity_factor=1.0)
    pm.MoELayer(DIM, ec, make_experts("mlp"), capacity_factor=2.0)
    assert ec.capacity(8) == 4


def test_aux_loss_reaches_the_router_only():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(DIM, DIM),
        pm.MoELayer(router=pm.TopKRouter(DIM, EXPERTS, 2), experts=make_experts("swiglu")),
    )
    assert float(pm.aux_loss(model)) == 0.0  # before any forward
    model(torch.randn(3, 4, DIM))
    total = pm.aux_loss(model)
    moe = model[1]
    assert total.dim() == 0 and total.requires_grad
    expected = 0.01 * moe.aux_losses["load_balancing"] + 0.001 * moe.aux_losses["router_z"]
    torch.testing.assert_close(total, expected)
    total.backward()
    assert moe.router.gate.weight.grad is not None
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in moe.experts.parameters())


def test_aux_loss_sums_over_layers():
    layers = [
        pm.MoELayer(router=pm.TopKRouter(DIM, EXPERTS, 2), experts=make_experts("mlp"))
        for _ in range(3)
    ]
    model = nn.Sequential(*layers)
    model(torch.randn(2, 3, DIM))
    torch.testing.assert_close(pm.aux_loss(model), sum(m.aux_loss for m in layers))


def test_router_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    router = pm.TopKRouter(DIM, EXPERTS, 2)
    moe = pm.MoELayer(DIM, router, make_experts("swiglu"))
    x = torch.randn(2, 5, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        route = router(x)
        y = moe(x.bfloat16())
    assert route.logits.dtype == torch.float32
    assert route.weights.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(route.logits, router(x).logits)


def test_deterministic_across_runs():
    def once() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(123)
        moe = pm.MoELayer(
            router=pm.ExpertChoiceRouter(DIM, EXPERTS, 2.0), experts=make_experts("mlp")
        )
        x = torch.randn(4, 16, DIM, requires_grad=True)
        moe(x).square().sum().backward()
        assert x.grad is not None
        return moe(x).detach(), x.grad

    (y1, g1), (y2, g2) = once(), once()
    assert torch.equal(y1, y2) and torch.equal(g1, g2)


def test_jitter_noise_only_in_training():
    torch.manual_seed(0)
    router = pm.TopKRouter(DIM, EXPERTS, 2, jitter_noise=0.5)
    x = torch.randn(4, DIM)
    router.eval()
    torch.testing.assert_close(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_router_init_is_small():
    router = pm.TopKRouter(512, 8)
    assert float(router.gate.weight.detach().std()) < 0.05


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_exactly_added(gated):
    torch.manual_seed(10)
    shared = nn.Sequential(nn.Linear(DIM, 12), nn.GELU(), nn.Linear(12, DIM))
    router = pm.TopKRouter(DIM, EXPERTS, 2)
    experts = make_experts("swiglu")
    moe = pm.MoELayer(DIM, router, experts, shared_experts=shared, shared_expert_gate=gated)
    plain = pm.MoELayer(DIM, router, experts)
    moe, plain = moe.double(), plain.double()
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    params = list(moe.parameters())
    y, g = run_and_grad(lambda inp: moe(inp, mask), x, params)

    def reference(inp):
        out = shared(inp)
        if gated:
            out = torch.sigmoid(inp @ moe.shared_expert_gate.weight.T) * out
        return plain(inp, mask) + out * mask.unsqueeze(-1)

    y_ref, g_ref = run_and_grad(reference, x, params)
    assert_same(y, y_ref, g, g_ref)
    assert (moe.shared_expert_gate is not None) == gated
    with pytest.raises(ValueError, match="shared_expert_gate"):
        pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS), make_experts("mlp"), shared_expert_gate=True)


# --------------------------------------------------------------------------- decode path

DECODE_CASES = [
    # top_k, router options, experts, tokens (B, T), masked
    (2, {}, "swiglu", (1, 1), False),
    (2, {}, "swiglu", (3, 2), True),
    (1, {"normalize_weights": False}, "mlp", (4, 1), False),
    (2, {"score_func": "sigmoid"}, "list", (2, 3), False),
    (3, {"routed_scaling_factor": 2.5}, "swiglu", (2, 1), True),
    (2, {"noisy_gating": True}, "swiglu", (2, 2), True),
    (2, {"score_func": "sigmoid", "expert_bias": True, "num_groups": 2, "topk_groups": 1}, "mlp",
     (2, 2), False),
]  # fmt: skip


@pytest.mark.parametrize(("top_k", "options", "kind", "shape", "masked"), DECODE_CASES)
def test_decode_path_matches_naive_reference_and_full_path(top_k, options, kind, shape, masked):
    """Eval calls of few tokens take the decode path (no plan): output and every gradient equal
    the naive per-token reference and the full path; aux losses and stats, read afterwards,
    are the full path's."""
    torch.manual_seed(top_k + len(options))
    router = pm.TopKRouter(DIM, EXPERTS, top_k, init_std=1.0, **options)
    if router.expert_bias is not None:
        router.expert_bias.copy_(torch.randn(EXPERTS) * 0.3)
    moe = pm.MoELayer(DIM, router, make_experts(kind)).double().eval()
    x = torch.randn(*shape, DIM, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(shape, dtype=torch.bool)
        mask[0, 0] = False
    params = list(moe.parameters())
    decode_slots = []
    original = pm.dispatch.run_chosen_experts

    def spy(*args):
        decode_slots.append(args[2].numel())
        return original(*args)

    pm.dispatch.run_chosen_experts = spy
    try:
        y, g = run_and_grad(lambda t: moe(t, attention_mask=mask), x, params)
    finally:
        pm.dispatch.run_chosen_experts = original
    assert decode_slots == [shape[0] * shape[1] * top_k]  # the decode path ran
    fast_aux, fast_stats, fast_losses = moe.aux_loss.detach(), moe.stats, moe.aux_losses

    moe.decode_max_slots = 0  # the full path on the same input
    y_full, g_full = run_and_grad(lambda t: moe(t, attention_mask=mask), x, params)
    assert_same(y, y_full, g, g_full)
    torch.testing.assert_close(fast_aux, moe.aux_loss.detach())
    assert fast_losses.keys() == moe.aux_losses.keys()
    assert torch.equal(fast_stats.tokens_per_expert, moe.stats.tokens_per_expert)
    assert torch.equal(fast_stats.num_tokens, moe.stats.num_tokens)

    if router.expert_bias is None and router.routed_scaling_factor == 1.0:
        fns = expert_fns(moe.experts if kind != "list" else moe.experts.experts)
        flat_mask = None if mask is None else mask.reshape(-1).tolist()
        want, _ = naive_topk_moe(
            x.detach().reshape(-1, DIM), router.gate.weight.detach(), fns, top_k,
            score_func=router.score_func, normalize=router.normalize_weights,
            token_mask=flat_mask,
        )  # fmt: skip
        torch.testing.assert_close(y.reshape(-1, DIM), want, rtol=1e-10, atol=1e-10)


def test_decode_path_is_skipped_where_it_cannot_apply():
    """Training, a capacity, hooks on the experts, expert-choice routing and large calls all
    take the full path."""
    torch.manual_seed(0)
    calls = []
    original = pm.dispatch.run_chosen_experts

    def spy(*args):
        calls.append(1)
        return original(*args)

    x = torch.randn(1, 2, DIM)
    layers = {
        "training": pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS), make_experts("swiglu")),
        "capacity": pm.MoELayer(
            DIM, pm.TopKRouter(DIM, EXPERTS, capacity_factor=1.0), make_experts("swiglu")
        ).eval(),
        "expert choice": pm.MoELayer(
            DIM, pm.ExpertChoiceRouter(DIM, EXPERTS), make_experts("swiglu")
        ).eval(),
        "too many slots": pm.MoELayer(
            DIM, pm.TopKRouter(DIM, EXPERTS), make_experts("swiglu"), decode_max_slots=3
        ).eval(),
    }
    hooked = pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS), make_experts("swiglu")).eval()
    hooked.experts.register_forward_hook(lambda module, args, out: None)
    layers["hooked experts"] = hooked
    pm.dispatch.run_chosen_experts = spy
    try:
        for name, layer in layers.items():
            with torch.no_grad():
                layer(x)
            assert calls == [], name
        plain = pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS), make_experts("swiglu")).eval()
        with torch.no_grad():
            plain(x)
        assert calls == [1]  # and the spy does see a decode-path call
    finally:
        pm.dispatch.run_chosen_experts = original


@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 9])  # N * K <= E: gathered; beyond: all experts
def test_chosen_forward_matches_one_expert_at_a_time(kind, num_tokens):
    """The compiled decode path's expert call, run eagerly: each (token, chosen id) output and
    every gradient equal a loop calling one expert on one token."""
    torch.manual_seed(num_tokens)
    experts = make_experts(kind).double()
    x = torch.randn(num_tokens, DIM, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, EXPERTS, (num_tokens, 2))
    params = list(experts.parameters())
    got, g_got = run_and_grad(lambda t: experts.chosen_forward(t, ids), x, params)

    def naive(t):
        rows = [
            torch.stack([experts.expert_forward(int(e), t[n : n + 1])[0] for e in ids[n]])
            for n in range(num_tokens)
        ]
        return torch.stack(rows)

    want, g_want = run_and_grad(naive, x, params)
    assert got.shape == (num_tokens, 2, DIM)
    assert_same(got, want, g_got, g_want)


@pytest.mark.parametrize(("shape", "noop"), [((1, 1), 0), ((3, 1), 2), ((2, 3), 0)])
def test_compiled_decode_path_matches_eager(shape, noop):
    """Under torch.compile(fullgraph) an eval call of few tokens takes the static decode path
    (no plan, no host read of the ids): the output equals eager's and the naive reference's,
    and the aux losses and stats read afterwards are the full path's."""
    torch.manual_seed(shape[0] + noop)
    router = pm.TopKRouter(DIM, EXPERTS + noop, 2, init_std=1.0)
    moe = pm.MoELayer(DIM, router, make_experts("swiglu"), num_noop_experts=noop).eval()
    x = torch.randn(*shape, DIM)
    with torch.no_grad():
        want = moe(x)
        eager_aux, eager_counts = moe.aux_loss, moe.stats.tokens_per_expert
        traced = []
        original = moe.experts.chosen_forward

        def spy(*args):
            traced.append(args[1].shape)
            return original(*args)

        moe.experts.chosen_forward = spy
        torch._dynamo.reset()
        got = torch.compile(moe, fullgraph=True)(x)
    assert traced == [(shape[0] * shape[1], 2)]  # the static decode path is what compiled
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe.aux_loss, eager_aux)
    assert torch.equal(moe.stats.tokens_per_expert, eager_counts)
    if noop == 0:
        want_ref, _ = naive_topk_moe(
            x.reshape(-1, DIM), router.gate.weight.detach(), expert_fns(moe.experts), 2
        )
        torch.testing.assert_close(got.reshape(-1, DIM), want_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- pad to capacity (Megatron-Core)


def _rows_seen(moe: pm.MoELayer) -> list[tuple[int, list[int]]]:
    """Spy on the experts' calls: (rows, counts) of each."""
    seen: list[tuple[int, list[int]]] = []

    def spy(module, args, kwargs):
        seen.append((int(args[0].shape[0]), [int(c) for c in args[1]]))

    moe.experts.register_forward_pre_hook(spy, with_kwargs=True)
    return seen


@pytest.mark.parametrize(
    ("router_kind", "kind", "backend", "masked"),
    [
        ("topk", "swiglu", "loop", False),
        ("topk", "mlp", "bmm", True),
        ("topk", "list", None, True),
        ("expert_choice", "mlp", "loop", False),
        ("expert_choice", "swiglu", "bmm", True),
    ],
)
def test_pad_to_capacity_matches_unpadded_and_reference(router_kind, kind, backend, masked):
    """Every real expert gets exactly C rows (padding rows zero), and outputs and gradients
    equal the unpadded layer's and the per-token reference's, with padding and batch > 1."""
    from reference.frontier import naive_frontier_moe

    torch.manual_seed(17)
    if router_kind == "topk":
        router = pm.TopKRouter(DIM, EXPERTS, 2, capacity_factor=0.75, init_std=1.5)
    else:
        router = pm.ExpertChoiceRouter(DIM, EXPERTS, capacity_factor=1.0)
        router.gate.weight.data.normal_()
    experts = make_experts(kind)
    if backend is not None:
        experts.backend = backend
    plain = pm.MoELayer(DIM, router, experts).double()
    padded = pm.MoELayer(DIM, router, plain.experts, pad_to_capacity=True)
    seen = _rows_seen(padded)
    x = torch.randn(3, 8, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 8) > 0.3 if masked else None
    params = list(plain.parameters())

    y, g = run_and_grad(lambda inp: padded(inp, attention_mask=mask), x, params)
    if masked and router_kind == "topk":
        # unpadded, bmm needs a host-known capacity, which a mask hides; padded, the layer
        # reads it (one sync), so bmm runs: compare with the unpadded loop
        plain.experts.backend = "loop"
    y_plain, g_plain = run_and_grad(lambda inp: plain(inp, attention_mask=mask), x, params)
    assert_same(y, y_plain, g, g_plain)
    route = router(x.detach(), mask)
    if router_kind == "topk":
        capacity = int(route.capacity)
        rows = min(capacity, 24)
        fns = expert_fns(plain.experts if kind != "list" else plain.experts.experts)
        flat = None if mask is None else mask.reshape(-1).tolist()
        y_ref, _, _ = naive_frontier_moe(
            x.detach().reshape(-1, DIM), router.gate.weight.detach(), fns, 2,
            capacity_factor=0.75, token_mask=flat,
        )  # fmt: skip
        torch.testing.assert_close(y.reshape(-1, DIM), y_ref, rtol=1e-10, atol=1e-10)
    else:
        rows = 3 * router.capacity(8)
    assert seen[0] == (EXPERTS * rows, [rows] * EXPERTS)  # static [E * C, D] expert input
    # the stats describe the real routing, not the padding
    assert torch.equal(padded.stats.tokens_per_expert, plain.stats.tokens_per_expert)
    assert int(padded.stats.dropped_slots) == int(plain.stats.dropped_slots)


def test_pad_to_capacity_needs_a_capacity():
    with pytest.raises(ValueError, match="pad_to_capacity: True needs a per-expert capacity"):
        pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS), make_experts("mlp"), pad_to_capacity=True)
    # a capacity given to the layer is enough
    moe = pm.MoELayer(
        DIM, pm.TopKRouter(DIM, EXPERTS), make_experts("mlp"), 1.0, pad_to_capacity=True
    )
    moe(torch.randn(2, 3, DIM))
    moe.router.capacity_factor = None  # made dropless afterwards: refused at forward
    with pytest.raises(ValueError, match="pad_to_capacity"):
        moe(torch.randn(2, 3, DIM))


# ----------------------------------------------------------- zero-computation experts (MoE++)

ZC_CASES = [
    # zero_computation_experts, top_k, capacity_factor, masked, experts
    ({"copy": 1}, 2, None, False, "mlp"),
    ({"zero": 1, "copy": 1, "constant": 2}, 2, None, True, "swiglu"),
    ({"constant": 1}, 1, None, False, "list"),
    ({"zero": 2, "copy": 1, "constant": 1}, 3, 0.75, True, "mlp"),
]


@pytest.mark.parametrize(("zc", "top_k", "cf", "masked", "kind"), ZC_CASES)
def test_zero_computation_experts_match_naive_reference(zc, top_k, cf, masked, kind):
    """Zero, copy and constant experts (MoE++) against a per-token reference, forward and
    backward (router, constant experts' gates and vectors, real experts, input), batch > 1,
    with padding and capacity; per-kind kept slots counted in the stats."""
    from reference.frontier import naive_frontier_moe

    torch.manual_seed(top_k + len(zc))
    num_zc = sum(zc.values())
    router = pm.TopKRouter(DIM, EXPERTS + num_zc, top_k, capacity_factor=cf, init_std=1.0,
                           normalize_weights=top_k > 1)  # fmt: skip
    moe = pm.MoELayer(DIM, router, make_experts(kind), zero_computation_experts=zc).double()
    x = torch.randn(3, 7, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 7) > 0.3 if masked else None
    flat = None if mask is None else mask.reshape(-1).tolist()
    params = list(moe.parameters())
    fns = expert_fns(moe.experts if kind != "list" else moe.experts.experts)
    constant = moe.constant_experts

    reference_kinds = []

    def reference(inp):
        out, _, kinds = naive_frontier_moe(
            inp.reshape(-1, DIM), router.gate.weight, fns, top_k, normalize=top_k > 1,
            capacity_factor=cf, token_mask=flat, zero=zc.get("zero", 0), copy=zc.get("copy", 0),
            constant_gates=[] if constant is None else list(constant.gate_weight),
            constants=[] if constant is None else list(constant.constant),
        )  # fmt: skip
        reference_kinds.append(kinds)
        return out.reshape(inp.shape)

    y, g = run_and_grad(lambda inp: moe(inp, attention_mask=mask), x, params)
    y_ref, g_ref = run_and_grad(reference, x, params)
    assert_same(y, y_ref, g, g_ref)
    if constant is not None:
        assert g[-1].abs().sum() > 0 or g[-2].abs().sum() > 0  # the constant experts learn
    (kinds,) = reference_kinds
    stats = moe.stats
    got = {kind: int(v) for kind, v in stats.zero_computation_slots.items()}
    assert got == kinds
    assert stats.tokens_per_expert.numel() == EXPERTS + num_zc
    assert float(stats.zero_computation_fraction) == pytest.approx(
        sum(kinds.values()) / int(stats.tokens_per_expert.sum())
    )
    row = pm.routing_stats(moe)["<root>"]
    assert row["zero_computation_slots"] == kinds


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_zero_computation_experts_on_the_decode_path(num_tokens):
    """Eval calls of few tokens (the decode path) add the copy and constant experts too:
    equal to the full path's output."""
    torch.manual_seed(num_tokens)
    zc = {"zero": 1, "copy": 1, "constant": 1}
    router = pm.TopKRouter(DIM, EXPERTS + 3, 2, init_std=1.0)
    moe = pm.MoELayer(DIM, router, make_experts("swiglu"), zero_computation_experts=zc).eval()
    x = torch.randn(1, num_tokens, DIM)
    with torch.no_grad():
        fast = moe(x)
        assert moe._pending is not None  # the decode path ran
        moe.decode_max_slots = 0
        full = moe(x)
        assert moe._pending is None
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_num_noop_experts_is_the_zero_kind():
    torch.manual_seed(2)
    router = pm.TopKRouter(DIM, EXPERTS + 2, 2, init_std=1.0)
    a = pm.MoELayer(DIM, router, make_experts("mlp"), num_noop_experts=2)
    b = pm.MoELayer(DIM, router, a.experts, zero_computation_experts={"zero": 2})
    x = torch.randn(2, 5, DIM)
    assert torch.equal(a(x), b(x))
    assert a.num_noop_experts == b.num_noop_experts == 2
    assert a.zero_computation_experts == b.zero_computation_experts
    assert not a.stats.zero_computation_slots or int(a.stats.zero_computation_slots["zero"]) >= 0
    with pytest.raises(ValueError, match="num_noop_experts: it is the 'zero' kind"):
        pm.MoELayer(DIM, router, a.experts, num_noop_experts=1,
                    zero_computation_experts={"zero": 1})  # fmt: skip


def test_zero_computation_experts_with_expert_choice():
    """Expert choice routes over real and zero-computation experts too: a copy expert adds
    each picked token times its weight (index_add path, not token-major)."""
    torch.manual_seed(4)
    router = pm.ExpertChoiceRouter(DIM, EXPERTS + 1, capacity_factor=1.0)
    router.gate.weight.data.normal_()
    moe = pm.MoELayer(DIM, router, make_experts("mlp"), zero_computation_experts={"copy": 1})
    x = torch.randn(2, 6, DIM)
    y = moe(x)
    plain = pm.MoELayer(DIM, router, moe.experts, num_noop_experts=1)(x)
    route = router(x)
    copy_S = (route.expert_ids == EXPERTS) & route.kept
    extra = torch.zeros(12, DIM).index_add_(
        0,
        route.token_ids[copy_S],
        route.weights[copy_S, None] * x.reshape(-1, DIM)[route.token_ids[copy_S]],
    )
    torch.testing.assert_close(y, plain + extra.reshape(2, 6, DIM))
    assert int(moe.stats.zero_computation_slots["copy"]) == int(copy_S.sum())
