"""Temporary GPU smoke check for issue 5 (not committed)."""
import copy, sys, time
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
import pytorch_mixtures as pm

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(torch.__version__, dev, torch.cuda.get_device_name(0) if dev.type == "cuda" else "")
torch.manual_seed(0)
D, E = 64, 8
def experts():
    return pm.SwiGLUExperts(E, D, 96)
cases = {
    "topk": lambda: pm.TopKRouter(D, E, 2),
    "sequence": lambda: pm.TopKRouter(D, E, 2, balance="sequence"),
    "noisy": lambda: pm.TopKRouter(D, E, 2, noisy_gating=True),
    "bias_groups": lambda: pm.TopKRouter(D, E, 2, score_func="sigmoid", expert_bias=True, num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
    "ec_count": lambda: pm.ExpertChoiceRouter(D, E, capacity=5),
    "ec_frac": lambda: pm.ExpertChoiceRouter(D, E, capacity=0.25),
    "uniform_rr": lambda: pm.UniformRouter(D, E, 2, mode="round_robin", capacity_factor=1.0),
    "hash": lambda: pm.HashRouter(D, E, 100, capacity_factor=1.25),
}
ok = True
x = torch.randn(4, 33, D)
mask = torch.ones(4, 33, dtype=torch.long); mask[1, 20:] = 0
ids = torch.randint(100, (4, 33))
for name, make in cases.items():
    cpu = pm.MoELayer(D, make(), experts(), shared_experts=nn.Linear(D, D), shared_expert_gate=True).eval()
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
    finite = bool(torch.isfinite(xg.grad).all())
    st = pm.routing_stats(gpu)["<root>"]
    good = err < 1e-4 and finite and yb.dtype == xg.dtype
    ok &= good
    print(f"{name:12s} fp32 max|gpu-cpu|={err:.2e} bf16 dtype={yb.dtype} grads finite={finite} "
          f"aux={loss.item():.4f} loads={st['tokens_per_expert']} entropy={st['router_entropy']:.3f} {'OK' if good else 'FAIL'}")

# bias counting under checkpointing + accumulation on CUDA, and float32 bias under .to(bf16)
router = pm.TopKRouter(D, E, 2, score_func="sigmoid", expert_bias=True)
moe = pm.MoELayer(D, router, experts()).to(dev).train()
xs = [torch.randn(2, 16, D, device=dev) for _ in range(2)]
want = sum(torch.bincount(router(m).expert_ids, minlength=E) for m in xs)
router.update_expert_bias(0.0)
for reentrant in (False, True):
    for m in xs:
        checkpoint(moe, m.clone().requires_grad_(True), use_reentrant=reentrant).sum().backward()
    got = router.pending_loads
    loads = pm.update_expert_bias(moe, rate=0.0)["router"]
    same = torch.equal(got, want) and torch.equal(loads, want)
    ok &= same
    print("checkpoint reentrant", reentrant, "counts once:", same, got.device, got.tolist(), want.tolist())
moe.to(torch.bfloat16)
print("bias dtype after .to(bf16):", router.expert_bias.dtype, router.expert_bias.device)
ok &= router.expert_bias.dtype == torch.float32

soft = pm.SoftMoE(D, E, 2, experts())
sg = copy.deepcopy(soft).to(dev)
err = (sg(x.to(dev), mask.to(dev)).cpu() - soft(x, mask)).abs().max().item()
with torch.autocast(dev.type, dtype=torch.bfloat16):
    yb = sg(x.to(dev))
print(f"SoftMoE fp32 max|gpu-cpu|={err:.2e} bf16 out {yb.dtype} finite {bool(torch.isfinite(yb).all())}")
ok &= err < 1e-4
print("ALL OK" if ok else "SOME FAILED")
sys.exit(0 if ok else 1)
