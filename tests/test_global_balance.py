"""Global-batch load balancing, ``TopKRouter(balance="global")`` (Qiu et al. 2025).

Single process: one micro-batch equals the batch form; identical micro-batches equal one big
batch; the last micro-batch uses the whole step's counts (against a hand-written formula);
``end_balance_step`` resets; eval, checkpoint recomputation and torch.compile. Two gloo ranks
(tests/dist_workers.py): the ranks' mean loss and DDP's averaged router gradient equal one
process on the concatenated batch, with equal and unequal token counts and padding.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import dist_workers as w
import pytorch_mixtures as pm
from dist_harness import RankPool

D, E, K = 8, 4, 2


def routers(**kwargs: object) -> tuple[pm.TopKRouter, pm.TopKRouter]:
    """A global-balance router and a batch-balance one with the same weights."""
    torch.manual_seed(0)
    glob = pm.TopKRouter(D, E, K, init_std=1.0, balance="global", **kwargs)  # type: ignore[arg-type]
    batch = pm.TopKRouter(D, E, K, init_std=1.0, **kwargs)  # type: ignore[arg-type]
    batch.load_state_dict(glob.state_dict())
    return glob, batch


def balance(router: pm.TopKRouter, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The balance loss of one forward and its gradient in the gate weight."""
    loss = router(x, mask).aux_losses["load_balancing"]
    (grad,) = torch.autograd.grad(loss, router.gate.weight)
    return loss.detach(), grad


def batches(sizes: list[tuple[int, int]], padded: bool = True) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for b, t in sizes:
        mask = (torch.rand(b, t, generator=gen) > 0.3).long() if padded else torch.ones(b, t)
        mask[0, 0] = 1
        out.append((torch.randn(b, t, D, generator=gen), mask.long()))
    return out


def naive(
    weight: Tensor, counted: list[tuple[Tensor, Tensor]], averaged: tuple[Tensor, Tensor]
) -> tuple[Tensor, list[int]]:
    """``E * sum_e f_e * P_e`` by hand, ``f_e`` over the ``counted`` micro-batches' real tokens,
    ``P_e`` over the ``averaged`` one's; and the counts."""
    flat = [(x.reshape(-1, D), m.reshape(-1)) for x, m in counted]
    loss, counts, _ = w._naive_balance(
        weight, flat, [(averaged[0].reshape(-1, D), averaged[1].reshape(-1))]
    )
    return loss, counts


def test_default_stays_batch() -> None:
    assert pm.TopKRouter(D, E).balance == "batch"
    assert "balance='global'" in repr(pm.TopKRouter(D, E, balance="global"))


def test_one_micro_batch_equals_batch_balance() -> None:
    glob, batch = routers()
    ((x, mask),) = batches([(2, 5)])
    for m in (mask, None):
        got, got_grad = balance(glob, x, m)
        want, want_grad = balance(batch, x, m)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, want_grad)
        glob.end_balance_step()


def test_identical_micro_batches_equal_one_big_batch() -> None:
    glob, batch = routers()
    ((x, mask),) = batches([(2, 5)])
    steps = 3
    total = torch.zeros(())
    for _ in range(steps):  # the usual accumulation: each micro-batch's loss / steps
        loss = glob(x, mask).aux_losses["load_balancing"] / steps
        loss.backward()
        total += loss.detach()
    big = batch(x.repeat(steps, 1, 1), mask.repeat(steps, 1)).aux_losses["load_balancing"]
    big.backward()
    torch.testing.assert_close(total, big.detach())
    assert glob.gate.weight.grad is not None and batch.gate.weight.grad is not None
    torch.testing.assert_close(glob.gate.weight.grad, batch.gate.weight.grad)


def test_micro_batch_m_uses_the_counts_of_micro_batches_1_to_m() -> None:
    glob, _ = routers()
    micro = batches([(2, 5), (1, 7), (3, 2)])
    ref_weight = glob.gate.weight.detach().clone().requires_grad_(True)
    for m in range(len(micro)):
        got, got_grad = balance(glob, *micro[m])
        want, counts = naive(ref_weight, micro[: m + 1], micro[m])
        (want_grad,) = torch.autograd.grad(want, ref_weight)
        torch.testing.assert_close(got, want.detach())
        torch.testing.assert_close(got_grad, want_grad)
        assert glob.balance_counts is not None and glob.balance_counts.tolist() == counts
    # by the last micro-batch: the whole step's counts and real tokens
    assert glob.balance_tokens is not None
    assert int(glob.balance_tokens) == sum(int(mask.sum()) for _, mask in micro)
    assert int(glob.balance_counts.sum()) == K * int(glob.balance_tokens)


def test_end_balance_step_resets() -> None:
    glob, batch = routers()
    (x1, m1), (x2, m2) = batches([(2, 5), (1, 6)])
    layer = pm.MoELayer(D, glob, pm.MLPExperts(E, D, 16))
    layer(x1, attention_mask=m1)
    used = pm.end_balance_step(layer)
    assert list(used) == ["router"] and int(used["router"].sum()) == K * int(m1.sum())
    assert glob.balance_counts is None and glob.balance_tokens is None
    assert pm.end_balance_step(layer) == {}  # nothing counted since
    # the next step starts afresh: as the batch form of its first micro-batch
    torch.testing.assert_close(balance(glob, x2, m2), balance(batch, x2, m2))
    with pytest.raises(ValueError, match="balance='global'"):
        pm.end_balance_step(nn.Sequential(batch))
    with pytest.raises(ValueError, match="balance='global'"):
        batch.end_balance_step()


def test_eval_and_decode_use_the_batch_form_and_count_nothing() -> None:
    glob, batch = routers()
    ((x, mask),) = batches([(2, 5)])
    glob.eval()
    batch.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            glob(x, mask).aux_losses["load_balancing"], batch(x, mask).aux_losses["load_balancing"]
        )
        layer = pm.MoELayer(D, glob, pm.MLPExperts(E, D, 16)).eval()
        layer(x[:1, :1])  # decode-shaped call
        assert torch.isfinite(layer.aux_losses["load_balancing"])
    assert glob.balance_counts is None


def test_checkpoint_recomputation_counts_once() -> None:
    glob, batch = routers()
    ((x, mask),) = batches([(2, 5)])
    x = x.requires_grad_(True)
    loss = checkpoint(lambda v: glob(v, mask).aux_losses["load_balancing"], x, use_reentrant=False)
    loss.backward()
    assert glob.balance_tokens is not None and int(glob.balance_tokens) == int(mask.sum())
    want, want_grad = balance(batch, x, mask)
    torch.testing.assert_close(loss.detach(), want)
    assert glob.gate.weight.grad is not None
    torch.testing.assert_close(glob.gate.weight.grad, want_grad)


def test_compiles_without_graph_breaks() -> None:
    glob, batch = routers()
    (x1, m1), (x2, m2) = batches([(2, 5), (2, 5)])
    compiled = torch.compile(glob, backend="eager", fullgraph=True)
    compiled(x1, m1)
    got = compiled(x2, m2).aux_losses["load_balancing"]
    want, _ = naive(batch.gate.weight.detach(), [(x1, m1), (x2, m2)], (x2, m2))
    torch.testing.assert_close(got.detach(), want)


@pytest.fixture(scope="module")
def pool2() -> Iterator[RankPool]:
    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(pool2: RankPool) -> None:
    """Equal / unequal token counts, padding (over an explicit balance_group), two
    accumulation micro-batches: loss (mean over ranks), DDP router grad, counts."""
    pool2.run(w.check_global_balance, timeout_s=90)
