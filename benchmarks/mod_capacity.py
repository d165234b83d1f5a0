"""Mixture-of-Depths cost against the full block, as ratios measured side by side in one run.

For each capacity c, times ``MixtureOfDepths(block, c)`` and the plain ``block`` on the same
input, alternating, and prints the median of the pairwise ratios ``MoD / block`` for forward and
forward+backward. The target: about ``c`` plus the router and gather/scatter.

    python benchmarks/mod_capacity.py [--dim 256] [--seq 512] [--batch 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import pytorch_mixtures as pm
from pytorch_mixtures.models import Block, ModelConfig


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ratio(
    fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int, warmup: int = 3
) -> float:
    for _ in range(warmup):
        fn_a()
        fn_b()
    return statistics.median(_timed(fn_a) / _timed(fn_b) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(dim=args.dim, num_heads=4, ffn_hidden=4 * args.dim)
    block = Block(config, 0)
    x = torch.randn(args.batch, args.seq, args.dim, requires_grad=True)

    def forward(module: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return module(x)

        return run

    def forward_backward(module: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            module(x).sum().backward()
            return None

        return run

    print(f"dim={args.dim} seq={args.seq} batch={args.batch} threads={args.threads}")
    print("capacity  fwd MoD/block  fwd+bwd MoD/block")
    for capacity in (0.125, 0.25, 0.5, 1.0):
        mod = pm.MixtureOfDepths(block, args.dim, capacity=capacity)
        fwd = median_ratio(forward(mod), forward(block), args.repeats)
        fwd_bwd = median_ratio(forward_backward(mod), forward_backward(block), args.repeats)
        print(f"{capacity:8.3f}  {fwd:13.3f}  {fwd_bwd:17.3f}")


if __name__ == "__main__":
    main()
