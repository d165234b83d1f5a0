"""Tiny randomly initialised Hugging Face models for the interop tests (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(
    vocab_size: int, *, seed: int = 0, attn: str | None = None, num_layers: int = 4
) -> nn.Module:
    """A 4-layer Llama (hidden 32, 4 heads, 2 KV heads) in eval mode; transformers required."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if attn is not None:
        config._attn_implementation = attn
    return transformers.LlamaForCausalLM(config).eval()
