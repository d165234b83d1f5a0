"""Mixture-of-Depths: routing, residual/gate semantics, causality, padding, losses, telemetry.

Every numerical check compares against ``naive_mod`` below: a per-row Python loop that picks
each row's top-k by sorting (score, index) pairs and runs the block on that row's chosen tokens
alone.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pytorch_mixtures as pm
from pytorch_mixtures.models import Block, ModelConfig

DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def attention_block(dim: int = DIM, layer: int = 0) -> Block:
    """The reference decoder block: RoPE at true positions, position-based causal mask."""
    config = ModelConfig(vocab_size=8, dim=dim, num_layers=1, num_heads=2, ffn_hidden=2 * dim)
    return Block(config, layer)


class NaiveAttention(nn.Module):
    """Single-head causal attention written out: masked_fill(-inf) then softmax.

    A query with no allowed key gets a NaN row (softmax of all -inf), which is what makes it a
    good test of how invalid slots are handled. Returns ``x + attention(x)``.
    """

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        pos = (
            position_ids
            if position_ids is not None
            else torch.arange(x.shape[1]).expand(x.shape[0], -1)
        )
        allowed = pos[:, None, :] <= pos[:, :, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]
        scores = (q @ k.transpose(1, 2)).masked_fill(~allowed, float("-inf"))
        return x + scores.softmax(-1) @ v


class Recorder(nn.Module):
    """Records what it was called with; returns ``2 * x`` (so changed tokens are visible)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Tensor | None]] = []

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        self.calls.append({"x": x.detach().clone(), "mask": attention_mask, "pos": position_ids})
        return 2 * x


GATES = {
    "sigmoid": torch.sigmoid,
    "identity": lambda r: r,
    "tanh": torch.tanh,
    "none": torch.ones_like,
}


def naive_choice(scores: list[float], real: list[int], capacity: float) -> list[int]:
    """Top ceil(c * n_real) of the real indices by score, ties to the lower index, sorted."""
    k = math.ceil(capacity * len(real))
    ranked = sorted(real, key=lambda t: (-scores[t], t))
    return sorted(ranked[:k])


def naive_mod(
    mod: pm.MixtureOfDepths,
    x: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    chosen: list[list[int]] | None = None,
) -> Tensor:
    """Per-row loop: choose, run the block on that row's chosen tokens only, update them."""
    batch, seq_len, _ = x.shape
    scores = x @ mod.router.weight[0]
    rows = []
    for b in range(batch):
        real = [t for t in range(seq_len) if attention_mask is None or bool(attention_mask[b, t])]
        picks = (
            chosen[b]
            if chosen is not None
            else naive_choice(scores[b].tolist(), real, mod.capacity)
        )
        row = [x[b, t] for t in range(seq_len)]
        if picks:
            pos = torch.tensor(picks) if position_ids is None else position_ids[b, picks]
            y = mod.block(x[b, picks].unsqueeze(0), position_ids=pos.unsqueeze(0))[0]
            for j, t in enumerate(picks):
                delta = y[j] - x[b, t] if mod.block_returns_residual else y[j]
                row[t] = x[b, t] + GATES[mod.gate](scores[b, t]) * delta
        rows.append(torch.stack(row))
    return torch.stack(rows)


def grads(loss: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, tensors, allow_unused=False))


def make_mod(block: nn.Module | None = None, seed: int = 0, **kwargs) -> pm.MixtureOfDepths:
    torch.manual_seed(seed)
    return pm.MixtureOfDepths(block if block is not None else attention_block(), DIM, **kwargs)


# ---------------------------------------------------------------- training: top-k semantics


def test_capacity_one_with_unit_gate_equals_the_plain_block():
    mod = make_mod(capacity=1.0, gate="none")
    x = torch.randn(3, 10, DIM, requires_grad=True)
    out = mod(x)
    ref = mod.block(x)
    torch.testing.assert_close(out, ref)
    params = list(mod.block.parameters())
    g_out = grads(out.square().sum(), [x, *params])
    g_ref = grads(ref.square().sum(), [x, *params])
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gate", ["sigmoid", "identity", "tanh"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_forward_and_gradients_match_naive_per_row_loop(gate, padding):
    mod = make_mod(capacity=0.3, gate=gate)
    batch, seq_len = 3, 11
    x = torch.randn(batch, seq_len, DIM, requires_grad=True)
    mask = pos = None
    if padding != "none":
        lengths = [11, 7, 4]
        mask = torch.zeros(batch, seq_len, dtype=torch.bool)
        for b, n in enumerate(lengths):
            if padding == "right":
                mask[b, :n] = True
            else:
                mask[b, seq_len - n :] = True
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    out = mod(x, attention_mask=mask, position_ids=pos)
    ref = naive_mod(mod, x, mask, pos)
    torch.testing.assert_close(out, ref)
    weight = torch.randn_like(out)
    params = [x, mod.router.weight, *mod.block.parameters()]
    for a, b in zip(
        grads((out * weight).sum(), params), grads((ref * weight).sum(), params), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_exactly_k_tokens_change_per_row_and_the_rest_are_bit_exact():
    mod = make_mod(capacity=0.3)
    x = torch.randn(4, 13, DIM)
    out = mod(x)
    changed = (out != x).any(-1)
    k = math.ceil(0.3 * 13)
    assert changed.sum(-1).tolist() == [k] * 4
    assert torch.equal(out[~changed], x[~changed])
    assert mod.stats is not None
    assert int(mod.stats.processed_tokens) == 4 * k
    assert float(mod.stats.realized_capacity) == pytest.approx(k / 13)


def test_block_runs_on_the_gathered_tokens_only_in_order_with_true_positions():
    recorder = Recorder()
    mod = make_mod(recorder, capacity=0.25)
    batch, seq_len = 3, 10
    x = torch.randn(batch, seq_len, DIM)
    position_ids = torch.arange(100, 100 + seq_len).expand(batch, -1)
    mod(x, position_ids=position_ids)
    (call,) = recorder.calls
    k = math.ceil(0.25 * seq_len)
    assert call["x"].shape == (batch, k, DIM)  # compute saved: [B, ceil(c*T), D]
    assert call["mask"] is None  # every slot real: the block may take its fast path
    scores = (x @ mod.router.weight[0]).tolist()
    for b in range(batch):
        picks = naive_choice(scores[b], list(range(seq_len)), 0.25)
        assert call["pos"][b].tolist() == [100 + t for t in picks]  # original order, positions
        assert torch.equal(call["x"][b], x[b, picks])


def test_ties_go_to_the_lower_index_and_padding_is_never_selected():
    recorder = Recorder()
    mod = make_mod(recorder, capacity=0.5)
    x = torch.zeros(2, 8, DIM)  # every score ties at 0
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False  # left padding in row 1: 5 real tokens -> k = 3
    mod(x, attention_mask=mask)
    (call,) = recorder.calls
    assert call["pos"][0].tolist() == [0, 1, 2, 3]
    assert call["pos"][1, :3].tolist() == [3, 4, 5]
    assert call["mask"].tolist() == [[True] * 4, [True, True, True, False]]


def test_right_padding_does_not_change_real_tokens():
    mod = make_mod(capacity=0.3)
    x = torch.randn(2, 9, DIM)
    junk = 100 * torch.randn(2, 5, DIM)
    padded = torch.cat([x, junk], dim=1)
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 5)], dim=1).bool()
    for mode in ("train", "eval"):
        getattr(mod, mode)()
        out = mod(padded, attention_mask=mask)
        torch.testing.assert_close(out[:, :9], mod(x))
        assert torch.equal(out[:, 9:], junk)  # padding returned unchanged


def test_batch_rows_are_independent():
    mod = make_mod(capacity=0.4)
    x = torch.randn(4, 12, DIM)
    out = mod(x)
    for b in range(4):
        torch.testing.assert_close(out[b : b + 1], mod(x[b : b + 1]))


def test_block_without_mask_or_positions_works_as_is():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(DIM, 32), nn.GELU(), nn.Linear(32, DIM))
    mod = pm.MixtureOfDepths(mlp, DIM, capacity=0.5, block_returns_residual=False)
    x = torch.randn(2, 6, DIM)
    out = mod(x)
    scores = x @ mod.router.weight[0]
    for b in range(2):
        picks = naive_choice(scores[b].tolist(), list(range(6)), 0.5)
        expected = x[b, picks] + torch.sigmoid(scores[b, picks])[:, None] * mlp(x[b, picks])
        torch.testing.assert_close(out[b, picks], expected)


# ---------------------------------------------------------------- invalid slots, dtypes


def test_a_row_with_nothing_selected_gives_no_nan_with_a_naive_softmax_block():
    torch.manual_seed(0)
    mod = pm.MixtureOfDepths(NaiveAttention(), DIM, capacity=0.5)
    x = torch.randn(3, 6, DIM, requires_grad=True)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False  # an all-padding row: nothing selected
    mask[2, 4:] = False  # fewer slots than the widest row: invalid slots in the gathered batch
    out = mod(x, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], x[1])
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mod.block.parameters())
    torch.testing.assert_close(out, naive_mod(mod, x, mask))
    # eval: per-token decisions (router logit > 0) that select nothing in row 1
    mod = pm.MixtureOfDepths(NaiveAttention(), DIM, causal_router="router_bce").eval()
    w = mod.router.weight[0].detach()
    x = torch.randn(2, 6, DIM)
    x = x - (x @ w)[..., None] * w / w.square().sum()  # scores 0 ...
    x[0, 2:4] += w  # ... except two positive scores in row 0
    x[1] -= w  # ... and all negative in row 1
    x.requires_grad_(True)
    out = mod(x)
    assert mod.stats.processed_per_row.tolist() == [2, 0]
    assert torch.isfinite(out).all() and torch.equal(out[1], x[1])
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mod.block.parameters())
    torch.testing.assert_close(out, naive_mod(mod, x, chosen=[[2, 3], []]))


class NaNOnInvalid(nn.Module):
    """Returns ``2 * x`` on real slots and NaN on invalid ones: a worst-case block."""

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            return 2 * x
        return torch.where(attention_mask[..., None], 2 * x, float("nan"))


def test_invalid_slots_are_zeroed_with_where_so_nan_never_leaks():
    torch.manual_seed(0)
    mod = pm.MixtureOfDepths(NaNOnInvalid(), DIM, capacity=0.5)
    x = torch.randn(2, 6, DIM, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # row 1: k = 2 of a 3-slot gathered batch
    out = mod(x, attention_mask=mask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(mod.router.weight.grad).all()


def test_invalid_slots_see_a_real_key_in_a_naive_softmax_block():
    """An invalid slot is placed at its row's last processed position: under the position rule
    it attends to real keys, so a naive softmax block makes no NaN that 0 * NaN could spread
    into the gradients."""
    torch.manual_seed(0)
    mod = pm.MixtureOfDepths(NaiveAttention(), DIM, capacity=0.5)
    w = mod.router.weight[0].detach()
    x = torch.randn(2, 6, DIM)
    x[1, 0] = -10 * w / w.norm()  # row 1's first token is skipped: the invalid slot gathers it
    x.requires_grad_(True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    out = mod(x, attention_mask=mask)
    assert mod.stats.processed_per_row.tolist() == [3, 2]
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mod.block.parameters())
    torch.testing.assert_close(out, naive_mod(mod, x, mask))


class FullMaskAttention(nn.Module):
    """Single-head attention taking a full bool mask ``[B, Q, K]``; returns ``x + attn(x)``."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def test_mask_adapter_passes_the_position_rule_as_a_full_mask():
    torch.manual_seed(0)
    inner = FullMaskAttention()
    mod = pm.MixtureOfDepths(pm.mod.MaskAdapter(inner), DIM, capacity=0.5)
    x = torch.randn(3, 8, DIM)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    out = mod(x, attention_mask=mask)
    scores = (x @ mod.router.weight[0]).tolist()
    for b in range(3):
        real = [t for t in range(8) if mask[b, t]]
        picks = naive_choice(scores[b], real, 0.5)
        causal = torch.ones(len(picks), len(picks), dtype=torch.bool).tril()[None]
        y = inner(x[b, picks][None], attn_mask=causal)[0]
        gate = torch.sigmoid(torch.tensor([scores[b][t] for t in picks]))[:, None]
        torch.testing.assert_close(out[b, picks], x[b, picks] + gate * (y - x[b, picks]))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_bf16_autocast():
    mod = make_mod(capacity=0.5)
    x = torch.randn(2, 8, DIM, requires_grad=True)
    ref = mod(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(x)
    assert out.dtype == torch.float32
    changed = (ref != x).any(-1)
    assert torch.equal((out != x).any(-1), changed)  # same routing: router math in float32
    assert torch.equal(out[~changed], x.detach()[~changed])
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and mod.router.weight.grad is not None
    x16 = x.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = mod(x16)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16.float()).all()


# ---------------------------------------------------------------- causality


def causal_mod(seed: int = 0, causal_router: str = "predictor") -> pm.MixtureOfDepths:
    mod = make_mod(seed=seed, capacity=0.5, causal_router=causal_router)
    mod.calibrate_threshold(torch.randn(8, 16, DIM))  # so about half the tokens are processed
    return mod.eval()


def test_topk_training_mode_is_not_causal():
    """The leak test below must be able to fail: top-k over the sequence leaks the future."""
    mod = make_mod(capacity=0.25)
    x = torch.randn(1, 12, DIM)
    out = mod(x)
    # make the last tokens the highest-scoring: they push earlier tokens out of the top-k
    w = mod.router.weight[0].detach()
    future = x.clone()
    future[:, 8:] = 10 * w / w.norm() + 0.01 * torch.randn(1, 4, DIM)
    out_future = mod(future)
    assert not torch.allclose(out[:, :8], out_future[:, :8])


@pytest.mark.parametrize("causal_router", ["predictor", "router_bce"])
def test_eval_causal_mode_does_not_leak_the_future(causal_router):
    mod = causal_mod(causal_router=causal_router)
    x = torch.randn(3, 12, DIM)
    out = mod(x)
    assert 0 < int(mod.stats.processed_tokens) < 36  # a non-trivial routing
    future = x.clone()
    w = mod.router.weight[0]
    future[:, 8:] = 10 * w / w.norm() + torch.randn(3, 4, DIM)
    out_future = mod(future)
    torch.testing.assert_close(out[:, :8], out_future[:, :8])
    assert not torch.allclose(out[:, 8:], out_future[:, 8:])


def _jacobian_upper(mod: nn.Module, x: Tensor) -> Tensor:
    """Largest |d out[t] / d x[s]| over s > t (zero for a causal map)."""
    jac = torch.autograd.functional.jacobian(lambda inp: mod(inp)[0], x)  # [T, D, 1, T, D]
    per_pair = jac.abs().sum(dim=(1, 2, 4))  # [T_out, T_in]
    return per_pair.triu(diagonal=1).max()


def test_eval_causal_mode_jacobian_is_lower_triangular():
    mod = causal_mod()
    x = torch.randn(1, 8, DIM)
    mod(x)
    assert 0 < int(mod.stats.processed_tokens) < 8
    assert float(_jacobian_upper(mod, x)) == 0.0
    # the same check catches a leaking block: bidirectional attention inside the wrapper
    torch.manual_seed(0)
    leaky = pm.MixtureOfDepths(pm.MHSA(DIM, 2, causal=False), DIM, block_returns_residual=False)
    leaky.threshold = mod.threshold
    leaky.load_state_dict(
        {**leaky.state_dict(), **{k: v for k, v in mod.state_dict().items() if "block" not in k}}
    )
    leaky.eval()
    assert float(_jacobian_upper(leaky, x)) > 0.0


def test_eval_causal_mode_prefix_consistency():
    mod = causal_mod()
    x = torch.randn(2, 14, DIM)
    full = mod(x)
    for t in (1, 5, 9, 13):
        torch.testing.assert_close(mod(x[:, :t]), full[:, :t])


def test_eval_decisions_are_per_token_threshold_on_the_predictor():
    mod = causal_mod()
    x = torch.randn(2, 10, DIM)
    out = mod(x)
    hidden = F.silu(x @ mod.predictor[0].weight.T + mod.predictor[0].bias)
    logits = (hidden @ mod.predictor[2].weight.T + mod.predictor[2].bias)[..., 0]
    expected = torch.sigmoid(logits) > mod.threshold
    assert torch.equal((out != x).any(-1), expected)
    assert mod.stats.causal
    assert int(mod.stats.processed_tokens) == int(expected.sum())


# ---------------------------------------------------------------- losses and gradients


@pytest.mark.parametrize("causal_router", ["predictor", "router_bce"])
def test_bce_targets_are_built_per_row(causal_router):
    mod = make_mod(capacity=0.3, causal_router=causal_router)
    batch, seq_len = 3, 10
    x = torch.randn(batch, seq_len, DIM)
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, :3] = False
    mod(x, attention_mask=mask)
    scores = (x @ mod.router.weight[0]).tolist()
    logits = mod.causal_logits(x)
    total, count = 0.0, 0
    for b in range(batch):
        real = [t for t in range(seq_len) if mask[b, t]]
        picks = naive_choice(scores[b], real, 0.3)
        for t in real:
            target = 1.0 if t in picks else 0.0
            total = total + F.binary_cross_entropy_with_logits(logits[b, t], torch.tensor(target))
            count += 1
    expected = total / count
    torch.testing.assert_close(mod.aux_losses["mod_bce"], expected.detach())
    torch.testing.assert_close(mod.aux_loss, mod.aux_loss_coef * expected)
    assert mod.aux_loss.requires_grad
    model = nn.Sequential(mod)
    torch.testing.assert_close(pm.aux_loss(model), mod.aux_loss)


def test_stop_gradient_both_ways_with_the_predictor():
    mod = make_mod(capacity=0.3)
    x = torch.randn(2, 10, DIM, requires_grad=True)
    out = mod(x)
    predictor = list(mod.predictor.parameters())
    main = [x, mod.router.weight, *mod.block.parameters()]
    # task loss: nothing reaches the predictor
    for g in torch.autograd.grad(
        out.square().sum(), predictor, allow_unused=True, retain_graph=True
    ):
        assert g is None or not g.any()
    # predictor loss: nothing reaches the main path, and the predictor does learn
    for g in torch.autograd.grad(mod.aux_loss, main, allow_unused=True, retain_graph=True):
        assert g is None or not g.any()
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(mod.aux_loss, predictor))


@pytest.mark.parametrize("gate", ["sigmoid", "identity", "tanh"])
def test_router_gets_gradient_from_the_task_loss(gate):
    mod = make_mod(capacity=0.3, gate=gate)
    out = mod(torch.randn(2, 10, DIM))
    (g,) = torch.autograd.grad(out.square().sum(), [mod.router.weight])
    assert g.abs().sum() > 0


def test_predictor_learns_to_imitate_topk():
    """A few Adam steps on the BCE alone make the causal decision agree with top-k."""
    torch.manual_seed(1)
    mod = pm.MixtureOfDepths(
        nn.Linear(DIM, DIM), DIM, capacity=0.25, block_returns_residual=False, aux_loss_coef=1.0
    )
    opt = torch.optim.Adam(mod.predictor.parameters(), lr=1e-2)
    x = torch.randn(16, 32, DIM)
    mod(x)
    before = float(mod.stats.predictor_agreement)
    for _ in range(150):
        opt.zero_grad()
        mod(x)
        mod.aux_loss.backward()
        opt.step()
    assert float(mod.stats.predictor_agreement) > max(before, 0.9)
    mod.eval()
    mod(x)
    assert abs(float(mod.stats.realized_capacity) - 0.25) < 0.1


# ---------------------------------------------------------------- calibration, stats, errors


def test_threshold_calibration_hits_the_target_capacity():
    mod = make_mod(capacity=0.25).eval()
    x = torch.randn(4, 50, DIM)
    threshold = mod.calibrate_threshold(x)
    assert mod.threshold == threshold
    mod(x)
    assert int(mod.stats.processed_tokens) == 50  # ceil(0.25 * 200)
    mod.calibrate_threshold(x, capacity=0.6)
    mod(x)
    assert float(mod.stats.realized_capacity) == pytest.approx(0.6)
    model = nn.Sequential(make_mod(capacity=0.5, seed=1), make_mod(capacity=0.2, seed=2))
    thresholds = pm.calibrate_thresholds(model, [x])
    assert len(thresholds) == 2
    model.eval()
    model(x)
    assert float(model[0].stats.realized_capacity) == pytest.approx(0.5)
    assert float(model[1].stats.realized_capacity) == pytest.approx(0.2)
    assert model[0].threshold == thresholds[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity": 0.0}, "capacity.*0.0"),
        ({"capacity": 1.5}, "capacity.*1.5"),
        ({"capacity": -0.1}, "capacity.*-0.1"),
        ({"gate": "relu"}, "gate.*relu"),
        ({"causal_router": "oracle"}, "causal_router.*oracle"),
        ({"threshold": 1.0}, "threshold.*1.0"),
        ({"aux_loss_coef": -1.0}, "aux_loss_coef.*-1.0"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pm.MixtureOfDepths(nn.Identity(), DIM, **kwargs)


def test_block_output_of_the_wrong_shape_raises():
    mod = pm.MixtureOfDepths(nn.Linear(DIM, DIM + 1), DIM, capacity=0.5)
    with pytest.raises(ValueError, match=r"block: expected an output of shape \(2, 3, 16\)"):
        mod(torch.randn(2, 6, DIM))
    with pytest.raises(ValueError, match="x: expected shape"):
        pm.MixtureOfDepths(nn.Identity(), DIM)(torch.randn(2, 6, DIM + 1))
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        pm.MixtureOfDepths(nn.Identity(), DIM)(torch.randn(2, 6, DIM), torch.ones(2, 5))


def test_alias_and_exports():
    assert pm.MoDLayer is pm.MixtureOfDepths
    assert pm.mod.MixtureOfDepths is pm.MixtureOfDepths


def test_readme_mixture_of_depths_example_runs():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Mixture-of-Depths", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    mod = namespace["mod"]
    assert isinstance(mod, pm.MixtureOfDepths) and mod.stats.causal


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph breaks", "fullgraph"])
@pytest.mark.parametrize("causal_router", ["predictor", "router_bce"])
def test_torch_compile_matches_eager_in_training_and_eval(causal_router, fullgraph):
    """torch.compile equals eager: with graph breaks (eager MoD syncs once per forward for the
    gathered width) and fullgraph (compiled, the width is a static bound: ceil(c * T) for
    top-k, T for causal decisions)."""
    torch.manual_seed(0)
    dim = 32
    block = Block(ModelConfig(dim=dim, num_heads=4, ffn_hidden=64), layer=0)
    mod = pm.MixtureOfDepths(block, dim, capacity=0.25, causal_router=causal_router)
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=fullgraph)
    x = torch.randn(2, 16, dim, requires_grad=True)
    for training in (True, False):
        mod.train(training)
        eager_y = mod(x)
        (eager_g,) = torch.autograd.grad(eager_y.square().sum(), x)
        compiled_y = compiled(x)
        (compiled_g,) = torch.autograd.grad(compiled_y.square().sum(), x)
        torch.testing.assert_close(compiled_y, eager_y)
        torch.testing.assert_close(compiled_g, eager_g)


@pytest.mark.parametrize(("batch", "padded"), [(1, False), (3, False), (3, True)])
def test_decode_step_equals_the_general_route(batch, padded):
    """One token per row in eval (decoding): the sort-free decode step gives what the general
    gather/scatter route gives, bit for bit, and a step no row selects never calls the block."""
    torch.manual_seed(11)

    class CachedBlock(nn.Module):  # takes a (here unused) per-row state, as a KV cache would
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(DIM, DIM)

        def forward(self, x: Tensor, attention_mask=None, position_ids=None, cache=None):
            assert cache is state
            return torch.tanh(self.linear(x)) * (1 + position_ids[..., None])

    state = object()
    mod = pm.MixtureOfDepths(CachedBlock(), DIM, 0.5).eval()
    x = torch.randn(batch, 1, DIM)
    mask = torch.ones(batch, 1, dtype=torch.bool)
    if padded:
        mask[1, 0] = False
    pos = torch.full((batch, 1), 7)
    for threshold in (0.0, 0.5, 0.999):  # everything, some, nothing selected
        mod.threshold = threshold
        with torch.no_grad():
            fast = mod(x, attention_mask=mask if padded else None, position_ids=pos, cache=state)
            r = mod.router_logits(x)
            selected = (torch.sigmoid(mod.causal_logits(x, r)) > threshold) & mask
            general = mod._route(x, r, selected, pos, not padded, {"cache": state})
        assert torch.equal(fast, general), threshold
        assert torch.equal(mod.stats.processed_per_row, selected.sum(-1))

    calls = []
    mod.block.register_forward_hook(lambda module, args, out: calls.append(1))
    mod.threshold = 0.999999
    with torch.no_grad():
        assert torch.equal(mod(x, position_ids=pos, cache=state), x)
    assert calls == []


def test_per_row_k_is_the_exact_ceiling_of_capacity_times_real_tokens():
    """k = ceil(c * n_real) as decimals: 0.55 of 100 tokens is 55 (the float product is
    55.00000000000001, whose ceiling would be 56)."""
    assert math.ceil(0.55 * 100) == 56
    mod = pm.MixtureOfDepths(nn.Identity(), DIM, capacity=0.55).train()
    for n_real, want in ((100, 55), (20, 11), (3, 2), (1, 1)):
        mask = torch.zeros(2, 100, dtype=torch.bool)
        mask[:, :n_real] = True
        mod(torch.randn(2, 100, DIM), attention_mask=mask)
        assert mod.stats.processed_per_row.tolist() == [want, want], n_real
