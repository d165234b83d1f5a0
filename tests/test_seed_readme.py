"""The seed package's README examples run as written (typos fixed: B, N, D; self.router)."""

from __future__ import annotations

import torch
import torch.nn as nn


def test_first_seed_example():
    from pytorch_mixtures.moe_layer import MoELayer
    from pytorch_mixtures.routing import ExpertChoiceRouter

    B, N, D = 2, 16, 64  # the seed's names, defined (DIM below)
    DIM, NUM_EXPERTS, CAPACITY_FACTOR = D, 8, 1.25
    router = ExpertChoiceRouter(dim=DIM, num_experts=NUM_EXPERTS)
    experts = [nn.Linear(DIM, DIM) for _ in range(NUM_EXPERTS)]
    moe = MoELayer(
        num_experts=NUM_EXPERTS, router=router, experts=experts, capacity_factor=CAPACITY_FACTOR
    )
    x = torch.randn(B, N, D)
    moe_output = moe(x)
    assert moe_output.shape == (B, N, D)
    assert router.capacity_factor == CAPACITY_FACTOR


def test_second_seed_example():
    from pytorch_mixtures.moe import MoELayer
    from pytorch_mixtures.routing import ExpertChoiceRouter
    from pytorch_mixtures.utils import MHSA

    class CustomMoEAttentionBlock(nn.Module):
        def __init__(self, dim, num_heads, num_experts, capacity_factor, experts):
            super().__init__()
            self.attn = MHSA(dim, num_heads)
            self.router = ExpertChoiceRouter(dim, num_experts)
            self.moe = MoELayer(dim, self.router, experts, capacity_factor)
            self.norm1 = nn.LayerNorm(dim)
            self.norm2 = nn.LayerNorm(dim)

        def forward(self, x):
            x = self.norm1(self.attn(x) + x)
            x = self.norm2(self.moe(x) + x)
            return x

    experts = [nn.Linear(768, 768) for _ in range(8)]
    my_block = CustomMoEAttentionBlock(
        dim=768, num_heads=8, num_experts=8, capacity_factor=1.25, experts=experts
    )
    x = torch.randn(2, 16, 768)  # the seed used 16 x 128; smaller keeps the test quick
    output = my_block(x)
    assert output.shape == (2, 16, 768)
