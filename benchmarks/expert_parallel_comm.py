"""Communication of expert parallelism: a routing simulation, gloo loopback timings, projections.

Prints three markdown tables (the numbers in docs/scaling.md come from this script)::

    .venv/bin/python benchmarks/expert_parallel_comm.py             # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/expert_parallel_comm.py --skip-gloo # simulation + projections

1. Simulation (one process): W ranks each route T random tokens with a real ``TopKRouter``;
   the rows each rank sends to other ranks in one all-to-all, measured, against the formula
   ``T * top_k * (W - 1) / W`` for uniform routing, and the bytes that makes at dim D, bf16.
   Zipf-skewed expert popularity shows what imbalance does to the busiest receiver.
2. Gloo on loopback, 2 and 4 ranks (spawned processes, 1 thread each): time of one
   ``all_to_all_single`` against rows per rank (best of 15: on a shared machine the minimum
   is the cost without preemption), and the expert-parallel MoE layer's
   forward+backward time over the unsharded layer's on the same local batch (same expert
   FLOPs for uniform loads, so the ratio is the price of the exchange), median of pairwise
   ratios measured side by side.
3. Projection to 8, 64 and 512 GPUs from the formula, with the stated link speeds.

Shape legend: T tokens per rank, D model dim, K top-k, W ranks, E experts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

import pytorch_mixtures as pm

BF16 = 2  # bytes per element on the wire in a bf16 run


def routed_send_matrix(
    world: int, tokens: int, top_k: int, experts: int, skewed: bool
) -> torch.Tensor:
    """``[W, W]`` rows rank i sends to rank j in the dispatch all-to-all (diagonal stays local).

    Uniform: a real ``TopKRouter`` at init (shared by all ranks) on random tokens. Skewed:
    each token draws its k distinct experts with Zipf popularity ``p_e ~ 1 / (rank_e + 1)``,
    the popularity order randomly permuted over experts (hot experts spread over owners).
    """
    torch.manual_seed(0)
    router = pm.TopKRouter(64, experts, top_k)
    popularity_E = 1.0 / torch.arange(1, experts + 1, dtype=torch.float32)
    popularity_E = popularity_E[torch.randperm(experts)]
    local = experts // world
    send_WW = torch.zeros(world, world, dtype=torch.long)
    with torch.no_grad():
        for rank in range(world):
            if skewed:
                probs_NE = popularity_E.expand(tokens, experts)
                expert_ids = torch.multinomial(probs_NE, top_k, replacement=False).reshape(-1)
            else:
                expert_ids = router(torch.randn(tokens, 64)).expert_ids
            per_expert = torch.bincount(expert_ids, minlength=experts)
            send_WW[rank] = per_expert.view(world, local).sum(dim=1)
    return send_WW


def simulation_table() -> None:
    print("\n### 1. Rows and bytes per rank in one all-to-all (simulated routing)\n")
    print(
        "| W | E | T/rank | top_k | sent rows/rank (measured) | formula T*K*(W-1)/W | "
        "MB/rank at D=4096 bf16 | busiest receiver / mean, router at init | same, Zipf |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for world, experts in [(2, 8), (4, 8), (8, 64), (64, 64)]:
        for tokens, top_k in [(1024, 1), (4096, 2), (4096, 8)]:
            if top_k > experts:
                continue
            send = routed_send_matrix(world, tokens, top_k, experts, skewed=False)
            remote = (send.sum(dim=1) - send.diagonal()).float().mean().item()
            formula = tokens * top_k * (world - 1) / world
            recv = send.sum(dim=0).float()
            skewed = routed_send_matrix(world, tokens, top_k, experts, skewed=True).sum(dim=0)
            print(
                f"| {world} | {experts} | {tokens} | {top_k} | {remote:.0f} | {formula:.0f} | "
                f"{remote * 4096 * BF16 / 1e6:.1f} | {(recv.max() / recv.mean()).item():.2f} | "
                f"{(skewed.max() / skewed.float().mean()).item():.2f} |"
            )


def _gloo_worker(rank: int, world: int, port: int, results: object) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    rows_out: list[tuple[str, float, float]] = []
    dim = 512
    for rows_per_peer in [64, 512, 4096]:
        x = torch.randn(rows_per_peer * world, dim)
        out = torch.empty_like(x)
        times = []
        for _ in range(15):
            dist.barrier()
            start = time.perf_counter()
            dist.all_to_all_single(out, x)
            times.append(time.perf_counter() - start)
        sent_mb = rows_per_peer * (world - 1) * dim * 4 / 1e6
        rows_out.append((f"a2a {rows_per_peer} rows/peer", min(times) * 1e3, sent_mb))

    torch.manual_seed(0)
    num_experts, hidden = 2 * world, 1024
    for tokens, top_k in [(512, 2), (2048, 2)]:
        reference = pm.MoELayer(
            dim, pm.TopKRouter(dim, num_experts, top_k), pm.SwiGLUExperts(num_experts, dim, hidden)
        )
        import copy

        sharded = pm.distributed.expert_parallel(copy.deepcopy(reference))
        x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(rank))
        ratios = []
        for it in range(11):
            timings = []
            for layer in (reference, sharded):
                dist.barrier()
                start = time.perf_counter()
                layer(x).square().mean().backward()
                timings.append(time.perf_counter() - start)
            if it >= 1:  # first round is warm-up
                ratios.append(timings[1] / timings[0])
        rows_out.append(
            (f"EP layer fwd+bwd / unsharded, T={tokens} K={top_k}", statistics.median(ratios), 0.0)
        )
    if rank == 0:
        results.put(rows_out)  # type: ignore[attr-defined]
    dist.barrier()
    dist.destroy_process_group()


def gloo_table() -> None:
    import socket

    import torch.multiprocessing as mp

    print("\n### 2. Gloo on loopback (this machine; D=512, float32, 1 thread per rank)\n")
    print("| W | measurement | value |")
    print("|---|---|---|")
    for world in (2, 4):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_gloo_worker, args=(r, world, port, results), daemon=True)
            for r in range(world)
        ]
        for proc in procs:
            proc.start()
        rows = results.get(timeout=600)
        for proc in procs:
            proc.join(timeout=30)
        for name, value, sent_mb in rows:
            if name.startswith("a2a"):
                print(
                    f"| {world} | {name}: best-of-15 ms (MB sent per rank, GB/s) | {value:.2f} "
                    f"({sent_mb:.2f} MB, {sent_mb / value:.2f} GB/s) |"
                )
            else:
                print(f"| {world} | {name} | {value:.2f}x |")


def projection_table() -> None:
    print("\n### 3. Projection: bytes each GPU sends per MoE layer per training step\n")
    print(
        "Assumptions: 8 GPUs per node; NVLink 450 GB/s and InfiniBand 50 GB/s per GPU per "
        "direction; uniform routing; 4 all-to-alls per layer and step (dispatch + combine, "
        "forward and backward); bf16; expert compute at 400 TFLOP/s achieved.\n"
    )
    print(
        "| config | GPUs (EP x expert-DP) | GB sent/GPU/layer | of it inter-node | "
        "comm ms (no overlap) | expert compute ms | comm / compute |"
    )
    print("|---|---|---|---|---|---|---|")
    configs = [
        ("Mixtral-like D=4096 H=14336 E=8 top-2, 8192 tok/GPU", 4096, 14336, 8, 2, 8192),
        ("fine-grained D=7168 H=2048 E=256 top-8, 8192 tok/GPU", 7168, 2048, 256, 8, 8192),
    ]
    for name, dim, hidden, experts, top_k, tokens in configs:
        for gpus in (8, 64, 512):
            ep = min(gpus, experts)
            edp = gpus // ep
            remote = tokens * top_k * (ep - 1) / ep
            gbytes = 4 * remote * dim * BF16 / 1e9
            inter = max(0.0, (ep - 8) / (ep - 1)) if ep > 1 else 0.0
            comm_s = gbytes * (1 - inter) / 450 + gbytes * inter / 50
            flops = 3 * (2 * 3 * dim * hidden) * tokens * top_k  # fwd + 2x bwd, SwiGLU
            compute_s = flops / 400e12
            print(
                f"| {name} | {gpus} ({ep} x {edp}) | {gbytes:.2f} | {inter:.0%} | "
                f"{comm_s * 1e3:.1f} | {compute_s * 1e3:.1f} | {comm_s / compute_s:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-gloo", action="store_true")
    args = parser.parse_args()
    simulation_table()
    if not args.skip_gloo:
        gloo_table()
    projection_table()


if __name__ == "__main__":
    main()
