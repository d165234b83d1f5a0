#!/usr/bin/env bash
# GPU check and ratio table for pytorch-mixtures' MoELayer (installs nothing; < 5 minutes).
#
#   bash benchmarks/gpu.sh            # uses `python` from PATH (needs torch with CUDA)
#   PYTHON=/path/to/python bash benchmarks/gpu.sh
#
# 1. correctness: every CUDA backend (bf16 params, and fp32 params under bf16 autocast)
#    against the float64 CPU reference of the same layer, forward and gradients;
# 2. host syncs: counts synchronizing calls in a forward+backward of the grouped_mm path;
# 3. the ratio table (MoE / dense-equivalent, fwd and fwd+bwd, peak memory) for a
#    Mixtral-sized layer (4096 tokens x dim 4096, 8 experts of hidden 14336, top-2, bf16)
#    and the `fine` config scaled up (8192 tokens x dim 2048, 64 experts of hidden 1024, top-8).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY'
import warnings

import torch

import pytorch_mixtures as pm
from pytorch_mixtures.backends import grouped_mm_available

assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA device"
dev = torch.device("cuda")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}, "
      f"grouped_mm(bf16): {grouped_mm_available(dev, torch.bfloat16)}")

DIM, HIDDEN, EXPERTS, TOP_K = 256, 512, 8, 2


def build(capacity_factor, backend):
    torch.manual_seed(0)
    router = pm.TopKRouter(DIM, EXPERTS, TOP_K, capacity_factor=capacity_factor, init_std=0.5)
    return pm.MoELayer(DIM, router, pm.SwiGLUExperts(EXPERTS, DIM, HIDDEN, backend=backend))


def run(moe, x, probe, autocast):
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = moe(x)
    (y.float() * probe).sum().backward()
    grads = [x.grad] + [p.grad for p in moe.parameters()]
    return [y.detach().double().cpu()] + [g.double().cpu() for g in grads]


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


x_cpu = torch.randn(4, 256, DIM, dtype=torch.float64)
probe_cpu = torch.randn(4, 256, DIM, dtype=torch.float64)
worst = 0.0
for capacity_factor in (None, 1.25):
    reference = build(capacity_factor, "loop").double()
    want = run(reference, x_cpu, probe_cpu, autocast=False)
    backends = ["auto", "loop", "grouped_mm"] + (["bmm"] if capacity_factor else [])
    for backend in backends:
        for mode in ("bf16 params", "fp32 params + autocast"):
            moe = build(capacity_factor, backend).double()
            moe.load_state_dict(reference.state_dict())
            moe.to(dev)
            bf16 = mode == "bf16 params"
            # the router stays fp32 either way (its math is fp32 by design)
            if bf16:
                moe.experts.to(torch.bfloat16)
            moe.router.float()
            dtype = torch.bfloat16 if bf16 else torch.float32
            try:
                got = run(moe, x_cpu.to(dev, dtype), probe_cpu.to(dev, torch.float32),
                          autocast=not bf16)
            except ValueError as err:  # e.g. grouped_mm unsupported on this card
                print(f"  cf={capacity_factor} {backend:<10} {mode:<24} skipped: {err}")
                continue
            names = ["y", "dx"] + [n for n, _ in moe.named_parameters()]
            errs = {n: rel_err(g, w) for n, g, w in zip(names, got, want)}
            worst = max(worst, *errs.values())
            summary = " ".join(f"{n.split('.')[-1]}={e:.1e}" for n, e in errs.items())
            print(f"  cf={capacity_factor} {backend:<10} {mode:<24} rel. err vs fp64 CPU: {summary}")
print(f"worst relative error {worst:.2e} (bf16 tolerance 3e-2):", "OK" if worst < 3e-2 else "FAIL")

# host syncs in the grouped_mm / bmm hot path (the loop backend syncs by design)
for capacity_factor, backend in ((None, "grouped_mm"), (1.25, "bmm")):
    moe = build(capacity_factor, backend).to(dev)
    moe.experts.to(torch.bfloat16)
    x = torch.randn(4, 256, DIM, device=dev, dtype=torch.bfloat16, requires_grad=True)
    try:
        moe(x)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            moe(x).float().sum().backward()
        torch.cuda.set_sync_debug_mode("default")
        print(f"host syncs in a {backend} forward+backward: {len(caught)}")
        for w in caught[:5]:
            print("   ", str(w.message).splitlines()[0][:160])
    except ValueError as err:
        torch.cuda.set_sync_debug_mode("default")
        print(f"{backend}: skipped ({err})")
PY

for config in mixtral fine-xl; do
  "$PYTHON" -m pytorch_mixtures.app.cli bench --config "$config" --device cuda --dtype bfloat16 \
    --threads 1 --repeats 10 --warmup 3 "$@"
done

# inference: decode-shaped layer calls (1 / 8 / 64 tokens) and generate() (batch 1 / 8 / 64),
# eager and compiled (generate(compile=True): static cache, CUDA graphs via reduce-overhead)
"$PYTHON" -m pytorch_mixtures.app.cli bench --decode --compile --device cuda --dtype bfloat16 \
  --threads 1 --repeats 10 "$@"
