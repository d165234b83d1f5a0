"""Train a small MoE language model with expert parallelism + data parallelism.

Run on CPUs (gloo) or GPUs (NCCL), unchanged::

    torchrun --nproc-per-node 2 examples/train_expert_parallel.py
    torchrun --nproc-per-node 8 examples/train_expert_parallel.py --dp fsdp --save /tmp/ckpt

Every rank holds ``num_experts / world_size`` experts of each MoE layer and a replica of
everything else (embeddings, attention, routers), which DDP (``--dp ddp``) or FSDP2
(``--dp fsdp``) keep in sync. Each rank trains on its own synthetic batches (a fixed random
bigram language: no download). ``--save`` writes a distributed checkpoint that loads on any
number of ranks with ``pm.distributed.load_checkpoint``.

Shape legend: B batch, T sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

import pytorch_mixtures as pm


class Block(nn.Module):
    """Pre-norm transformer block with an MoE feed-forward."""

    def __init__(self, dim: int, heads: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = pm.MHSA(dim, heads, causal=True)
        self.norm2 = nn.LayerNorm(dim)
        router = pm.TopKRouter(dim, num_experts, top_k)
        self.moe = pm.MoELayer(dim, router, pm.SwiGLUExperts(num_experts, dim, 2 * dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        return x_BTD + self.moe(self.norm2(x_BTD))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, 4, num_experts, top_k) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens_BT: Tensor) -> Tensor:
        x_BTD = self.embed(tokens_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return self.head(self.norm(x_BTD))


def bigram_batches(vocab: int, batch: int, seq: int, seed: int, device: torch.device):
    """Endless batches from a fixed random bigram distribution (shared by all ranks)."""
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 3
    probs_VV = table.softmax(dim=-1)
    gen = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab, (batch,), generator=gen)
        for t in range(seq):
            tokens[:, t + 1] = torch.multinomial(probs_VV[tokens[:, t]], 1, generator=gen)[:, 0]
        yield tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def main(argv: list[str] | None = None) -> float:
    """Train; return the last logged loss (rank-local)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts-per-rank", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dp", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--save", default=None, help="directory for a distributed checkpoint")
    args = parser.parse_args(argv)

    owns_group = not dist.is_initialized()
    if owns_group:  # launched by torchrun: RANK, WORLD_SIZE, MASTER_ADDR... are set
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)  # same initial weights everywhere: replicas start in sync
    num_experts = args.experts_per_rank * world
    net = TinyLM(args.vocab, args.dim, args.layers, num_experts, args.top_k).to(device)
    pm.distributed.expert_parallel(net)  # now each rank holds its experts only
    if args.dp == "ddp":
        model: nn.Module = pm.distributed.ddp(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        model = pm.distributed.fully_shard(net, modules=list(net.blocks))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    batches = bigram_batches(args.vocab, args.batch, args.seq, seed=1 + rank, device=device)
    start, loss_value = time.perf_counter(), float("nan")
    for step in range(args.steps):
        tokens_BT, targets_BT = next(batches)
        logits_BTV = model(tokens_BT)
        loss = nn.functional.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
        (loss + pm.aux_loss(model)).backward()
        # the global norm over every rank's experts: plain clip_grad_norm_ would desync replicas
        pm.distributed.clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            loss_value = loss.item()
            stats = pm.distributed.global_routing_stats(net.blocks[0].moe)
            if rank == 0:
                print(
                    f"step {step:4d}  loss {loss_value:.3f}  "
                    f"layer-0 global expert load {stats.tokens_per_expert.tolist()}  "
                    f"{time.perf_counter() - start:.1f}s",
                    flush=True,
                )
    if args.save:
        pm.distributed.save_checkpoint(model, args.save, optimizer)
        if rank == 0:
            print(f"saved a distributed checkpoint to {args.save}", flush=True)
    if owns_group:
        dist.destroy_process_group()
    return loss_value


if __name__ == "__main__":
    main()
