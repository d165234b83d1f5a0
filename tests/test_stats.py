"""Routing telemetry: per-layer RoutingStats consistent with the routing, the model-level
table and the load plot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from test_moe_layer import make_experts

DIM, EXPERTS, HIDDEN = 6, 4, 10


def test_stats_consistent_dropless_and_with_drops():
    torch.manual_seed(14)
    router = pm.TopKRouter(DIM, EXPERTS, 2, init_std=1.0)
    moe = pm.MoELayer(DIM, router, make_experts("mlp"))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    moe(torch.randn(2, 6, DIM), mask)
    stats = moe.stats
    assert int(stats.tokens_per_expert.sum()) == 11 * 2  # tokens * top_k
    torch.testing.assert_close(stats.utilisation.mean(), torch.tensor(1.0))
    assert int(stats.dead_experts) == int((stats.tokens_per_expert == 0).sum())
    # entropy and confidence against a direct computation on the same routing
    x = torch.randn(3, 4, DIM)
    moe(x)
    probs = router(x).probs
    torch.testing.assert_close(moe.stats.router_entropy, -(probs * probs.log()).sum(-1).mean())
    torch.testing.assert_close(moe.stats.top1_confidence, probs.max(-1).values.mean())
    sigmoid = pm.MoELayer(
        DIM, pm.TopKRouter(DIM, EXPERTS, 2, score_func="sigmoid"), make_experts("mlp")
    )
    sigmoid(x, torch.ones(3, 4))
    probs = sigmoid.router(x).probs
    probs = probs / probs.sum(-1, keepdim=True)
    torch.testing.assert_close(sigmoid.stats.router_entropy, -(probs * probs.log()).sum(-1).mean())
    capped = pm.MoELayer(
        DIM, pm.TopKRouter(DIM, EXPERTS, 2, capacity_factor=0.5, init_std=2.0), make_experts("mlp")
    )
    capped(torch.randn(2, 8, DIM))
    s = capped.stats
    assert int(s.tokens_per_expert.sum()) + int(s.dropped_slots) == 32
    torch.testing.assert_close(s.utilisation.sum(), s.tokens_per_expert.sum() / 8.0)


def test_routing_stats_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(15)
    model = nn.Sequential(
        pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS, 2), make_experts("mlp")),
        nn.Linear(DIM, DIM),
        pm.MoELayer(DIM, pm.ExpertChoiceRouter(DIM, EXPERTS), make_experts("mlp")),
        pm.SoftMoE(DIM, EXPERTS, 1, make_experts("mlp")),
    )
    assert pm.routing_stats(model) == {}
    history = []
    for _ in range(5):
        model(torch.randn(2, 8, DIM))
        history.append(pm.routing_stats(model))
    table = history[-1]
    assert list(table) == ["0", "2"]
    row = table["0"]
    assert row["tokens_per_expert"] == model[0].stats.tokens_per_expert.tolist()
    assert sum(row["tokens_per_expert"]) == 16 * 2 and row["num_tokens"] == 16
    assert isinstance(row["router_entropy"], float) and isinstance(row["dead_experts"], int)
    assert row["load_imbalance"] == pytest.approx(float(model[0].stats.load_imbalance))
    path = pm.plot_expert_load(history, tmp_path / "load.png", title="loads")
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="history"):
        pm.plot_expert_load([], tmp_path / "x.png")


def test_nan_router_weights_are_counted_as_nonfinite_tokens():
    """A NaN in the router's weights makes every routed token's logits NaN: the stats say so
    (they do not report all is well)."""
    moe = pm.MoELayer(DIM, pm.TopKRouter(DIM, 4, 2), pm.MLPExperts(4, DIM, 8))
    x = torch.randn(2, 3, DIM)
    moe(x)
    assert int(moe.stats.nonfinite_tokens) == 0
    with torch.no_grad():
        moe.router.gate.weight[1, 0] = float("nan")
    moe(x)
    assert int(moe.stats.nonfinite_tokens) == 6
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    moe(x, attention_mask=mask)
    assert int(moe.stats.nonfinite_tokens) == 3  # padding is not counted
