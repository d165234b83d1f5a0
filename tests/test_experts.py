"""Experts modules: padding rows, empty experts, hooks and pruning, fused-combine plans."""

from __future__ import annotations

import pytest
import torch

import pytorch_mixtures as pm
from reference.moe import expert_fns
from test_backends import (
    CAPACITY_BACKENDS,
    DIM,
    EXPERTS,
    HAS_GROUPED_MM,
    assert_all_close,
    make_experts,
    output_and_grads,
)


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


def test_fused_combine_needs_the_loop_backend_on_cpu():
    """A plan that asks the experts to read token rows and combine (``fuse_combine``) is refused
    where the experts cannot fuse: another backend, or experts that never fuse."""
    route = pm.TopKRouter(4, 2, 1, normalize_weights=False)(torch.randn(3, 4))
    x_ND = torch.randn(3, 4)
    for experts, backend in (
        (pm.SwiGLUExperts(2, 4, 8, backend="bmm"), "bmm"),
        (pm.MLPExperts(2, 4, 8), "loop"),
    ):
        assert not experts.fuses_combine(x_ND, backend)
        plan = pm.dispatch.plan_dispatch(route, backend=backend, fuse_combine=True)
        with pytest.raises(ValueError, match="a fused combine needs experts that fuse it"):
            experts(x_ND, plan.tokens_per_expert, plan=plan)
    swiglu = pm.SwiGLUExperts(2, 4, 8)
    assert swiglu.fuses_combine(x_ND, "loop")
    assert not pm.MLPExperts(2, 4, 8).fuses_combine(x_ND, "loop")
    assert not pm.ModuleListExperts([torch.nn.Linear(4, 4)] * 2, 4).fuses_combine(x_ND, "loop")
    # the fused result is the dispatcher's combine of the unfused one
    plan = pm.dispatch.plan_dispatch(route, backend="loop", fuse_combine=True)
    fused = swiglu(x_ND, plan.tokens_per_expert, plan=plan)
    sorted_out = swiglu(pm.dispatch.permute(x_ND, plan), plan.tokens_per_expert)
    torch.testing.assert_close(fused, pm.dispatch.combine(sorted_out, plan))
