"""The custom ops of pytorch_mixtures.kernels against per-row float64 loops: outputs, every
gradient (incl. the row weights), second-order gradients, op registration, autocast."""

from __future__ import annotations

import pytest
import torch

from pytorch_mixtures import kernels


def test_segment_mm_op_registration():
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration."""
    x = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(3, 5, 6, requires_grad=True)
    counts = torch.tensor([2, 0, 4])
    torch.library.opcheck(kernels.segment_mm, (x, w, counts))
    w_gate_up = torch.randn(3, 5, 8, requires_grad=True)
    w_down = torch.randn(3, 4, 5, requires_grad=True)
    row_weights = torch.rand(7, requires_grad=True)
    tokens = torch.tensor([4, 0, 1, 4, 2, 3, 0, 1])  # 8 sorted rows of 5 tokens (2 padding)
    x_tokens = torch.randn(5, 5, requires_grad=True)
    for weights in (None, row_weights):
        torch.library.opcheck(kernels.segment_swiglu, (x, w_gate_up, w_down, counts, weights, None))
    torch.library.opcheck(
        kernels.segment_swiglu,
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
        return kernels.segment_swiglu(x, w_gu, w_down, counts, row_w, rows_S)[0]

    results = []
    for fn in (reference, fused):
        y = fn()
        grads = torch.autograd.grad((y * probe).sum(), [x, w_gu, w_down, row_w])
        results.append((y.detach(), grads))
    (y_ref, g_ref), (y, g) = results
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(g, g_ref, strict=True):
        torch.testing.assert_close(got, want)


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
        return kernels.segment_swiglu(x, w_gu, w_down, counts, row_w, rows)[0]

    assert torch.autograd.gradcheck(fn, (x, w_gu, w_down, row_w))
    assert torch.autograd.gradgradcheck(fn, (x, w_gu, w_down, row_w))
    _, gate_up = kernels.segment_swiglu(x, w_gu, w_down, counts, row_w, rows)
    assert not gate_up.requires_grad  # returned only to be saved for the backward


def test_segment_swiglu_ignores_autocast_and_keeps_the_callers_dtype():
    x = torch.randn(5, 4)
    w_gu, w_down = torch.randn(2, 4, 6), torch.randn(2, 3, 4)
    counts, rows = torch.tensor([3, 2]), torch.tensor([0, 1, 4, 2, 3])
    plain = kernels.segment_swiglu(x, w_gu, w_down, counts, None, rows)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = kernels.segment_swiglu(x, w_gu, w_down, counts, None, rows)[0]
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain)
