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


def tiny_gemma(vocab_size: int, *, seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A 2-layer Gemma (GeGLU MLPs: ``gelu_pytorch_tanh``) in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GemmaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    return transformers.GemmaForCausalLM(config).eval()


# config class, model class, and the config keys of each sparse-MoE decoder family
MOE_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 16, "norm_topk_prob": True, "head_dim": 8},
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {"num_experts": 4, "eos_token_id": 1, "pad_token_id": 1},
    ),
}


def tiny_moe_lm(
    family: str,
    vocab_size: int,
    *,
    seed: int = 0,
    num_layers: int = 2,
    top_k: int = 2,
    hidden_act: str = "silu",
    router_std: float = 0.5,
) -> nn.Module:
    """A tiny random sparse-MoE causal LM of ``family`` (see :data:`MOE_FAMILIES`), eval mode.

    Router weights get a larger std than the model's init, so routing is far from uniform and
    the balance losses tell layers and masks apart.
    """
    import transformers

    config_name, model_name, extra = MOE_FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_experts_per_tok=top_k,
        hidden_act=hidden_act,
        router_aux_loss_coef=0.02,
        **extra,
    )
    model = getattr(transformers, model_name)(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.dim() == 2 and "shared" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * router_std)
    return model.eval()


def tiny_qwen3(vocab_size: int, *, seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A 2-layer dense Qwen3 (q/k norms, head_dim 8) in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    return transformers.Qwen3ForCausalLM(config).eval()


def tiny_deepseek_v3(vocab_size: int, *, seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A tiny DeepSeek-V3 (MLA attention, layer 0 dense, then MoE with 8 experts in 4 groups,
    sigmoid scores, a shared expert, a nonzero ``e_score_correction_bias``) in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=64,
    )
    model = transformers.DeepseekV3ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.1)
    return model.eval()
