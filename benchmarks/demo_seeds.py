"""Dense vs MoE at matched active compute over several seeds (the demo's claim, checked).

Runs the demo's dense and MoE models for each seed in parallel worker processes (``--threads``
torch threads each) and prints, per seed, the held-out losses, their ratio, and the smallest
share of slots any expert of any layer got over the last half of training (0 means an expert
died: routing collapse).

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 3 --steps 150 --out runs/seeds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _worker(args: argparse.Namespace) -> None:
    import torch

    from pytorch_mixtures.app.data import load_corpus
    from pytorch_mixtures.app.demo import SizeConfig, run_demo
    from pytorch_mixtures.app.train import TrainConfig

    torch.set_num_threads(args.threads)
    corpus = load_corpus()
    schedule = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, eval_every=args.steps
    )
    size = SizeConfig(**json.loads(args.size))
    out = args.out / f"seed{args.seed}"
    results = run_demo(corpus, schedule, size, out, kinds=args.kinds, progress=False, report=False)
    print(json.dumps({k: v.get("val_loss") for k, v in results["models"].items()}))


def _min_share(entry: dict) -> float:
    history = entry["history"][len(entry["history"]) // 2 :]
    shares = [
        count / max(sum(layer), 1) for h in history for layer in h["expert_load"] for count in layer
    ]
    return min(shares) if shares else float("nan")


def _max_shares(entry: dict) -> str:
    """Largest share of slots any expert of any layer got at a few steps (0.5 with top-2 means
    every token chose that expert)."""
    history = entry["history"]
    picks = [i for i in (9, 19, 49, 99) if i < len(history)] + [len(history) - 1]
    return " / ".join(
        f"{max(c / max(sum(layer), 1) for layer in history[i]['expert_load'] for c in layer):.2f}"
        for i in picks
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="{}", help="SizeConfig fields as JSON")
    parser.add_argument("--kinds", nargs="+", default=["dense", "moe"])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--dense-from", type=Path, default=None, help="reuse dense results")
    parser.add_argument("--table-only", action="store_true", help="reprint from --out")
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed is not None:
        _worker(args)
        return
    if not args.table_only:
        _run_workers(args)
    _print_table(args)


def _run_workers(args: argparse.Namespace) -> None:
    common = [
        "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--threads", str(args.threads), "--size", args.size, "--out", str(args.out),
        "--kinds", *args.kinds,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    procs = [
        subprocess.Popen([sys.executable, __file__, "--seed", str(seed), *common], env=env)
        for seed in args.seeds
    ]
    for proc in procs:
        proc.wait()


def _print_table(args: argparse.Namespace) -> None:
    print(f"steps {args.steps}, batch {args.batch_size}, size {args.size}")
    print(
        "| seed | dense held-out | moe held-out | moe / dense | min expert share (2nd half) "
        "| max expert share at steps 10 / 20 / 50 / 100 / last |"
    )
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        models = json.loads((args.out / f"seed{seed}" / "results.json").read_text())["models"]
        if "dense" not in models:  # MoE-only run: compare with a dense run of the same seed
            dense_path = args.dense_from / f"seed{seed}" / "results.json"
            models["dense"] = json.loads(dense_path.read_text())["models"]["dense"]
        dense, moe = models["dense"], models["moe"]
        print(
            f"| {seed} | {dense['val_loss']:.4f} | {moe['val_loss']:.4f} "
            f"| {moe['val_loss'] / dense['val_loss']:.4f} | {_min_share(moe):.4f} "
            f"| {_max_shares(moe)} |"
        )


if __name__ == "__main__":
    main()
