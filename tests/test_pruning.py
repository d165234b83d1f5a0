"""Expert pruning (REAP, Lasby et al. 2025; selection frequency) against naive per-token
scores; pruning experts that were never selected leaves outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm
from reference.frontier import naive_reap_scores
from reference.moe import expert_fns
from test_moe_layer import make_experts

DIM, EXPERTS = 6, 6


class TwoLayers(nn.Module):
    """A model holding two MoE layers, called with (x, attention_mask)."""

    def __init__(self, first: pm.MoELayer, second: pm.MoELayer) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.first(x, attention_mask=attention_mask)
        return h + self.second(h, attention_mask=attention_mask)


@pytest.mark.parametrize(("score_func", "normalize", "kind"), [
    ("softmax", True, "swiglu"), ("sigmoid", False, "mlp"), ("softmax", False, "list"),
])  # fmt: skip
def test_reap_and_frequency_scores_equal_the_naive_computation(score_func, normalize, kind):
    torch.manual_seed(7)
    router = pm.TopKRouter(DIM, EXPERTS, 2, score_func=score_func, normalize_weights=normalize,
                           init_std=1.0)  # fmt: skip
    moe = pm.MoELayer(DIM, router, make_experts(kind, EXPERTS)).double()
    batches = [torch.randn(2, 5, DIM, dtype=torch.float64) for _ in range(3)]
    fns = expert_fns(moe.experts if kind != "list" else moe.experts.experts)
    with torch.no_grad():
        want, counts = naive_reap_scores(batches, router.gate.weight, fns, 2,
                                         score_func=score_func, normalize=normalize)  # fmt: skip
    scores, slots = pm.expert_scores(moe, batches, "reap")["<root>"]
    torch.testing.assert_close(scores, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=0)
    assert slots.tolist() == counts
    freq, _ = pm.expert_scores(moe, batches, "frequency")["<root>"]
    assert freq.tolist() == [float(c) for c in counts]


def _never_selected_model(score_func: str, zc: dict[str, int] | None = None) -> pm.MoELayer:
    """A layer whose experts 1 and 4 are never chosen: the last input feature is a constant 1
    and their gate rows put -1000 on it."""
    num_zc = sum((zc or {}).values())
    router = pm.TopKRouter(DIM, EXPERTS + num_zc, 2, score_func=score_func, init_std=1.0,
                           expert_bias=score_func == "sigmoid")  # fmt: skip
    with torch.no_grad():
        router.gate.weight[[1, 4], -1] = -1000.0
        if router.expert_bias is not None:
            router.expert_bias.copy_(torch.linspace(-0.1, 0.1, EXPERTS + num_zc))
    return pm.MoELayer(DIM, router, make_experts("mlp", EXPERTS), zero_computation_experts=zc)


def _inputs(count: int) -> list[torch.Tensor]:
    batches = [torch.randn(3, 5, DIM) for _ in range(count)]
    for batch in batches:
        batch[..., -1] = 1.0
    return batches


@pytest.mark.parametrize("criterion", ["reap", "frequency"])
@pytest.mark.parametrize("zc", [None, {"copy": 1, "constant": 1}])
def test_pruning_never_selected_experts_leaves_outputs_unchanged(criterion, zc):
    """Sigmoid scores (with an expert bias): exactly the same choices and kept slots, and the
    same outputs, in training and eval; the router rows, the bias and the zero-computation
    experts follow. Outputs are compared to float64 rounding, not bit for bit: the gate matmul
    over fewer rows is another BLAS shape, which may round the last bit of a logit
    differently (seen on the second layer here: 4e-16)."""
    torch.manual_seed(3)
    moe = _never_selected_model("sigmoid", zc).double()
    model = TwoLayers(moe, _never_selected_model("sigmoid").double())
    calibration = [x.double() for x in _inputs(2)]
    test = [x.double() for x in _inputs(2)]
    mask = torch.rand(3, 5) > 0.2
    with torch.no_grad():
        before = [model(x, mask) for x in test]
        before_eval = [model.eval()(x, mask) for x in test]
        routes = [moe.router(x, mask) for x in test]
    model.train()
    old_gate = moe.router.gate.weight.detach().clone()
    old_bias = moe.router.expert_bias.clone()
    old_w_in = moe.experts.w_in.detach().clone()
    report = pm.prune_experts(model, keep=EXPERTS - 2, batches=calibration, criterion=criterion)
    assert model.training  # the training flags are restored after calibration
    assert report.layers["first"].kept == (0, 2, 3, 5) == report.layers["second"].kept
    rows = [0, 2, 3, 5, *range(EXPERTS, moe.router.num_experts + 2)]
    assert torch.equal(moe.router.gate.weight, old_gate[rows])
    assert torch.equal(moe.router.expert_bias, old_bias[rows])
    assert torch.equal(moe.experts.w_in, old_w_in[[0, 2, 3, 5]])
    assert moe.num_experts == moe.experts.num_experts == EXPERTS - 2
    with torch.no_grad():
        after = [model(x, mask) for x in test]
        after_eval = [model.eval()(x, mask) for x in test]
        pruned = [moe.router(x, mask) for x in test]
    renumber = torch.tensor([0, -1, 1, 2, -1, 3, *range(4, 4 + sum((zc or {}).values()))])
    for route, new in zip(routes, pruned, strict=True):
        assert torch.equal(renumber[route.expert_ids], new.expert_ids)
        assert torch.equal(route.kept, new.kept)
        torch.testing.assert_close(route.weights, new.weights, rtol=1e-12, atol=1e-12)
    for a, b in zip(before + before_eval, after + after_eval, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if zc:
        assert set(moe.stats.zero_computation_slots) == {"zero", "copy", "constant"}
        assert moe.stats.tokens_per_expert.numel() == EXPERTS - 2 + 2


def test_pruning_in_float32_keeps_choices_and_outputs_to_rounding():
    """Float32, softmax (renormalised top-k) and sigmoid: exactly the same choices; weights and
    outputs equal up to rounding (a smaller gate matmul and softmax denominator)."""
    torch.manual_seed(5)
    for score_func in ("softmax", "sigmoid"):  # float32 both
        moe = _never_selected_model(score_func)
        test = _inputs(1)[0]
        with torch.no_grad():
            route = moe.router(test)
            before = moe(test)
        pm.prune_experts(moe, keep=4, batches=_inputs(2))
        with torch.no_grad():
            pruned = moe.router(test)
            after = moe(test)
        renumber = torch.tensor([0, -1, 1, 2, -1, 3])
        assert torch.equal(renumber[route.expert_ids], pruned.expert_ids)  # the same choices
        torch.testing.assert_close(pruned.weights, route.weights, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_pruning_reports_the_parameters_saved():
    torch.manual_seed(1)
    moe = pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS, 2, noisy_gating=True),
                      pm.SwiGLUExperts(EXPERTS, DIM, 10))  # fmt: skip
    total = sum(p.numel() for p in moe.parameters())
    report = pm.prune_experts(moe, keep=0.5, batches=[torch.randn(4, 8, DIM)])
    per_expert = DIM * 20 + 10 * DIM + 2 * DIM  # w_gate_up, w_down, gate and noise-gate rows
    assert report.parameters_saved == 3 * per_expert
    assert sum(p.numel() for p in moe.parameters()) == total - report.parameters_saved
    assert len(report.layers["<root>"].kept) == 3 and moe.router.noise_gate.weight.shape == (3, DIM)
    moe(torch.randn(2, 3, DIM)).sum().backward()  # the pruned layer trains
    assert moe.router.gate.weight.grad.shape == (3, DIM)


@pytest.mark.parametrize(("keep", "error", "fragments"), [
    (0, ValueError, ("keep", "[1, 6]", "got 0")),
    (7, ValueError, ("keep", "[1, 6]", "got 7")),
    (1, ValueError, ("keep", "at least 2", "top_k=2", "got 1")),
    (1.5, ValueError, ("keep", "(0, 1]", "1.5")),
    (0.0, ValueError, ("keep", "(0, 1]", "0.0")),
    (True, TypeError, ("keep", "int", "bool")),
    ("half", TypeError, ("keep", "int", "str")),
])  # fmt: skip
def test_bad_keep_values_raise_clearly(keep, error, fragments):
    moe = pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS, 2), make_experts("mlp", EXPERTS))
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    with pytest.raises(error) as info:
        pm.prune_experts(moe, keep=keep, batches=[torch.randn(2, 3, DIM)])
    for fragment in fragments:
        assert fragment in str(info.value)
    # nothing changed
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in state.items())


def test_bad_batches_criterion_and_models_raise_clearly():
    moe = pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS, 2), make_experts("mlp", EXPERTS))
    with pytest.raises(ValueError, match="batches: expected at least one calibration batch"):
        pm.prune_experts(moe, keep=4, batches=[])
    with pytest.raises(TypeError, match=r"batches: expected an iterable.*got Tensor"):
        pm.prune_experts(moe, keep=4, batches=torch.randn(2, 3, DIM))
    with pytest.raises(
        ValueError, match="criterion: expected one of 'reap', 'frequency', got 'l1'"
    ):
        pm.prune_experts(moe, keep=4, batches=[torch.randn(2, 3, DIM)], criterion="l1")
    with pytest.raises(ValueError, match="model: expected a module containing MoELayer"):
        pm.prune_experts(nn.Linear(2, 2), keep=1, batches=[torch.randn(2, 2)])
    ec = pm.MoELayer(DIM, pm.ExpertChoiceRouter(DIM, EXPERTS), make_experts("mlp", EXPERTS))
    with pytest.raises(TypeError, match="model: pruning supports layers routed by TopKRouter"):
        pm.prune_experts(ec, keep=4, batches=[torch.randn(2, 3, DIM)])
    grouped = pm.MoELayer(DIM, pm.TopKRouter(DIM, EXPERTS, 2, num_groups=3, topk_groups=2),
                          make_experts("mlp", EXPERTS))  # fmt: skip
    with pytest.raises(ValueError, match="group-limited routing"):
        pm.prune_experts(grouped, keep=4, batches=[torch.randn(2, 3, DIM)])
