"""GPU check of the routing schemes: CUDA against CPU, bf16 autocast, bias counting.

Run on a CUDA machine (falls back to CPU elsewhere), exit status 0 when everything holds::

    PYTHONPATH=src python benchmarks/routing_gpu_check.py
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import pytorch_mixtures as pm

DIM, EXPERTS, VOCAB = 64, 8, 100

CASES: dict[str, Callable[[], pm.Router]] = {
    "topk": lambda: pm.TopKRouter(DIM, EXPERTS, 2),
    "sequence": lambda: pm.TopKRouter(DIM, EXPERTS, 2, balance="sequence"),
    "noisy": lambda: pm.TopKRouter(DIM, EXPERTS, 2, noisy_gating=True),
    "bias_groups": lambda: pm.TopKRouter(
        DIM,
        EXPERTS,
        2,
        score_func="sigmoid",
        expert_bias=True,
        num_groups=4,
        topk_groups=2,
        routed_scaling_factor=2.5,
    ),
    "ec_count": lambda: pm.ExpertChoiceRouter(DIM, EXPERTS, capacity=5),
    "ec_fraction": lambda: pm.ExpertChoiceRouter(DIM, EXPERTS, capacity=0.25),
    "round_robin": lambda: pm.UniformRouter(DIM, EXPERTS, 2, mode="round_robin"),
    "hash": lambda: pm.HashRouter(DIM, EXPERTS, VOCAB, capacity_factor=1.25),
}


def experts() -> pm.SwiGLUExperts:
    return pm.SwiGLUExperts(EXPERTS, DIM, 96)


def check_layers(dev: torch.device) -> bool:
    ok = True
    x = torch.randn(4, 33, DIM)
    mask = torch.ones(4, 33, dtype=torch.long)
    mask[1, 20:] = 0
    ids = torch.randint(VOCAB, (4, 33))
    for name, make in CASES.items():
        shared = nn.Linear(DIM, DIM)
        cpu = pm.MoELayer(
            DIM, make(), experts(), shared_experts=shared, shared_expert_gate=True
        ).eval()
        gpu = copy.deepcopy(cpu).to(dev)
        y_cpu = cpu(x, mask, token_ids=ids)
        y_gpu = gpu(x.to(dev), mask.to(dev), token_ids=ids.to(dev))
        err = (y_gpu.cpu() - y_cpu).abs().max().item()
        gpu.train()
        xg = x.to(dev).requires_grad_(True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            yb = gpu(xg, mask.to(dev), token_ids=ids.to(dev))
            loss = yb.float().square().mean() + pm.aux_loss(gpu)
        loss.backward()
        assert xg.grad is not None
        finite = bool(torch.isfinite(xg.grad).all())
        row = pm.routing_stats(gpu)["<root>"]
        good = err < 1e-4 and finite and yb.dtype == xg.dtype
        ok &= good
        print(
            f"{name:12s} fp32 max|dev-cpu| {err:.1e}  bf16 grads finite {finite}  "
            f"loads {row['tokens_per_expert']}  entropy {row['router_entropy']:.3f}  "
            f"{'OK' if good else 'FAIL'}"
        )
    return ok


def check_bias(dev: torch.device) -> bool:
    ok = True
    router = pm.TopKRouter(DIM, EXPERTS, 2, score_func="sigmoid", expert_bias=True)
    moe = pm.MoELayer(DIM, router, experts()).to(dev).train()
    micro = [torch.randn(2, 16, DIM, device=dev) for _ in range(2)]
    want = sum(torch.bincount(router(m).expert_ids, minlength=EXPERTS) for m in micro)
    router.update_expert_bias(0.0)
    for reentrant in (False, True):
        for m in micro:  # accumulation over checkpointed micro-batches
            checkpoint(
                moe, m.clone().requires_grad_(True), use_reentrant=reentrant
            ).sum().backward()
        got = router.pending_loads
        loads = pm.update_expert_bias(moe, rate=0.0)["router"]
        same = got is not None and torch.equal(got, want) and torch.equal(loads, want)
        ok &= same
        print(f"checkpoint(use_reentrant={reentrant}) counts once per forward: {same}")
    moe.to(torch.bfloat16)
    assert router.expert_bias is not None
    print(f"bias after .to(bfloat16): {router.expert_bias.dtype} on {router.expert_bias.device}")
    return ok and router.expert_bias.dtype == torch.float32


def check_soft_moe(dev: torch.device) -> bool:
    x = torch.randn(4, 33, DIM)
    mask = torch.ones(4, 33, dtype=torch.long)
    mask[2, 5:] = 0
    soft = pm.SoftMoE(DIM, EXPERTS, 2, experts())
    soft_dev = copy.deepcopy(soft).to(dev)
    err = (soft_dev(x.to(dev), mask.to(dev)).cpu() - soft(x, mask)).abs().max().item()
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        y = soft_dev(x.to(dev))
    finite = bool(torch.isfinite(y).all())
    print(f"SoftMoE fp32 max|dev-cpu| {err:.1e}  bf16 output finite {finite}")
    return err < 1e-4 and finite


def main() -> int:
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}")
    ok = check_layers(dev) & check_bias(dev) & check_soft_moe(dev)
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
