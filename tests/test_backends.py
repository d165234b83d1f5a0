"""Grouped-matmul backends: every backend equals the naive reference and each other, forward and
backward; torch.compile(fullgraph=True) equals eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pytorch_mixtures as pm
from pytorch_mixtures import backends
from reference.moe import expert_fns, naive_expert_choice_moe, naive_topk_moe

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


# "narrow": hidden < dim, so the experts' hidden tensors are narrower than their outputs
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
            hidden = rows.linear(experts.w_gate_up).map(pm.experts._swiglu)
            return hidden.linear(experts.w_down).rows()
        hidden = rows.linear(experts.w_in, experts.b_in).map(experts._act)
        return hidden.linear(experts.w_out, experts.b_out).rows()

    got = output_and_grads(aligned, x.clone().requires_grad_(True), list(experts.parameters()))
    assert_all_close(got, want, tol=1e-5)
    assert torch.equal(got[0][23:], torch.zeros(3, DIM))
