"""Grouped-matmul backends: every backend equals the naive reference and each other, forward and
backward; torch.compile(fullgraph=True) equals eager; the benchmark's baseline is a correct MoE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pytorch_mixtures as pm
from naive import expert_fns, naive_expert_choice_moe, naive_topk_moe
from pytorch_mixtures import backends
from pytorch_mixtures.bench import CONFIGS, NaiveMaskedLoopMoE, run_bench

# odd dims: grouped_mm needs 16-byte strides, so these exercise its zero-padding
DIM, HIDDEN, EXPERTS = 6, 10, 5
HAS_GROUPED_MM = backends.grouped_mm_available(torch.device("cpu"), torch.float32)
DROPLESS_BACKENDS = ["auto", "loop", *(["grouped_mm"] if HAS_GROUPED_MM else [])]
CAPACITY_BACKENDS = [*DROPLESS_BACKENDS, "bmm"]


def make_experts(
    kind: str, backend: str, dim: int = DIM, hidden: int = HIDDEN
) -> pm.MLPExperts | pm.SwiGLUExperts:
    if kind == "swiglu":
        return pm.SwiGLUExperts(EXPERTS, dim, hidden, backend=backend)  # type: ignore[arg-type]
    return pm.MLPExperts(EXPERTS, dim, hidden, activation="gelu", backend=backend)  # type: ignore[arg-type]


def output_and_grads(fn, x, params, seed=0):
    """fn(x) and the gradients of a fixed random projection of it w.r.t. x and params."""
    for p in [x, *params]:
        p.grad = None
    out = fn(x)
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    (out * probe).sum().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in [x, *params]]
    return out.detach(), grads


def assert_all_close(got, want, tol):
    y, gy = got
    y_ref, g_ref = want
    torch.testing.assert_close(y, y_ref.to(y.dtype), rtol=tol, atol=tol)
    for a, b in zip(gy, g_ref, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol)


ROUTINGS = [
    # top_k, capacity_factor, masked
    (2, None, False),
    (3, None, True),
    (2, 0.6, False),
    (1, 0.5, True),  # capacity only known on the device (masked): no bmm
]


# SwiGLU experts weight the narrower of hidden and output: "narrow" (hidden < dim) takes the
# hidden path wherever the layout is row-ordered
SHAPES = {"wide": (DIM, HIDDEN), "narrow": (12, 4)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
@pytest.mark.parametrize(("top_k", "capacity_factor", "masked"), ROUTINGS)
def test_every_backend_matches_naive_reference(kind, top_k, capacity_factor, masked, shape):
    """float32 layer, each backend, against the float64 per-token loop: output and grads of the
    input, the router and every expert weight."""
    dim, hidden = SHAPES[shape]
    torch.manual_seed(top_k * 10 + masked)
    x = torch.randn(3, 7, dim)
    mask = torch.ones(3, 7, dtype=torch.bool)
    if masked:
        mask[0, 5:] = False
        mask[2, :2] = False
    has_capacity_bound = capacity_factor is not None and not masked
    candidates = CAPACITY_BACKENDS if has_capacity_bound else DROPLESS_BACKENDS
    reference = None
    for backend in candidates:
        torch.manual_seed(1)
        router = pm.TopKRouter(
            dim,
            EXPERTS,
            top_k,
            capacity_factor=capacity_factor,
            normalize_weights=top_k > 1,
            init_std=1.0,
        )
        moe = pm.MoELayer(dim, router, make_experts(kind, backend, dim, hidden))
        params = list(moe.parameters())
        xb = x.clone().requires_grad_(True)
        got = output_and_grads(lambda inp, moe=moe: moe(inp, mask if masked else None), xb, params)
        if reference is None:
            moe64 = pm.MoELayer(
                dim,
                pm.TopKRouter(
                    dim,
                    EXPERTS,
                    top_k,
                    capacity_factor=capacity_factor,
                    normalize_weights=top_k > 1,
                    init_std=1.0,
                ),
                make_experts(kind, "loop", dim, hidden),
            ).double()
            moe64.load_state_dict(moe.state_dict())
            params64 = list(moe64.parameters())
            fns = expert_fns(moe64.experts)
            x64 = x.double().requires_grad_(True)

            def naive(inp, moe64=moe64, fns=fns):
                out, _ = naive_topk_moe(
                    inp.reshape(-1, dim),
                    moe64.router.gate.weight,
                    fns,
                    top_k,
                    normalize=top_k > 1,
                    capacity_factor=capacity_factor,
                    token_mask=mask.reshape(-1).tolist() if masked else None,
                )
                return out.reshape(inp.shape)

            reference = output_and_grads(naive, x64, params64)
        assert_all_close(got, reference, tol=2e-5)


@pytest.mark.parametrize("backend", CAPACITY_BACKENDS)
def test_expert_choice_every_backend_matches_naive(backend):
    torch.manual_seed(4)
    router = pm.ExpertChoiceRouter(DIM, EXPERTS, 1.5, init_std=1.0)
    moe = pm.MoELayer(DIM, router, make_experts("swiglu", backend))
    x = torch.randn(2, 8, DIM)
    got = output_and_grads(moe, x.clone().requires_grad_(True), list(moe.parameters()))
    moe64 = pm.MoELayer(
        DIM, pm.ExpertChoiceRouter(DIM, EXPERTS, 1.5), make_experts("swiglu", "loop")
    ).double()
    moe64.load_state_dict(moe.state_dict())
    fns = expert_fns(moe64.experts)

    def naive(inp):
        return naive_expert_choice_moe(inp, moe64.router.gate.weight, fns, 1.5)[0]

    want = output_and_grads(naive, x.double().requires_grad_(True), list(moe64.parameters()))
    assert_all_close(got, want, tol=2e-5)


@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
def test_experts_with_zero_rows_and_padding(kind):
    """Direct experts call: empty experts (first, middle, last), trailing padding rows; padding
    output is exactly zero and padding rows get exactly zero gradient."""
    torch.manual_seed(2)
    counts = torch.tensor([0, 3, 0, 4, 0])
    x = torch.randn(10, DIM)  # 7 real rows + 3 padding rows
    experts = make_experts(kind, "loop")
    fns = expert_fns(experts)
    owner = [1, 1, 1, 3, 3, 3, 3]

    def reference(inp):
        rows = [fns[e](inp[i]) for i, e in enumerate(owner)]
        return torch.cat([torch.stack(rows), torch.zeros(3, DIM)])

    want = output_and_grads(reference, x.clone().requires_grad_(True), list(experts.parameters()))
    for backend in ["loop", *(["grouped_mm"] if HAS_GROUPED_MM else []), "bmm"]:
        experts.backend = backend
        got = output_and_grads(
            lambda inp: experts(inp, counts, max_rows_per_expert=4),
            x.clone().requires_grad_(True),
            list(experts.parameters()),
        )
        assert_all_close(got, want, tol=1e-5)
        assert torch.equal(got[0][7:], torch.zeros(3, DIM)), backend
        assert torch.equal(got[1][0][7:], torch.zeros(3, DIM)), backend


def test_all_rows_padding():
    experts = make_experts("swiglu", "loop")
    x = torch.randn(4, DIM, requires_grad=True)
    for backend in CAPACITY_BACKENDS:
        experts.backend = backend
        y = experts(x, torch.zeros(EXPERTS, dtype=torch.long), max_rows_per_expert=2)
        y.sum().backward()
        assert torch.equal(y, torch.zeros(4, DIM))
        assert x.grad is not None and torch.equal(x.grad, torch.zeros(4, DIM))
        x.grad = None


def test_backend_errors_are_clear():
    with pytest.raises(ValueError, match="backend: expected one of"):
        pm.SwiGLUExperts(2, 4, 8, backend="cutlass")  # type: ignore[arg-type]
    experts = pm.SwiGLUExperts(2, 4, 8, backend="bmm")
    with pytest.raises(ValueError, match="backend='bmm': needs a per-expert capacity"):
        experts(torch.randn(3, 4), torch.tensor([1, 2]))
    if hasattr(F, "grouped_mm"):
        experts = pm.SwiGLUExperts(2, 4, 8, backend="grouped_mm").double()
        with pytest.raises(ValueError, match=r"does not support torch\.float64"):
            experts(torch.randn(3, 4, dtype=torch.float64), torch.tensor([1, 2]))
    experts = pm.SwiGLUExperts(2, 4, 8, backend="loop")
    with pytest.raises(ValueError, match="counts sum to 5 but x has 3 rows"):
        experts(torch.randn(3, 4), torch.tensor([2, 3]))


def test_auto_picks_from_the_measured_table():
    x = torch.randn(3, 4)
    assert backends.resolve_backend("auto", x, None, torch.float32) == "loop"
    assert backends.resolve_backend("auto", x, 2, torch.float32) == "loop"
    assert backends.resolve_backend("bmm", x, 2, torch.float32) == "bmm"


def test_segment_mm_op_registration():
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration."""
    x = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(3, 5, 6, requires_grad=True)
    counts = torch.tensor([2, 0, 4])
    torch.library.opcheck(backends.segment_mm, (x, w, counts))
    w_gate_up = torch.randn(3, 5, 8, requires_grad=True)
    w_down = torch.randn(3, 4, 5, requires_grad=True)
    row_weights = torch.rand(7, requires_grad=True)
    tokens = torch.tensor([4, 0, 1, 4, 2, 3, 0, 1])  # 8 sorted rows of 5 tokens (2 padding)
    x_tokens = torch.randn(5, 5, requires_grad=True)
    for weights in (None, row_weights):
        torch.library.opcheck(
            backends.segment_swiglu, (x, w_gate_up, w_down, counts, weights, None)
        )
    torch.library.opcheck(
        backends.segment_swiglu,
        (x_tokens, w_gate_up, w_down, counts, torch.rand(8, requires_grad=True), tokens),
    )


@pytest.mark.parametrize("mode", ["sorted rows", "token rows"])
def test_segment_swiglu_against_a_per_row_loop(mode):
    """The fused loop-backend SwiGLU, float64, against each row through its expert by hand:
    output, and gradients of the inputs, both weights and the row weights. "token rows": sorted
    row r reads token rows_S[r] and adds into it (padding rows ignored); "sorted rows": row r
    is x[r] (padding rows give zero)."""
    torch.manual_seed(3)
    counts = torch.tensor([3, 0, 2, 4])
    rows, dim, hidden, tokens = 11, 6, 5, 4  # 9 routed rows + 2 padding rows
    expert_of_row = [0, 0, 0, 2, 2, 3, 3, 3, 3]
    token_of_row = torch.tensor([0, 2, 3, 1, 2, 0, 1, 2, 3, 0, 0])
    by_token = mode == "token rows"
    x = torch.randn(tokens if by_token else rows, dim, dtype=torch.float64, requires_grad=True)
    w_gu = torch.randn(4, dim, 2 * hidden, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(4, hidden, dim, dtype=torch.float64, requires_grad=True)
    row_w = torch.rand(rows, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(x.shape, dtype=torch.float64)

    def reference():
        out = [torch.zeros(dim, dtype=torch.float64) for _ in range(x.shape[0])]
        for r, e in enumerate(expert_of_row):
            src = int(token_of_row[r]) if by_token else r
            gate, up = (x[src] @ w_gu[e]).split(hidden)
            out[src] = out[src] + row_w[r] * (torch.nn.functional.silu(gate) * up) @ w_down[e]
        return torch.stack(out)

    def fused():
        rows_S = token_of_row if by_token else None
        return backends.segment_swiglu(x, w_gu, w_down, counts, row_w, rows_S)[0]

    results = []
    for fn in (reference, fused):
        y = fn()
        grads = torch.autograd.grad((y * probe).sum(), [x, w_gu, w_down, row_w])
        results.append((y.detach(), grads))
    (y_ref, g_ref), (y, g) = results
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(g, g_ref, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without F.grouped_mm")
def test_bf16_autocast_backends_agree():
    """Under CPU autocast the matmuls run in bf16 in every backend; the layer returns x's dtype."""
    torch.manual_seed(6)
    dim, hidden = 16, 32
    outs = {}
    for backend in ["loop", "grouped_mm", "bmm"]:
        torch.manual_seed(0)
        router = pm.TopKRouter(dim, 4, 2, capacity_factor=1.5)
        moe = pm.MoELayer(dim, router, pm.SwiGLUExperts(4, dim, hidden, backend=backend))
        x = torch.randn(2, 8, dim)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[backend] = moe(x)
        assert outs[backend].dtype == torch.float32
    torch.testing.assert_close(outs["grouped_mm"], outs["loop"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs["bmm"], outs["loop"], rtol=2e-2, atol=2e-2)


def check_compile_equals_eager(capacity_factor, compile_backend):
    torch._dynamo.reset()
    torch.manual_seed(8)
    router = pm.TopKRouter(8, 4, 2, capacity_factor=capacity_factor, init_std=1.0)
    moe = pm.MoELayer(8, router, pm.SwiGLUExperts(4, 8, 12))
    x = torch.randn(2, 6, 8)
    params = list(moe.parameters())
    eager = output_and_grads(moe, x.clone().requires_grad_(True), params)
    # fullgraph=True: any graph break raises instead of silently splitting the graph
    compiled = torch.compile(moe, fullgraph=True, dynamic=False, backend=compile_backend)
    got = output_and_grads(compiled, x.clone().requires_grad_(True), params)
    assert_all_close(got, eager, tol=1e-5)
    assert moe.stats is not None and moe.aux_loss.requires_grad


@pytest.mark.parametrize("capacity_factor", [None, 1.25], ids=["dropless", "capacity"])
def test_compile_fullgraph_equals_eager(capacity_factor):
    """Dynamo captures one graph (forward and AOT-autograd backward) for top-k dropless (the loop
    backend as an opaque custom op) and capacity mode (padded bmm); same output and grads."""
    check_compile_equals_eager(capacity_factor, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("capacity_factor", [None, 1.25], ids=["dropless", "capacity"])
def test_compile_inductor_equals_eager(capacity_factor):
    """The same through Inductor's generated C++ (slow: a C++ compile per graph)."""
    check_compile_equals_eager(capacity_factor, "inductor")


def test_bench_baseline_is_a_correct_moe():
    """The benchmark's naive masked loop computes the same MoE as MoELayer (fair baseline)."""
    torch.manual_seed(9)
    naive = NaiveMaskedLoopMoE(DIM, EXPERTS, HIDDEN, 2)
    moe = pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS, 2), make_experts("swiglu", "auto"))
    with torch.no_grad():
        moe.router.gate.weight.copy_(naive.gate.weight)
        for e, expert in enumerate(naive.experts):
            moe.experts.w_gate_up[e].copy_(expert.gate_up.weight.T)
            moe.experts.w_down[e].copy_(expert.down.weight.T)
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(naive(x), moe(x), rtol=1e-5, atol=1e-6)


def test_bench_runs_and_reports_every_candidate():
    result = run_bench(CONFIGS["tiny"], repeats=1, warmup=0, memory=False, threads=None)
    assert result.fwd_ratio["dense-equivalent"] == 1.0
    for name in ["moe[loop]", "moe[auto]", "moe[bmm] cf=1.25", "naive masked loop"]:
        assert result.fwd_ratio[name] > 0 and result.fwd_bwd_ratio[name] > 0


def test_cli_bench_subcommand(tmp_path, capsys):
    from pytorch_mixtures.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--config", "tiny", "--repeats", "1", "--warmup", "0", "--no-memory"]
    assert main([*args, "--only", "moe[auto]", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "moe[auto]" in printed and "dense-equivalent" in printed
    import json

    (result,) = json.loads(out.read_text())
    assert set(result["fwd_ratio"]) == {"dense-equivalent", "moe[auto]"}


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without F.grouped_mm")
@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
def test_grouped_mm_row_aligned_layout_matches_loop(kind):
    """The CUDA layout (groups padded to 16-row starts, zero filler), run on CPU."""
    torch.manual_seed(12)
    counts = torch.tensor([5, 0, 17, 1, 0])
    experts = make_experts(kind, "loop")
    x = torch.randn(26, DIM)  # 23 real rows + 3 padding
    want = output_and_grads(
        lambda inp: experts(inp, counts), x.clone().requires_grad_(True), list(experts.parameters())
    )

    def aligned(inp):
        rows = backends.group_rows(inp, counts, "grouped_mm", row_alignment=16)
        assert rows.data.shape[0] % 16 == 0 and rows.offsets is not None
        assert (rows.offsets[:-1] % 16 == 0).all()
        if kind == "swiglu":
            hidden = rows.linear(experts.w_gate_up).map(experts._swiglu)
            return hidden.linear(experts.w_down).rows()
        hidden = rows.linear(experts.w_in, experts.b_in).map(experts._act)
        return hidden.linear(experts.w_out, experts.b_out).rows()

    got = output_and_grads(aligned, x.clone().requires_grad_(True), list(experts.parameters()))
    assert_all_close(got, want, tol=1e-5)
    assert torch.equal(got[0][23:], torch.zeros(3, DIM))


@pytest.mark.parametrize("by_token", [False, True], ids=["sorted rows", "token rows"])
def test_segment_swiglu_second_order_gradients(by_token):
    """backward(create_graph=True) goes through differentiable ops: gradgradcheck in float64."""
    torch.manual_seed(4)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(4 if by_token else 6, 3, dtype=torch.float64, requires_grad=True)
    w_gu = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    row_w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 3, 1, 2, 3, 0]) if by_token else None

    def fn(x, w_gu, w_down, row_w):
        return backends.segment_swiglu(x, w_gu, w_down, counts, row_w, rows)[0]

    assert torch.autograd.gradcheck(fn, (x, w_gu, w_down, row_w))
    assert torch.autograd.gradgradcheck(fn, (x, w_gu, w_down, row_w))
    _, gate_up = backends.segment_swiglu(x, w_gu, w_down, counts, row_w, rows)
    assert not gate_up.requires_grad  # returned only to be saved for the backward


def test_loop_path_keeps_hooks_and_pruning():
    """MoELayer's token-rows path calls the experts module, so its hooks and parametrizations
    (pruning's pre-hook recomputes the weight every call) apply."""
    from torch.nn.utils import prune

    torch.manual_seed(5)
    moe = pm.MoELayer(8, pm.TopKRouter(8, 4, 2), pm.SwiGLUExperts(4, 8, 12))
    seen = []
    moe.experts.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    prune.random_unstructured(moe.experts, "w_down", 0.5)
    x = torch.randn(2, 3, 8)
    for _ in range(2):  # a stale pruned weight would fail the second backward
        moe(x).sum().backward()
    assert seen == [torch.Size([6, 8])] * 2  # token rows in, token rows out
    mask = moe.experts.w_down_mask
    assert (moe.experts.w_down_orig.grad[mask == 0] == 0).all()


def test_segment_swiglu_ignores_autocast_and_keeps_the_callers_dtype():
    x = torch.randn(5, 4)
    w_gu, w_down = torch.randn(2, 4, 6), torch.randn(2, 3, 4)
    counts, rows = torch.tensor([3, 2]), torch.tensor([0, 1, 4, 2, 3])
    plain = backends.segment_swiglu(x, w_gu, w_down, counts, None, rows)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = backends.segment_swiglu(x, w_gu, w_down, counts, None, rows)[0]
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain)


def test_rows_need_the_loop_backend():
    experts = pm.SwiGLUExperts(2, 4, 8, backend="bmm")
    with pytest.raises(ValueError, match="token rows need the 'loop' backend"):
        experts(torch.randn(3, 4), torch.tensor([1, 1]), rows_S=torch.tensor([0, 1]))
    experts = pm.SwiGLUExperts(2, 4, 8, backend="loop")
    with pytest.raises(TypeError, match="rows_S: expected a 1-D int64 tensor"):
        experts(torch.randn(3, 4), torch.tensor([1, 1]), rows_S=torch.tensor([0.0, 1.0]))
