"""Expert parallelism on gloo: equivalence with the unsharded layer, DDP/FSDP2, checkpoints.

Every test runs on a pool of spawned ranks (tests/dist_harness.py) under a hard timeout; the
numerical checks run on the ranks (tests/dist_workers.py) against the unsharded layer computed
on every rank from the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dist_workers as w
import pytorch_mixtures as pm
from dist_harness import RankPool

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


@pytest.fixture(scope="module")
def pool2() -> Iterator[RankPool]:
    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool4() -> Iterator[RankPool]:
    pool = RankPool(4)
    yield pool
    pool.close()


def test_equivalence_world2(pool2: RankPool) -> None:
    """Outputs, input/router/expert grads, aux loss, stats at 2 ranks, every config."""
    pool2.run(w.equivalence_suite, timeout_s=90)


def test_equivalence_world4(pool4: RankPool) -> None:
    pool4.run(w.equivalence_suite, timeout_s=120)


@pytest.mark.parametrize("world", [2, 4])
def test_empty_input_on_some_ranks(pool2: RankPool, pool4: RankPool, world: int) -> None:
    """Ranks 1 (and 3) get [0, T, D] / [B, 0, D]: they join the all-to-alls, forward and
    backward, train and eval, and return empty; the others' outputs and grads are unchanged."""
    {2: pool2, 4: pool4}[world].run(w.empty_rank_suite, timeout_s=90)


@pytest.mark.parametrize("world", [2, 4])
def test_empty_input_under_ddp(pool2: RankPool, pool4: RankPool, world: int) -> None:
    """Two expert-parallel layers under DDP with empty ranks: every grad equals one process's
    (the empty ranks' routers get zero grads, so DDP's all-reduce pairs up)."""
    {2: pool2, 4: pool4}[world].run(w.check_empty_rank_ddp, timeout_s=90)


@pytest.mark.parametrize("world", [2, 4])
def test_mixture_of_depths_selecting_nothing(pool2: RankPool, pool4: RankPool, world: int) -> None:
    """Eval MoD over an expert-parallel MoE where ranks 1 (and 3) select no token: the block is
    skipped there, its exchanges are not; forward, backward and no-grad inference agree."""
    {2: pool2, 4: pool4}[world].run(w.check_mod_selects_nothing, timeout_s=90)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_world2(pool2: RankPool, mode: str) -> None:
    """Expert grads scaled 1/W (not W x), non-expert grads averaged, one SGD step agrees."""
    pool2.run(w.check_data_parallel, mode, timeout_s=90)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_world4(pool4: RankPool, mode: str) -> None:
    pool4.run(w.check_data_parallel, mode, timeout_s=90)


def _save_plain(path: Path, cfg: dict) -> None:
    pm.distributed.save_checkpoint(w.checkpoint_truth(cfg), str(path))


def _load_plain(path: Path, cfg: dict) -> None:
    net = w._other_init(cfg)
    pm.distributed.load_checkpoint(net, str(path))
    w._assert_state_equal(net.state_dict(), w.checkpoint_truth(cfg).state_dict())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize(
    ("save_on", "load_on", "cfg"),
    [
        (2, [4, 1], {}),
        (4, [2, 1], {"experts": "swiglu"}),
        (1, [2, 4], {}),
        (2, [4, 1], {"experts": "list"}),
        (2, [4, 1], {"fsdp": True}),
    ],
    ids=["2to4and1", "4to2and1-swiglu", "1to2and4", "2to4and1-modulelist", "fsdp2to4and1"],
)
def test_checkpoint_reshard(
    pool2: RankPool, pool4: RankPool, tmp_path: Path, save_on: int, load_on: list[int], cfg: dict
) -> None:
    """Save on N ranks, load on M: same unsharded state and same loss as the saved model."""
    pools = {2: pool2, 4: pool4}
    path = tmp_path / "ckpt"
    if save_on == 1:
        _save_plain(path, cfg)
    else:
        pools[save_on].run(w.checkpoint_save, str(path), cfg, timeout_s=90)
    for world in load_on:
        if world == 1:
            _load_plain(path, cfg)
        else:
            load_cfg = {k: v for k, v in cfg.items() if k != "fsdp"}
            pools[world].run(w.checkpoint_load, str(path), load_cfg, timeout_s=90)


def test_errors_world2(pool2: RankPool) -> None:
    pool2.run(w.check_errors, timeout_s=60)
    pool2.run(w.check_group_membership, timeout_s=60)


def test_errors_without_process_group() -> None:
    layer = pm.MoELayer(8, pm.TopKRouter(8, 4), pm.MLPExperts(4, 8, 16))
    if dist.is_initialized():  # pragma: no cover - pytest's process never joins a group
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        pm.distributed.expert_parallel(layer)
    with pytest.raises(TypeError, match="model"):
        pm.distributed.expert_parallel("not a model")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("dp", ["ddp", "fsdp"])
def test_example_trains_and_checkpoint_loads_unsharded(
    pool2: RankPool, tmp_path: Path, dp: str
) -> None:
    """examples/train_expert_parallel.py on 2 ranks; its checkpoint loads into 1 process."""
    path = tmp_path / "ckpt"
    pool2.run(w.run_example, dp, str(path), timeout_s=90)
    example = w.load_example()
    torch.manual_seed(0)
    fresh = example.TinyLM(vocab=64, dim=16, layers=2, num_experts=4, top_k=2)
    initial = {k: v.clone() for k, v in fresh.state_dict().items()}
    pm.distributed.load_checkpoint(fresh, str(path))  # strict: every key present, right shapes
    changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, initial[k])]
    assert "blocks.0.moe.experts.w_gate_up" in changed and "embed.weight" in changed


def test_group_by_expert_order_matches_a_loop() -> None:
    """The vectorised regrouping of received rows equals the obvious nested loop."""
    from pytorch_mixtures.distributed.expert_parallel import _group_by_expert_order

    def loop(counts: list[list[int]]) -> list[int]:
        starts, offset = {}, 0
        for src, row in enumerate(counts):
            for expert, count in enumerate(row):
                starts[src, expert] = offset
                offset += count
        return [
            starts[src, expert] + i
            for expert in range(len(counts[0]))
            for src in range(len(counts))
            for i in range(counts[src][expert])
        ]

    gen = torch.Generator().manual_seed(0)
    for trial in range(100):
        world = int(torch.randint(1, 6, (1,), generator=gen))
        local = int(torch.randint(1, 4, (1,), generator=gen))
        counts_WL = torch.randint(0, 4, (world, local), generator=gen)
        if trial % 4 == 0:
            counts_WL[0] = 0  # a source that sends nothing
        got = _group_by_expert_order(counts_WL, int(counts_WL.sum()))
        assert got.tolist() == loop(counts_WL.tolist())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize(
    ("save_on", "mode", "load_on"),
    [(2, "ddp", [4, 1]), (4, "fsdp", [2])],
    ids=["ddp2to4and1", "fsdp4to2"],
)
def test_resume_training_with_optimizer_state(
    pool2: RankPool, pool4: RankPool, tmp_path: Path, save_on: int, mode: str, load_on: list[int]
) -> None:
    """Model + AdamW state saved on N ranks resume on M: the next step equals one process's."""
    pools = {2: pool2, 4: pool4}
    path = str(tmp_path / "ckpt")
    pools[save_on].run(w.resume_save, path, mode, timeout_s=90)
    for world in load_on:
        if world > 1:
            pools[world].run(w.resume_load, path, save_on, mode, timeout_s=90)
            continue
        net = w._resume_net()
        optim = w._adamw(net)
        pm.distributed.load_checkpoint(net, path, optim)
        w._net_loss(net, 0).backward()
        optim.step()
        ref = w.resume_reference(save_on, 1)
        with torch.no_grad():
            torch.testing.assert_close(w._net_loss(net, 0), w._net_loss(ref, 0))
