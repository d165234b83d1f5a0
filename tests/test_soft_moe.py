"""SoftMoE (Puigcerver et al. 2023) against a naive reference: slots, softmax axes,
permutation equivariance, padding."""

from __future__ import annotations

import pytest
import torch

import pytorch_mixtures as pm
from reference.moe import expert_fns
from reference.routing import (
    naive_soft_moe,
)
from test_moe_layer import assert_same, make_experts, run_and_grad

DIM, EXPERTS, HIDDEN = 6, 4, 10


@pytest.mark.parametrize(("normalize", "kind"), [(True, "mlp"), (False, "list")])
def test_soft_moe_matches_naive_reference(normalize, kind):
    torch.manual_seed(11)
    layer = pm.SoftMoE(DIM, EXPERTS, 2, make_experts(kind), normalize=normalize).double()
    if normalize:
        with torch.no_grad():
            layer.scale.fill_(3.0)
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    y, g = run_and_grad(layer, x, params)
    fns = expert_fns(layer.experts if kind != "list" else layer.experts.experts)
    y_ref, g_ref = run_and_grad(
        lambda inp: naive_soft_moe(inp, layer.phi, fns, 2, layer.scale), x, params
    )
    assert_same(y, y_ref, g, g_ref)
    assert float(pm.aux_loss(layer)) == 0.0


def test_soft_moe_softmax_axes_and_permutation_equivariance():
    torch.manual_seed(12)
    layer = pm.SoftMoE(DIM, EXPERTS, 3, make_experts("swiglu")).double()
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    dispatch, combine = layer.routing_weights(x)
    assert dispatch.shape == combine.shape == (2, 7, EXPERTS * 3)
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(2, EXPERTS * 3, dtype=torch.float64))
    torch.testing.assert_close(combine.sum(dim=2), torch.ones(2, 7, dtype=torch.float64))
    perm = torch.randperm(7)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm])
    assert not layer.is_causal


def test_soft_moe_padding_gets_no_dispatch_weight():
    torch.manual_seed(13)
    layer = pm.SoftMoE(DIM, EXPERTS, 2, make_experts("mlp"))
    x = torch.randn(2, 6, DIM)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    dispatch, _ = layer.routing_weights(x, mask)
    assert torch.equal(dispatch[0, 4:], torch.zeros(2, EXPERTS * 2))
    y = layer(x, mask)
    assert torch.isfinite(y).all() and torch.equal(y[mask == 0], torch.zeros(8, DIM))
    torch.testing.assert_close(y[0, :4], layer(x[:1, :4])[0])


def test_soft_moe_on_an_empty_batch_returns_an_empty_output():
    soft = pm.SoftMoE(DIM, 4, 2, pm.MLPExperts(4, DIM, 8))
    for shape in ((0, 5, DIM), (2, 0, DIM), (0, DIM)):
        x = torch.randn(*shape, requires_grad=True)
        y = soft(x)
        assert y.shape == x.shape
        y.sum().backward()  # the graph stays connected
        assert float(soft.aux_loss) == 0.0


def test_nan_in_padding_never_reaches_real_tokens():
    torch.manual_seed(4)
    soft = pm.SoftMoE(DIM, 4, 2, pm.MLPExperts(4, DIM, 8))
    x = torch.randn(2, 5, DIM)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    clean = soft(x, attention_mask=mask)
    poisoned = x.clone()
    poisoned[0, 3:] = float("nan")
    got = soft(poisoned, attention_mask=mask)
    torch.testing.assert_close(got, clean)  # the padding rows are zero in both
