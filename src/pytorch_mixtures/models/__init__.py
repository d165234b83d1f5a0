"""A small reference decoder-only transformer LM (dense / MoE / MoD / MoDE)."""

from .transformer import Block, KVCache, LMOutput, ModelConfig, SwiGLU, TransformerLM

__all__ = ["Block", "KVCache", "LMOutput", "ModelConfig", "SwiGLU", "TransformerLM"]
