"""Long-run check: train the reference MoE LM for many steps in bf16 autocast and watch for
NaN/inf and dead experts, with the library's default routing and balancing.

Data: the bytes of this repository's own text files (no download). The model is the reference
``TransformerLM`` (``kind="moe"``: 4 layers, dim 128, top-2 of 8 SwiGLU experts), AdamW 3e-3.

An expert is *dead* if it received no token in the last ``--window`` steps. The script exits
with status 1 if any loss, gradient or parameter became non-finite or any expert died.

    .venv/bin/python benchmarks/long_run.py                      # 2,000 steps (minutes on CPU)
    .venv/bin/python benchmarks/long_run.py --steps 200 --batch 4  # a quick look
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import pytorch_mixtures as pm
from pytorch_mixtures.models import ModelConfig, TransformerLM

ROOT = Path(__file__).resolve().parents[1]


def corpus() -> torch.Tensor:
    """The repository's text files as one byte tensor (uint8 -> int64 token ids)."""
    files = sorted(
        p
        for pattern in ("src/**/*.py", "tests/*.py", "*.md", "docs/*.md")
        for p in ROOT.glob(pattern)
    )
    data = b"\n".join(p.read_bytes() for p in files)
    return torch.tensor(list(data), dtype=torch.long)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=100, help="dead = no token in this many")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    data = corpus()
    config = ModelConfig(kind="moe", dim=args.dim, num_layers=args.layers, ffn_hidden=4 * args.dim)
    model = TransformerLM(config).to(args.device).train()
    moe_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, pm.MoELayer)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    device_type = torch.device(args.device).type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    window_load = {n: torch.zeros(m.num_experts, dtype=torch.long) for n, m in moe_layers}
    nonfinite_steps, first_loss, last_losses = 0, math.nan, []
    started = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=generator)
        chunk = torch.stack([data[s : s + args.seq + 1] for s in starts.tolist()]).to(args.device)
        with autocast:
            out = model(chunk[:, :-1], targets=chunk[:, 1:])
        assert out.loss is not None
        loss = out.loss + pm.aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads_finite = all(
            bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None
        )
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = float(out.loss.detach())
        if not (math.isfinite(loss_value) and math.isfinite(float(loss.detach())) and grads_finite):
            nonfinite_steps += 1
        if step == 0:
            first_loss = loss_value
        last_losses = [*last_losses[-(args.window - 1) :], loss_value]
        if step >= args.steps - args.window:
            for name, moe in moe_layers:
                assert moe.stats is not None
                window_load[name] += moe.stats.tokens_per_expert.cpu()
        if step % 200 == 0 or step == args.steps - 1:
            loads = [m.stats.tokens_per_expert.tolist() for _, m in moe_layers if m.stats]
            print(
                f"step {step:5d}  loss {loss_value:.3f}  aux {float(pm.aux_loss(model)):.4f}  "
                f"load[0] {loads[0]}  {time.perf_counter() - started:.0f}s",
                flush=True,
            )

    params_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    dead = {n: (load == 0).nonzero().flatten().tolist() for n, load in window_load.items()}
    print()
    print(f"model: dim {args.dim}, {args.layers} layers, top-2 of 8 experts, on {args.device}")
    print(
        f"steps {args.steps}, batch {args.batch} x {args.seq} tokens, {args.dtype}, "
        f"seed {args.seed}, {time.perf_counter() - started:.0f}s"
    )
    print(
        f"loss: first {first_loss:.3f}, mean of last {args.window} "
        f"{sum(last_losses) / len(last_losses):.3f}"
    )
    print(
        f"steps with a non-finite loss or gradient: {nonfinite_steps}; "
        f"parameters finite at the end: {params_finite}"
    )
    for name, load in window_load.items():
        share = load.float() / load.sum()
        print(
            f"{name}: last-{args.window}-step load share min {float(share.min()):.3f} "
            f"max {float(share.max()):.3f} (uniform {1 / len(load):.3f}); dead {dead[name]}"
        )
    ok = nonfinite_steps == 0 and params_finite and not any(dead.values())
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
