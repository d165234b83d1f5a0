"""Mixture-of-Depths decoding: train a tiny MoD LM briefly, calibrate, generate with a KV cache.

    python examples/mod_generate.py

Prints the loss, each MoD layer's realized capacity, and whether cached greedy decoding equals
recomputing the whole sequence each step (it must: decisions in eval are per token).
"""

from __future__ import annotations

import torch

import pytorch_mixtures as pm
from pytorch_mixtures.models import ModelConfig, TransformerLM


def main() -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, dim=64, num_layers=4, num_heads=4, ffn_hidden=128,
                         kind="mod", mod_capacity=0.25)  # fmt: skip
    model = TransformerLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(64).repeat(8, 2)[:, :96] % 64  # a counting sequence, easy to learn
    for _ in range(30):
        out = model(data[:, :-1], targets=data[:, 1:])
        assert out.loss is not None
        loss = out.loss + pm.aux_loss(model)  # task loss + the MoD predictors' BCE
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"loss {float(out.loss.detach()):.3f}")

    pm.calibrate_thresholds(model, [data[:, :-1]])  # eval capacity = mod_capacity
    model.eval()
    prompt = data[:2, :10]
    cached = model.generate(prompt, 20, use_cache=True)
    full = model.generate(prompt, 20, use_cache=False)
    for i, layer in enumerate(model.layers):
        if isinstance(layer, pm.MixtureOfDepths):
            model(data[:, :-1])
            print(f"layer {i}: realized capacity {float(layer.stats.realized_capacity):.3f}")
    print("cached == recomputed:", torch.equal(cached, full))


if __name__ == "__main__":
    main()
