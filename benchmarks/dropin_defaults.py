"""Does the library's default MoE layer win as a drop-in for a dense FFN? Seeds x learning rates.

The reference LM (byte level, 4 layers, dim 128, SwiGLU FFN of width ``top_k * H``) is trained
dense, and again with every FFN replaced by what a user writes::

    pm.MoELayer(D, pm.TopKRouter(D, E, top_k=k, **router), pm.SwiGLUExperts(E, D, H))

changing nothing else (``router`` is empty for the library's defaults; a variant may set
options to compare, and ``"_expert_init_std"`` re-initialises the experts N(0, std)).
``dense`` is the dense FFN with PyTorch's default init, ``dense-lm`` with the reference LM's
N(0, 0.02); the rest of the model keeps the LM's init, or with ``--all-default-init``
PyTorch's default everywhere. Each run reports the held-out loss and, per MoE layer, the
held-out load imbalance (max / mean expert load; 1.0 is perfect balance, 4.0 with 8 experts and
top-2 means every token chose the same expert). Runs go to worker processes, ``--jobs`` at a
time, one torch thread each.

    .venv/bin/python benchmarks/dropin_defaults.py --seeds 0 1 2 --lrs 1e-3 3e-3 --steps 400 \\
        --variants dense library '{"routed_scaling_factor": 2.0}'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _run_one(
    variant: str, seed: int, lr: float, steps: int, all_default_init: bool = False
) -> dict[str, object]:
    import torch

    import pytorch_mixtures as pm
    from pytorch_mixtures.app.data import load_corpus
    from pytorch_mixtures.app.train import TrainConfig, build_model, train
    from pytorch_mixtures.models import ModelConfig

    torch.set_num_threads(1)
    dim, experts, top_k, hidden = 128, 8, 2, 256
    model = build_model(ModelConfig(dim=dim, num_layers=4, ffn_hidden=top_k * hidden), seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1000)
        if all_default_init:  # the user's model: PyTorch's default init everywhere
            for module in model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    module.reset_parameters()
        for block in model.layers:
            if variant == "dense":  # the user's dense FFN, with PyTorch's default init
                for linear in (block.ffn.gate_up, block.ffn.down):
                    linear.reset_parameters()
                continue
            if variant == "dense-lm":  # the reference LM's own init, N(0, 0.02)
                continue
            options = {} if variant == "library" else json.loads(variant)
            expert_std = options.pop("_expert_init_std", None)  # a test of other expert inits
            router = pm.TopKRouter(dim, experts, top_k=top_k, **options)
            block.ffn = pm.MoELayer(dim, router, pm.SwiGLUExperts(experts, dim, hidden))
            if expert_std is not None:
                for weight in block.ffn.experts.parameters():
                    torch.nn.init.normal_(weight, std=expert_std)
    corpus = load_corpus()
    config = TrainConfig(steps=steps, lr=lr, seed=seed, eval_every=steps)
    final = train(model, corpus, config, progress=False).evals[-1]
    return {
        "variant": variant,
        "seed": seed,
        "lr": lr,
        "val_loss": final["loss"],
        "load_imbalance": final.get("load_imbalance", []),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--variants", nargs="+", default=["dense", "library"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--all-default-init", action="store_true",
        help="PyTorch's default init for every layer (not only the FFN)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/dropin.jsonl"))
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "SEED", "LR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, seed, lr = args.one
        row = _run_one(variant, int(seed), float(lr), args.steps, args.all_default_init)
        print(json.dumps(row))
        return
    jobs = [(v, s, lr) for lr in args.lrs for s in args.seeds for v in args.variants]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(job: tuple[str, int, float]) -> dict[str, object]:
        v, s, lr = job
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--one", v, str(s), str(lr)]
        cmd += ["--all-default-init"] if args.all_default_init else []
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        row: dict[str, object] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        return row

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(launch, jobs))
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    _table(rows, args)


def _table(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    dense = {(r["seed"], r["lr"]): r["val_loss"] for r in rows if r["variant"] == "dense"}
    print(f"\nsteps {args.steps}; held-out loss minus dense (nats), worst layer max/mean load")
    print("| variant | lr | " + " | ".join(f"seed {s}" for s in args.seeds) + " | median |")
    print("|---|---|" + "---|" * (len(args.seeds) + 1))
    for variant in args.variants:
        for lr in args.lrs:
            cells, deltas = [], []
            for seed in args.seeds:
                (row,) = [
                    r for r in rows if (r["variant"], r["seed"], r["lr"]) == (variant, seed, lr)
                ]
                loss = float(row["val_loss"])  # type: ignore[arg-type]
                worst = max(row["load_imbalance"] or [1.0])  # type: ignore[type-var]
                if variant == "dense":
                    cells.append(f"{loss:.4f}")
                    continue
                delta = loss - float(dense[(seed, lr)])  # type: ignore[arg-type]
                deltas.append(delta)
                cells.append(f"{delta:+.3f} ({worst:.2f})")
            median = f"{statistics.median(deltas):+.3f}" if deltas else ""
            print(f"| {variant} | {lr:g} | " + " | ".join(cells) + f" | {median} |")


if __name__ == "__main__":
    main()
