"""torch.compile (inductor) of every router, in training and eval, against eager.

The tests compile with the ``aot_eager`` backend (dynamo + AOT autograd, seconds); inductor's
code generation takes minutes on a 2-core CPU, so it is checked here instead:

    .venv/bin/python benchmarks/compile_routers.py                 # CPU
    .venv/bin/python benchmarks/compile_routers.py --device cuda   # GPU

Prints, per router and mode, whether routing decisions are identical and weights, aux loss and
input gradients match, and the compile time. Exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import pytorch_mixtures as pm

DIM, EXPERTS = 32, 8
ROUTERS: dict[str, Callable[[], pm.Router]] = {
    "topk": lambda: pm.TopKRouter(DIM, EXPERTS, 2),
    "topk_capacity": lambda: pm.TopKRouter(DIM, EXPERTS, 2, capacity_factor=1.0),
    "topk_sigmoid": lambda: pm.TopKRouter(DIM, EXPERTS, 2, score_func="sigmoid"),
    "expert_choice": lambda: pm.ExpertChoiceRouter(DIM, EXPERTS, 2.0),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    failures = 0
    for name, make in ROUTERS.items():
        for training in (True, False):
            torch.manual_seed(0)
            eager = make().to(args.device).train(training)
            compiled = torch.compile(eager, backend=args.backend)
            x = torch.randn(4, 16, DIM, device=args.device, requires_grad=True)
            started = time.perf_counter()
            a, b = eager(x), compiled(x)
            seconds = time.perf_counter() - started
            same_ids = all(
                torch.equal(getattr(a, f), getattr(b, f))
                for f in ("token_ids", "expert_ids", "kept")
            )
            close = torch.allclose(a.weights, b.weights, atol=1e-6) and torch.allclose(
                a.aux_loss, b.aux_loss, atol=1e-6
            )
            ga = torch.autograd.grad(a.weights.sum() + a.aux_loss, x)[0]
            gb = torch.autograd.grad(b.weights.sum() + b.aux_loss, x)[0]
            grads = torch.allclose(ga, gb, atol=1e-6)
            ok = same_ids and close and grads
            failures += not ok
            mode = "train" if training else "eval"
            print(
                f"{name:14s} {mode:5s} ids equal {same_ids}  weights/aux close {close}  "
                f"grad close {grads}  compile+run {seconds:.1f}s"
            )
    print("RESULT:", "PASS" if failures == 0 else f"FAIL ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
