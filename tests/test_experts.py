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


class _ScaledExperts(pm.experts.ExpertsBase):
    """A 0.2-style custom experts class: it implements only ``expert_forward``."""

    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__()
        self.num_experts, self.dim = num_experts, dim
        self.scale = torch.nn.Parameter(torch.arange(1.0, num_experts + 1).double())

    def expert_forward(self, index: int, x_nD: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x_nD) * self.scale[index]


class _OwnForwardExperts(_ScaledExperts):
    """A 0.2-style subclass with its own ``forward(x, counts, *, max_rows_per_expert=None)``."""

    def forward(self, x_SD, tokens_per_expert_E, *, max_rows_per_expert=None):
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_experts), tokens_per_expert_E, output_size=None
        )
        out = torch.zeros_like(x_SD)
        rows = expert_of_row.numel()
        out[:rows] = torch.tanh(x_SD[:rows]) * self.scale[expert_of_row].unsqueeze(-1)
        return out


@pytest.mark.parametrize("cls", [_ScaledExperts, _OwnForwardExperts])
@pytest.mark.parametrize("train", [True, False])
def test_custom_experts_of_the_02_interface_work_in_a_layer(cls, train):
    """Custom experts written against 0.2 (only ``expert_forward``, or an own ``forward``
    without ``plan``) run inside MoELayer, training and eval, and equal a per-token loop."""
    torch.manual_seed(7)
    experts = cls(4, DIM)
    router = pm.TopKRouter(DIM, 4, 2, init_std=1.0).double()
    moe = pm.MoELayer(DIM, router, experts).train(train)
    x = torch.randn(2, 3, DIM, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    route = router.eval()(x) if not train else router(x)
    want = torch.zeros(6, DIM, dtype=torch.float64)
    for slot in range(route.token_ids.numel()):
        n, e = int(route.token_ids[slot]), int(route.expert_ids[slot])
        want[n] = want[n] + route.weights[slot] * torch.tanh(x.reshape(-1, DIM)[n]) * (e + 1)
    torch.testing.assert_close(y.reshape(-1, DIM), want)
    y.sum().backward()
    assert experts.scale.grad is not None and x.grad is not None
