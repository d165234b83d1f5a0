"""Functions run on every rank by the distributed tests (see dist_harness.run_ranks).

Every rank builds the same unsharded model from the same seed, so each rank can compute the
single-process reference for *all* ranks' batches itself and compare locally.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import pytorch_mixtures as pm

DIM, HIDDEN = 8, 12
ATOL, RTOL = 1e-5, 1e-5


def make_layer(cfg: dict[str, Any], world: int) -> pm.MoELayer:
    num_experts = cfg.get("experts_per_rank", 2) * world
    torch.manual_seed(0)
    if cfg.get("router", "topk") == "expert_choice":
        router: pm.Router = pm.ExpertChoiceRouter(DIM, num_experts, capacity_factor=1.5)
    else:
        router = pm.TopKRouter(
            DIM,
            num_experts,
            top_k=cfg.get("top_k", 2),
            capacity_factor=cfg.get("capacity_factor"),
            normalize_weights=cfg.get("top_k", 2) > 1,
            init_std=1.0,
        )
    kind = cfg.get("experts", "mlp")
    if kind == "mlp":
        experts: Any = pm.MLPExperts(num_experts, DIM, HIDDEN)
    elif kind == "swiglu":
        experts = pm.SwiGLUExperts(num_experts, DIM, HIDDEN)
    else:
        experts = [
            nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM))
            for _ in range(num_experts)
        ]
    layer = pm.MoELayer(DIM, router, experts)
    if cfg.get("skew"):
        # every token prefers the experts of rank 0: the other ranks receive zero rows
        with torch.no_grad():
            weight = layer.router.gate.weight
            weight.zero_()
            weight[: num_experts // world] = 5.0
            weight[:, :] += 0.01 * torch.randn_like(weight)
    return layer


def make_batch(cfg: dict[str, Any], rank: int) -> tuple[Tensor, Tensor | None, Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    batch, seq = 1 + rank % 3, 5 + 2 * rank  # uneven loads across ranks
    x = torch.randn(batch, seq, DIM, generator=gen)
    if cfg.get("skew"):
        x = x.abs()  # positive inputs + positive gate rows of rank 0's experts
    mask = None
    if cfg.get("padding"):
        mask = (torch.rand(batch, seq, generator=gen) > 0.3).long()
        if rank == cfg.get("empty_rank", -1):
            mask.zero_()  # this rank routes (and sends) no token at all
    grad_out = torch.randn(batch, seq, DIM, generator=gen)
    return x, mask, grad_out


def _close(name: str, got: Tensor, want: Tensor) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.allclose(got, want, atol=ATOL, rtol=RTOL, equal_nan=True):
        err = (got - want).abs().max().item()
        raise AssertionError(f"{name}: max abs error {err:.3e}")


def _grads(module: nn.Module) -> dict[str, Tensor]:
    return {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in module.named_parameters()
    }


def _expert_grads_global(layer: pm.MoELayer) -> dict[str, Tensor]:
    """Unsharded experts' parameter gradients keyed as in the unsharded state dict."""
    return {f"experts.{n}": g for n, g in _grads(layer.experts).items()}


def _local_expert_grads_as_global(layer: pm.MoELayer) -> dict[str, Tensor]:
    ep = layer.experts
    assert isinstance(ep, pm.distributed.ExpertParallelExperts)
    out = {}
    for name, grad in _grads(ep.local).items():
        if isinstance(ep.local, pm.ModuleListExperts):
            _, index, rest = name.split(".", 2)
            out[f"experts.experts.{ep.first_expert + int(index)}.{rest}"] = grad
        else:
            out[f"experts.{name}"] = grad
    return out


def _slice_reference(ref: dict[str, Tensor], ep: pm.distributed.ExpertParallelExperts) -> dict:
    first, count = ep.first_expert, ep.num_local_experts
    if isinstance(ep.local, pm.ModuleListExperts):
        keep = {f"experts.experts.{e}." for e in range(first, first + count)}
        return {k: v for k, v in ref.items() if any(k.startswith(p) for p in keep)}
    return {k: v[first : first + count] for k, v in ref.items()}


def _subgroup(rank: int, world: int, size: int) -> tuple[Any, list[int]]:
    """Split the world into consecutive groups of ``size`` ranks; return this rank's."""
    mine: tuple[Any, list[int]] = (None, [])
    for start in range(0, world, size):
        ranks = list(range(start, start + size))
        group = dist.new_group(ranks)  # collective: every rank creates every group
        if rank in ranks:
            mine = (group, ranks)
    return mine


def check_equivalence(rank: int, world: int, cfg: dict[str, Any]) -> None:
    """One config: outputs, input grads, router grads, expert grads, aux loss, stats."""
    group, peers = None, list(range(world))
    if cfg.get("group_size"):
        group, peers = _subgroup(rank, world, cfg["group_size"])
    reference = make_layer(cfg, len(peers))
    layer = pm.distributed.expert_parallel(copy.deepcopy(reference), group)
    assert isinstance(layer, pm.MoELayer)
    assert isinstance(layer.experts, pm.distributed.ExpertParallelExperts)
    assert layer.experts.local.num_experts == reference.num_experts // len(peers)

    x, mask, grad_out = make_batch(cfg, rank)
    x.requires_grad_(rank != cfg.get("no_grad_rank"))
    y = layer(x, mask)
    (y * grad_out).sum().backward()
    aux = layer.aux_loss.detach().clone()

    # the unsharded reference on every rank's batch; expert grads summed over ranks
    ref_expert_grads: dict[str, Tensor] = {}
    global_tokens = torch.zeros(reference.num_experts, dtype=torch.long)
    global_real_tokens, global_entropy = 0, torch.zeros(())
    for src in peers:
        reference.zero_grad(set_to_none=True)
        x_ref, mask_ref, grad_ref = make_batch(cfg, src)
        x_ref.requires_grad_(True)
        y_ref = reference(x_ref, mask_ref)
        (y_ref * grad_ref).sum().backward()
        assert reference.stats is not None
        global_tokens += reference.stats.tokens_per_expert
        global_real_tokens += int(reference.stats.num_tokens)
        global_entropy += reference.stats.router_entropy * int(reference.stats.num_tokens)
        for key, grad in _expert_grads_global(reference).items():
            ref_expert_grads[key] = ref_expert_grads.get(key, 0) + grad
        if src == rank:
            _close("output", y, y_ref)
            assert x_ref.grad is not None
            if x.requires_grad:
                assert x.grad is not None
                _close("input grad", x.grad, x_ref.grad)
            _close("aux loss", aux, reference.aux_loss.detach())
            for name, grad in _grads(reference.router).items():
                _close(f"router grad {name}", _grads(layer.router)[name], grad)
            assert layer.stats is not None
            assert torch.equal(layer.stats.tokens_per_expert, reference.stats.tokens_per_expert)

    want = _slice_reference(ref_expert_grads, layer.experts)
    got = _local_expert_grads_as_global(layer)
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key in want:
        _close(f"expert grad {key}", got[key], want[key])

    stats = pm.distributed.global_routing_stats(layer, group)
    assert torch.equal(stats.tokens_per_expert, global_tokens), (stats, global_tokens)
    assert int(stats.num_tokens) == global_real_tokens
    _close(
        "global router entropy", stats.router_entropy, global_entropy / max(global_real_tokens, 1)
    )
    local = layer.experts.num_local_experts
    if cfg.get("skew"):  # the case is what it claims: ranks >= 1 receive no row
        assert global_tokens[local:].sum() == 0 and global_tokens[:local].sum() > 0
    if rank == cfg.get("empty_rank"):  # and this rank sends no row
        assert layer.stats.tokens_per_expert.sum() == 0


EQUIVALENCE_CONFIGS: list[dict[str, Any]] = [
    {"name": "top2 dropless mlp"},
    {"name": "top1 dropless swiglu", "top_k": 1, "experts": "swiglu"},
    {"name": "top2 capacity 0.5 mlp", "capacity_factor": 0.5},
    {"name": "top3 capacity 1.0 swiglu", "top_k": 3, "capacity_factor": 1.0, "experts": "swiglu"},
    {"name": "module-list experts", "experts": "list"},
    {"name": "expert choice", "router": "expert_choice"},
    {"name": "rank 1 sends nothing", "padding": True, "empty_rank": 1},
    {"name": "only rank 0 receives", "skew": True, "top_k": 1},
    {"name": "rank 1 input needs no grad", "no_grad_rank": 1},
    {"name": "one expert per rank", "experts_per_rank": 1, "top_k": 1},
]


def equivalence_suite(rank: int, world: int) -> None:
    configs = list(EQUIVALENCE_CONFIGS)
    if world == 4:
        configs.append({"name": "two groups of 2 ranks", "group_size": 2, "top_k": 3})
    for cfg in configs:
        try:
            check_equivalence(rank, world, cfg)
        except AssertionError as error:
            raise AssertionError(f"[{cfg['name']}, world {world}] {error}") from error


def _empty_ranks(world: int) -> set[int]:
    return {1} if world == 2 else {1, 3}


def _empty_input(cfg: dict[str, Any]) -> Tensor:
    return torch.zeros((0, 5, DIM) if cfg["empty"] == "batch" else (2, 0, DIM))


def check_empty_rank(rank: int, world: int, cfg: dict[str, Any]) -> None:
    """Ranks with an empty input join the exchanges: the others' results are unchanged."""
    empty_ranks = _empty_ranks(world)
    reference = make_layer(cfg, world)
    layer = pm.distributed.expert_parallel(copy.deepcopy(reference))
    assert isinstance(layer, pm.MoELayer)
    assert isinstance(layer.experts, pm.distributed.ExpertParallelExperts)
    if cfg.get("eval"):
        layer.eval()
        reference.eval()
    empty = rank in empty_ranks
    if empty:
        x = _empty_input(cfg)
        grad_out = torch.zeros_like(x)
    else:
        x, _, grad_out = make_batch(cfg, rank)
    x.requires_grad_(True)
    if cfg.get("eval"):
        with torch.no_grad():  # inference: the exchanges pair up without autograd too
            y_inference = layer(x)
    y = layer(x) if cfg.get("kwarg") is None else layer(x=x)
    (y * grad_out).sum().backward()
    assert x.grad is not None
    if empty:
        assert y.shape == x.shape and y.numel() == 0 and y.dtype == x.dtype, y.shape
        assert x.grad.shape == x.shape
        for name, grad in _grads(layer.router).items():  # tied in: DDP sees every parameter
            assert layer.router.get_parameter(name).grad is not None, name
            assert not grad.any(), name

    ref_expert_grads: dict[str, Tensor] = {}
    for src in range(world):
        if src in empty_ranks:
            continue
        reference.zero_grad(set_to_none=True)
        x_ref, _, grad_ref = make_batch(cfg, src)
        x_ref.requires_grad_(True)
        y_ref = reference(x_ref)
        (y_ref * grad_ref).sum().backward()
        for key, grad in _expert_grads_global(reference).items():
            ref_expert_grads[key] = ref_expert_grads.get(key, 0) + grad
        if src == rank:
            _close("output", y, y_ref)
            if cfg.get("eval"):
                _close("inference output", y_inference, y_ref.detach())
            assert x_ref.grad is not None
            _close("input grad", x.grad, x_ref.grad)
            for name, grad in _grads(reference.router).items():
                _close(f"router grad {name}", _grads(layer.router)[name], grad)

    want = _slice_reference(ref_expert_grads, layer.experts)
    got = _local_expert_grads_as_global(layer)
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key in want:
        _close(f"expert grad {key}", got[key], want[key])


EMPTY_RANK_CONFIGS: list[dict[str, Any]] = [
    {"name": "train, empty batch", "empty": "batch"},
    {"name": "train, empty sequence, swiglu", "empty": "seq", "experts": "swiglu"},
    {
        "name": "train, empty batch, capacity, module list",
        "empty": "batch",
        "capacity_factor": 1.0,
        "experts": "list",
    },
    {"name": "train, x as a keyword", "empty": "seq", "kwarg": True},
    {"name": "eval, empty batch", "empty": "batch", "eval": True},
    {"name": "eval, empty sequence, top1", "empty": "seq", "eval": True, "top_k": 1},
]


def empty_rank_suite(rank: int, world: int) -> None:
    for cfg in EMPTY_RANK_CONFIGS:
        try:
            check_empty_rank(rank, world, cfg)
        except AssertionError as error:
            raise AssertionError(f"[{cfg['name']}, world {world}] {error}") from error


class TinyNet(nn.Module):
    """A dense projection, a residual MoE layer, and an output projection."""

    def __init__(self, layer: pm.MoELayer) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.moe = layer
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.out(h + self.moe(h))


def make_net(world: int, cfg: dict[str, Any] | None = None) -> TinyNet:
    cfg = cfg or {}
    layer = make_layer(cfg, world)
    torch.manual_seed(1)
    return TinyNet(layer)


def _net_loss(model: nn.Module, rank: int) -> Tensor:
    gen = torch.Generator().manual_seed(2000 + rank)
    x = torch.randn(2, 6, DIM, generator=gen)
    target = torch.randn(2, 6, DIM, generator=gen)
    return (model(x) - target).square().mean() + pm.aux_loss(model)


def _reference_step(world: int) -> tuple[TinyNet, dict[str, Tensor]]:
    """Single process: gradient of the mean over ranks of the ranks' losses."""
    ref = make_net(world)
    loss = sum(_net_loss(ref, src) for src in range(world)) / world
    assert isinstance(loss, Tensor)
    loss.backward()
    return ref, _grads(ref)


def _full(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def check_data_parallel(rank: int, world: int, mode: str) -> None:
    """DDP / FSDP2 over non-expert params + expert parallel == one process on the global batch."""
    ref, ref_grads = _reference_step(world)
    net = pm.distributed.expert_parallel(make_net(world))
    assert isinstance(net, TinyNet)
    ep = net.moe.experts
    assert isinstance(ep, pm.distributed.ExpertParallelExperts)
    if mode == "ddp":
        model: nn.Module = pm.distributed.ddp(net)
    else:
        model = pm.distributed.fully_shard(net, modules=[net.inp, net.out])
    optim = torch.optim.SGD(model.parameters(), lr=0.5)
    _net_loss(model, rank).backward()

    for name, param in net.named_parameters():
        assert param.grad is not None, name
        got = _full(param.grad)
        if name.startswith("moe.experts.local."):
            key = "moe.experts." + name.removeprefix("moe.experts.local.")
            want = ref_grads[key][ep.first_expert : ep.first_expert + ep.num_local_experts]
        else:
            want = ref_grads[name]
        _close(f"{mode} grad {name}", got, want)

    # clipping must see the global norm (all experts), then one step on both sides, and the
    # next forward must still agree
    norm = pm.distributed.clip_grad_norm_(model, 0.05)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    _close(f"{mode} total grad norm", norm, ref_norm)
    assert norm > 0.05  # so clipping really happened
    optim.step()
    ref_optim = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_optim.step()
    with torch.no_grad():
        _close(f"{mode} loss after a step", _net_loss(model, rank), _net_loss(ref, rank))


def _mod_over_moe(world: int) -> pm.MixtureOfDepths:
    layer = make_layer({}, world)
    torch.manual_seed(2)
    return pm.MixtureOfDepths(layer, DIM, capacity=0.5, threshold=0.0)


def check_mod_selects_nothing(rank: int, world: int) -> None:
    """Eval MoD (causal predictor) over an expert-parallel MoE: ranks whose predictor selects
    no token skip the block, yet join its exchanges; the others match one process."""
    empty_ranks = _empty_ranks(world)
    reference = _mod_over_moe(world).eval()
    mod = _mod_over_moe(world).eval()
    pm.distributed.expert_parallel(mod)
    if rank in empty_ranks:
        assert mod.predictor is not None
        with torch.no_grad():
            mod.predictor[-1].bias.fill_(-1e4)  # sigmoid 0: no token passes the threshold
    x, _, grad_out = make_batch({}, rank)
    x.requires_grad_(True)
    with torch.no_grad():
        y_inference = mod(x)
    y = mod(x)
    (y * grad_out).sum().backward()
    assert x.grad is not None
    if rank in empty_ranks:
        assert mod.stats is not None and int(mod.stats.processed_tokens) == 0, mod.stats
        assert torch.equal(y, x) and torch.equal(y_inference, x)
        _close("input grad", x.grad, grad_out)
    expert_grads: dict[str, Tensor] = {}
    for src in range(world):
        if src in empty_ranks:
            continue
        reference.zero_grad(set_to_none=True)
        x_ref, _, grad_ref = make_batch({}, src)
        x_ref.requires_grad_(True)
        y_ref = reference(x_ref)
        (y_ref * grad_ref).sum().backward()
        for key, grad in _grads(reference.block.experts).items():
            expert_grads[f"experts.{key}"] = expert_grads.get(f"experts.{key}", 0) + grad
        if src == rank:
            assert reference.stats is not None and int(reference.stats.processed_tokens) > 0
            _close("output", y, y_ref)
            _close("inference output", y_inference, y_ref.detach())
            assert x_ref.grad is not None
            _close("input grad", x.grad, x_ref.grad)
    layer = mod.block
    assert isinstance(layer, pm.MoELayer)
    assert isinstance(layer.experts, pm.distributed.ExpertParallelExperts)
    want = _slice_reference(expert_grads, layer.experts)
    got = _local_expert_grads_as_global(layer)
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key in want:
        _close(f"expert grad {key}", got[key], want[key])


class TwoMoENet(nn.Module):
    """Two residual MoE layers between dense projections (backward crosses two exchanges)."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.moe1 = make_layer({}, world)
        self.moe2 = make_layer({"experts": "swiglu"}, world)
        torch.manual_seed(1)
        self.inp, self.out = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + self.moe1(h)
        return self.out(h + self.moe2(h))


def _empty_net_loss(model: nn.Module, rank: int, empty_ranks: set[int]) -> Tensor:
    gen = torch.Generator().manual_seed(3000 + rank)
    x = torch.randn(0 if rank in empty_ranks else 2, 6, DIM, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    # a sum, not a mean: an empty rank's loss is 0 (a mean would be NaN)
    return (model(x) - target).square().sum() + pm.aux_loss(model)


def check_empty_rank_ddp(rank: int, world: int) -> None:
    """DDP + expert parallel with empty ranks == one process on the non-empty ranks' batches."""
    empty_ranks = _empty_ranks(world)
    ref = TwoMoENet(world)
    ref_loss = sum(_empty_net_loss(ref, src, empty_ranks) for src in range(world)) / world
    assert isinstance(ref_loss, Tensor)
    ref_loss.backward()
    ref_grads = _grads(ref)

    net = pm.distributed.expert_parallel(TwoMoENet(world))
    assert isinstance(net, TwoMoENet)
    model = pm.distributed.ddp(net)
    _empty_net_loss(model, rank, empty_ranks).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        if ".experts.local." in name:
            ep = net.get_submodule(name.split(".")[0]).experts
            assert isinstance(ep, pm.distributed.ExpertParallelExperts)
            key = name.replace(".experts.local.", ".experts.")
            want = ref_grads[key][ep.first_expert : ep.first_expert + ep.num_local_experts]
        else:
            want = ref_grads[name]
        _close(f"ddp grad {name}", param.grad, want)


CKPT_EXPERTS = 4  # divisible by 1, 2 and 4 ranks


def checkpoint_truth(cfg: dict[str, Any]) -> TinyNet:
    """The unsharded model a checkpoint must hold (trained-looking, not its init)."""
    net = make_net(1, {**cfg, "experts_per_rank": CKPT_EXPERTS})
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn(param.shape, generator=gen))
    return net


def _other_init(cfg: dict[str, Any]) -> TinyNet:
    net = make_net(1, {**cfg, "experts_per_rank": CKPT_EXPERTS})
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(-0.5)  # anything but the checkpoint's values
    return net


def _assert_state_equal(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys(), (sorted(set(got) ^ set(want)),)
    for key in want:
        if not torch.equal(got[key], want[key]):
            raise AssertionError(f"{key}: differs from the unsharded model")


def _shard(net: TinyNet, cfg: dict[str, Any]) -> nn.Module:
    pm.distributed.expert_parallel(net)
    if cfg.get("fsdp"):
        return pm.distributed.fully_shard(net, modules=[net.inp])
    if cfg.get("ddp"):
        return pm.distributed.ddp(net)
    return net


def checkpoint_save(rank: int, world: int, path: str, cfg: dict[str, Any]) -> None:
    truth = checkpoint_truth(cfg)
    model = _shard(copy.deepcopy(truth), cfg)
    pm.distributed.save_checkpoint(model, path)
    _assert_state_equal(pm.distributed.full_state_dict(model), truth.state_dict())


def checkpoint_load(rank: int, world: int, path: str, cfg: dict[str, Any]) -> None:
    truth = checkpoint_truth(cfg)
    model = _shard(_other_init(cfg), cfg)
    pm.distributed.load_checkpoint(model, path)
    _assert_state_equal(pm.distributed.full_state_dict(model), truth.state_dict())
    with torch.no_grad():
        _close("loaded model's loss", _net_loss(model, rank), _net_loss(truth, rank))


def load_example() -> Any:
    """The example script as a module (it is not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_expert_parallel.py"
    spec = importlib.util.spec_from_file_location("train_expert_parallel", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(rank: int, world: int, dp: str, save: str) -> None:
    example = load_example()
    argv = ["--steps", "4", "--dim", "16", "--seq", "8", "--batch", "2", "--dp", dp]
    loss = example.main([*argv, "--save", save])
    assert loss == loss and loss < 10, loss  # finite, near log(vocab) after 4 steps


def check_errors(rank: int, world: int) -> None:
    """Clear errors: indivisible expert count, mixed module lists, hybrid groups under ddp."""
    import pytest

    layer = pm.MoELayer(DIM, pm.TopKRouter(DIM, 3), pm.MLPExperts(3, DIM, HIDDEN))
    with pytest.raises(ValueError, match="divisible by 2, got num_experts=3"):
        pm.distributed.expert_parallel(layer)
    mixed = [nn.Linear(DIM, DIM), nn.Sequential(nn.Linear(DIM, DIM))]
    layer = pm.MoELayer(DIM, pm.TopKRouter(DIM, 2), mixed)
    with pytest.raises(ValueError, match="homogeneous"):
        pm.distributed.expert_parallel(layer)
    group, _ = _subgroup(rank, world, 1)
    net = pm.distributed.expert_parallel(make_net(1), group)
    with pytest.raises(ValueError, match="hybrid expert x data parallel"):
        pm.distributed.ddp(net)
    with pytest.raises(ValueError, match="max_norm"):
        pm.distributed.clip_grad_norm_(net, 0.0)
    with pytest.raises(TypeError, match="call expert_parallel first"):
        pm.distributed.expert_parallel(
            pm.distributed.ddp(pm.distributed.expert_parallel(make_net(world)))
        )
    with pytest.raises(ValueError, match="containing MoELayer"):
        pm.distributed.expert_parallel(nn.Linear(DIM, DIM))
    with pytest.raises(TypeError, match="call expert_parallel first"):
        pm.distributed.expert_parallel(
            pm.distributed.fully_shard(pm.distributed.expert_parallel(make_net(world)))
        )


def _resume_net() -> TinyNet:
    return make_net(1, {"experts_per_rank": CKPT_EXPERTS})


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def _data_parallel(net: TinyNet, mode: str) -> nn.Module:
    pm.distributed.expert_parallel(net)
    if mode == "fsdp":
        return pm.distributed.fully_shard(net, modules=[net.inp])
    return pm.distributed.ddp(net)


def resume_reference(save_world: int, load_world: int) -> TinyNet:
    """One process: 2 AdamW steps on the mean loss of save_world ranks, then 1 on load_world's."""
    ref = _resume_net()
    optim = _adamw(ref)
    for world in (save_world, save_world, load_world):
        loss = sum(_net_loss(ref, src) for src in range(world)) / world
        assert isinstance(loss, Tensor)
        loss.backward()
        optim.step()
        optim.zero_grad()
    return ref


def resume_save(rank: int, world: int, path: str, mode: str) -> None:
    model = _data_parallel(_resume_net(), mode)
    optim = _adamw(model)
    for _ in range(2):
        _net_loss(model, rank).backward()
        optim.step()
        optim.zero_grad()
    pm.distributed.save_checkpoint(model, path, optim)


def resume_load(rank: int, world: int, path: str, save_world: int, mode: str) -> None:
    """Load model + AdamW state on another rank count; the next step matches one process."""
    net = _resume_net()
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(-0.5)  # the checkpoint must overwrite these
    model = _data_parallel(net, mode)
    optim = _adamw(model)
    pm.distributed.load_checkpoint(model, path, optim)
    _net_loss(model, rank).backward()
    optim.step()
    optim.zero_grad()
    ref = resume_reference(save_world, world)
    with torch.no_grad():
        _close("loss after resuming", _net_loss(model, rank), _net_loss(ref, rank))


def check_group_membership(rank: int, world: int) -> None:
    only_rank0 = dist.new_group([0])  # collective: every rank creates it
    if rank != 0:
        import pytest

        with pytest.raises(ValueError, match="not a member"):
            pm.distributed.expert_parallel(make_layer({}, 1), only_rank0)


def _naive_balance(
    weight: Tensor, counted: list[tuple[Tensor, Tensor]], averaged: list[tuple[Tensor, Tensor]]
) -> tuple[Tensor, list[int], int]:
    """``E * sum_e f_e * P_e`` by hand: ``f_e`` = top-2 slots of e per real token over the
    ``counted`` (x [N, D], mask [N]) chunks, ``P_e`` = e's mean softmax over the ``averaged``
    chunks' real tokens (differentiable in ``weight``). Also the counts and the token total."""
    num_experts = weight.shape[0]
    counts, tokens = [0] * num_experts, 0
    for x, mask in counted:
        ids = (x @ weight.detach().T).softmax(-1).topk(2, dim=-1).indices
        for n in range(x.shape[0]):
            if bool(mask[n]):
                tokens += 1
                for e in ids[n].tolist():
                    counts[e] += 1
    total = torch.zeros(num_experts)
    real = 0
    for x, mask in averaged:
        probs = (x @ weight.T).softmax(-1)
        for n in range(x.shape[0]):
            if bool(mask[n]):
                real += 1
                total = total + probs[n]
    loss = num_experts * sum(counts[e] / tokens * total[e] / real for e in range(num_experts))
    assert isinstance(loss, Tensor)
    return loss, counts, tokens


def _balance_chunk(case: str, rank: int, micro: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s micro-batch ``micro``: x [B, T, D] and a 0/1 mask [B, T]."""
    gen = torch.Generator().manual_seed(3000 + 10 * rank + micro)
    batch, seq = (2, 4) if case == "equal" else (1 + rank, 3 + 2 * rank + micro)
    x = torch.randn(batch, seq, DIM, generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if case == "padding":
        mask = (torch.rand(batch, seq, generator=gen) > 0.35).long()
        mask[0, 0] = 1
    return x, mask


def check_global_balance(rank: int, world: int) -> None:
    """TopKRouter(balance="global") on W ranks: the mean of the ranks' balance losses and the
    DDP-averaged router gradient equal one process on the concatenated batch (naive formula);
    over two accumulation micro-batches the second uses both micro-batches' global counts."""
    group = dist.new_group(list(range(world)))  # collective: every rank creates it
    for case in ("equal", "unequal", "padding"):
        torch.manual_seed(0)
        router = pm.TopKRouter(
            DIM, 4, 2, init_std=1.0, balance="global",
            balance_group=group if case == "padding" else None,
        )  # fmt: skip
        ref_weight = router.gate.weight.detach().clone().requires_grad_(True)
        model = nn.parallel.DistributedDataParallel(router)
        chunks = {(r, m): _balance_chunk(case, r, m) for r in range(world) for m in (0, 1)}
        flat = {k: (x.reshape(-1, DIM), mask.reshape(-1)) for k, (x, mask) in chunks.items()}
        for micro in (0, 1):
            model.zero_grad()
            x, mask = chunks[(rank, micro)]
            loss = model(x, mask if case == "padding" else None).aux_losses["load_balancing"]
            loss.backward()  # DDP averages the router gradient over the ranks
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world
            counted = [flat[(r, m)] for r in range(world) for m in range(micro + 1)]
            want, counts, tokens = _naive_balance(
                ref_weight, counted, [flat[(r, micro)] for r in range(world)]
            )
            (want_grad,) = torch.autograd.grad(want, ref_weight)
            label = f"{case} micro-batch {micro}"
            _close(f"{label} loss (mean over ranks)", mean_loss, want.detach())
            assert router.gate.weight.grad is not None
            _close(f"{label} router grad", router.gate.weight.grad, want_grad)
            assert router.balance_counts is not None and router.balance_tokens is not None
            assert router.balance_counts.tolist() == counts, (label, router.balance_counts)
            assert int(router.balance_tokens) == tokens, label
        assert pm.end_balance_step(router) and router.balance_counts is None
