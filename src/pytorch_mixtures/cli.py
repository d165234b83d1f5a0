"""Command line: ``pytorch-mixtures demo``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    """A short end-to-end run: a residual MoE model learns a per-cluster regression."""
    import pytorch_mixtures as pm

    torch.manual_seed(args.seed)
    dim, experts = 32, 8
    moe = pm.MoELayer(dim, pm.TopKRouter(dim, experts, 2), pm.SwiGLUExperts(experts, dim, 64))
    model = nn.Sequential(nn.Linear(dim, dim), moe)
    target = nn.Linear(dim, dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        x = torch.randn(16, 32, dim)
        with torch.no_grad():
            y = target(x).tanh()
        loss = nn.functional.mse_loss(model(x), y)
        (loss + pm.aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            stats = moe.stats
            load = stats.tokens_per_expert.tolist() if stats is not None else []
            print(f"step {step:4d}  loss {loss.item():.4f}  expert load {load}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pytorch-mixtures")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small MoE model end to end")
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
