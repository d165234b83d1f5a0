"""Hugging Face interop: from_hf / to_hf equivalence per family, on tiny random configs.

Every block is built from a config (no downloads) with random weights; the library layer must
reproduce the block's output and input/weight gradients in float32, and its balance loss must
equal transformers' own loss function on the same router logits.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytorch_mixtures as pm

transformers = pytest.importorskip("transformers")

ATOL, RTOL = 1e-5, 1e-5


def randomize(module: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # float buffers too: DeepSeek-V3's e_score_correction_bias must change the selection
        tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
        for tensor in tensors:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
    return module.eval()


def mixtral_block(
    dim: int, hidden: int, experts: int, top_k: int, seed: int, act: str = "silu"
) -> nn.Module:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(
        hidden_size=dim,
        intermediate_size=hidden,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        hidden_act=act,
    )
    config._experts_implementation = "eager"
    return randomize(MixtralSparseMoeBlock(config), seed)


def qwen3_block(dim: int, hidden: int, experts: int, top_k: int, norm: bool, seed: int):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = transformers.Qwen3MoeConfig(
        hidden_size=dim,
        moe_intermediate_size=hidden,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
    )
    config._experts_implementation = "eager"
    return randomize(Qwen3MoeSparseMoeBlock(config), seed)


def qwen2_block(
    dim: int, hidden: int, shared: int, experts: int, top_k: int, norm: bool, seed, act="silu"
):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = transformers.Qwen2MoeConfig(
        hidden_act=act,
        hidden_size=dim,
        moe_intermediate_size=hidden,
        shared_expert_intermediate_size=shared,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
    )
    config._experts_implementation = "eager"
    return randomize(Qwen2MoeSparseMoeBlock(config), seed)


def deepseek_block(dim, hidden, experts, top_k, groups, topk_groups, norm, scale, shared, seed):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(
        hidden_size=dim,
        moe_intermediate_size=hidden,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_group=groups,
        topk_group=topk_groups,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        n_shared_experts=shared,
    )
    config._experts_implementation = "eager"
    return randomize(DeepseekV3MoE(config), seed)


def olmoe_block(dim: int, hidden: int, experts: int, top_k: int, seed: int) -> nn.Module:
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    config = transformers.OlmoeConfig(
        hidden_size=dim, intermediate_size=hidden, num_experts=experts, num_experts_per_tok=top_k
    )
    config._experts_implementation = "eager"
    return randomize(OlmoeSparseMoeBlock(config), seed)


def switch_block(dim: int, hidden: int, experts: int, capacity: int, seed: int, act="relu"):
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    config = transformers.SwitchTransformersConfig(
        d_model=dim,
        d_ff=hidden,
        num_experts=experts,
        expert_capacity=capacity,
        router_bias=False,
        dense_act_fn=act,
    )
    return randomize(SwitchTransformersSparseMLP(config), seed)


def out_and_grads(module: nn.Module, x: torch.Tensor, params: list[torch.Tensor]):
    """Output and gradients of a fixed random projection of it w.r.t. x and params."""
    x = x.clone().requires_grad_(True)
    for p in params:
        p.grad = None
    y = module(x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * probe).sum().backward()
    # an expert no token chose has no gradient in HF's loop (None) and zero in the library's
    return y.detach(), [
        x.grad,
        *[torch.zeros_like(p) if p.grad is None else p.grad for p in params],
    ]


def assert_block_equivalent(block: nn.Module, moe: pm.MoELayer, shape, hf_params, pm_params):
    """Outputs and gradients (HF's parameter layouts mapped by ``pm_params``) agree."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    y_hf, g_hf = out_and_grads(block, x, hf_params)
    y_pm, g_pm = out_and_grads(moe, x, [p for p, _ in pm_params])
    torch.testing.assert_close(y_pm, y_hf, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(g_pm[0], g_hf[0], atol=ATOL, rtol=RTOL)
    for (_, to_hf_layout), got, want in zip(pm_params, g_pm[1:], g_hf[1:], strict=True):
        torch.testing.assert_close(to_hf_layout(got), want, atol=ATOL, rtol=RTOL)


def fused_params(block: nn.Module, moe: pm.MoELayer):
    hf = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
    ours = [
        (moe.router.gate.weight, lambda g: g),
        (moe.experts.w_gate_up, lambda g: g.transpose(1, 2)),
        (moe.experts.w_down, lambda g: g.transpose(1, 2)),
    ]
    return hf, ours


def hf_balance_loss(logits: torch.Tensor, experts: int, top_k: int, mask=None) -> torch.Tensor:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func((logits,), experts, top_k, mask)


@pytest.mark.filterwarnings("ignore:TopKRouter.top_k=1, normalize_weights=True")
@pytest.mark.parametrize(
    ("dim", "hidden", "experts", "top_k"), [(16, 24, 4, 2), (32, 8, 8, 3), (8, 12, 6, 1)]
)
def test_mixtral_block_equivalence(dim, hidden, experts, top_k):
    block = mixtral_block(dim, hidden, experts, top_k, seed=dim + top_k)
    moe = pm.interop.from_hf(block)
    assert isinstance(moe.experts, pm.SwiGLUExperts) and moe.router.normalize_weights
    assert_block_equivalent(block, moe, (3, 5, dim), *fused_params(block, moe))

    # balance loss: the library's value equals transformers' on the same logits, with padding
    x = torch.randn(3, 5, dim)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    logits = block.gate(x)[0].detach()
    moe(x)
    want = hf_balance_loss(logits, experts, top_k)
    torch.testing.assert_close(moe.aux_losses["load_balancing"], want)
    moe(x, attention_mask=mask)
    want_masked = hf_balance_loss(logits, experts, top_k, mask)
    torch.testing.assert_close(moe.aux_losses["load_balancing"], want_masked)
    assert not torch.allclose(want, want_masked)


@pytest.mark.parametrize(
    ("dim", "hidden", "experts", "top_k", "norm"),
    [(16, 24, 8, 2, True), (16, 24, 8, 2, False), (24, 16, 4, 4, False), (8, 8, 6, 1, False)],
)
def test_qwen3_moe_block_equivalence(dim, hidden, experts, top_k, norm):
    block = qwen3_block(dim, hidden, experts, top_k, norm, seed=hidden + top_k)
    moe = pm.interop.from_hf(block)
    assert moe.router.normalize_weights == norm
    assert_block_equivalent(block, moe, (2, 7, dim), *fused_params(block, moe))
    x = torch.randn(2, 7, dim)
    moe(x)
    want = hf_balance_loss(block.gate(x)[0].detach(), experts, top_k)
    torch.testing.assert_close(moe.aux_losses["load_balancing"], want)


def shared_params(block: nn.Module, moe: pm.MoELayer, hf_name: str):
    hf, ours = fused_params(block, moe)
    for name in ("gate_proj", "up_proj", "down_proj"):
        hf.append(getattr(getattr(block, hf_name), name).weight)
        ours.append((getattr(moe.shared_experts, name).weight, lambda g: g))
    return hf, ours


@pytest.mark.parametrize(
    ("dim", "hidden", "shared", "experts", "top_k", "norm"),
    [(16, 8, 24, 8, 2, False), (24, 12, 12, 4, 3, True), (8, 16, 32, 6, 1, False)],
)
def test_qwen2_moe_block_with_gated_shared_expert(dim, hidden, shared, experts, top_k, norm):
    block = qwen2_block(dim, hidden, shared, experts, top_k, norm, seed=dim + shared)
    moe = pm.interop.from_hf(block)
    assert isinstance(moe.shared_experts, pm.interop.SwiGLUMLP)
    hf, ours = shared_params(block, moe, "shared_expert")
    hf.append(block.shared_expert_gate.weight)
    ours.append((moe.shared_expert_gate.weight, lambda g: g))
    assert_block_equivalent(block, moe, (3, 6, dim), hf, ours)
    x = torch.randn(3, 6, dim)
    moe(x)
    want = hf_balance_loss(block.gate(x)[0].detach(), experts, top_k)
    torch.testing.assert_close(moe.aux_losses["load_balancing"], want)


@pytest.mark.parametrize(
    ("dim", "experts", "top_k", "groups", "topk_groups", "norm", "scale", "shared"),
    [
        (16, 8, 2, 4, 2, True, 2.5, 1),
        (24, 16, 4, 4, 1, True, 1.0, 2),
        (8, 8, 3, 1, 1, False, 1.5, 1),
        (16, 12, 2, 3, 2, False, 2.5, 1),
    ],
)
def test_deepseek_v3_block_equivalence(
    dim, experts, top_k, groups, topk_groups, norm, scale, shared
):
    block = deepseek_block(
        dim, 8, experts, top_k, groups, topk_groups, norm, scale, shared, seed=dim
    )
    moe = pm.interop.from_hf(block)
    router = moe.router
    assert router.score_func == "sigmoid" and router.routed_scaling_factor == scale
    assert (router.num_groups, router.topk_groups) == (groups, topk_groups)
    assert torch.equal(router.expert_bias, block.gate.e_score_correction_bias)
    assert_block_equivalent(block, moe, (2, 9, dim), *shared_params(block, moe, "shared_experts"))
    # the bias matters: without it the selection (hence the output) changes
    x = torch.randn(2, 9, dim)
    with torch.no_grad():
        router.expert_bias.zero_()
    assert not torch.allclose(moe(x), block(x), atol=1e-4)


def test_olmoe_block_equivalence():
    block = olmoe_block(12, 20, 6, 2, seed=3)
    moe = pm.interop.from_hf(block)
    assert_block_equivalent(block, moe, (2, 6, 12), *fused_params(block, moe))


@pytest.mark.parametrize(
    ("dim", "hidden", "experts", "act"), [(16, 32, 4, "relu"), (8, 12, 8, "gelu")]
)
def test_switch_block_equivalence_when_no_token_overflows(dim, hidden, experts, act):
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func,
        router_z_loss_func,
    )

    seq = 9
    # expert_capacity >= sequence length: Switch never drops, like the dropless conversion
    block = switch_block(dim, hidden, experts, capacity=seq, seed=dim, act=act)
    moe = pm.interop.from_hf(block)
    assert moe.router.top_k == 1 and not moe.router.normalize_weights
    assert isinstance(moe.experts, pm.MLPExperts) and moe.experts.activation == act
    hf_params = [block.router.classifier.weight]
    ours = [(moe.router.gate.weight, lambda g: g)]
    for e in range(experts):
        hf_params += [
            block.experts[f"expert_{e}"].wi.weight,
            block.experts[f"expert_{e}"].wo.weight,
        ]
        ours += [
            (moe.experts.w_in, lambda g, e=e: g[e].T),
            (moe.experts.w_out, lambda g, e=e: g[e].T),
        ]
    assert_block_equivalent(block, moe, (2, seq, dim), hf_params, ours)

    # losses of one sequence (HF's Switch balance loss averages per sequence; see hf.py)
    x = torch.randn(1, seq, dim)
    moe(x)
    logits = block.router(x)[2].detach()
    want_balance = load_balancing_loss_func(logits.softmax(-1), logits.argmax(-1))
    torch.testing.assert_close(moe.aux_losses["load_balancing"], want_balance)
    torch.testing.assert_close(moe.aux_losses["router_z"], router_z_loss_func(logits))


def test_switch_capacity_semantics_differ_and_are_documented():
    """With a per-sequence capacity Switch drops tokens; the dropless conversion does not."""
    block = switch_block(8, 16, 2, capacity=1, seed=0)
    moe = pm.interop.from_hf(block)
    x = torch.randn(1, 6, 8)
    y_hf, y_pm = block(x).detach(), moe(x).detach()
    dropped = y_hf.abs().sum(-1).eq(0)
    assert dropped.any() and not y_pm.abs().sum(-1).eq(0).any()
    torch.testing.assert_close(y_pm[~dropped], y_hf[~dropped], atol=ATOL, rtol=RTOL)
    assert "per sequence" in pm.interop.hf.__doc__


FAMILIES = {
    "mixtral": lambda: mixtral_block(16, 8, 4, 2, seed=11),
    "qwen3": lambda: qwen3_block(16, 8, 4, 2, False, seed=12),
    "qwen2": lambda: qwen2_block(16, 8, 12, 4, 2, True, seed=15),
    "deepseek": lambda: deepseek_block(16, 8, 8, 2, 4, 2, True, 2.5, 1, seed=16),
    "olmoe": lambda: olmoe_block(16, 8, 4, 2, seed=13),
    "switch": lambda: switch_block(16, 8, 4, 4, seed=14),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_and_to_hf_carries_trained_weights(family):
    block = FAMILIES[family]()
    back = pm.interop.to_hf(pm.interop.from_hf(block), like=block)
    assert type(back) is type(block) and back is not block
    want = block.state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key

    # a changed library layer goes back into the HF layout and computes the same function
    moe = pm.interop.from_hf(block)
    randomize(moe, seed=99)
    exported = pm.interop.to_hf(moe, like=block)
    x = torch.randn(2, 4, 16)
    torch.testing.assert_close(exported(x), moe(x), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(block(x), moe(x))  # `like` itself was left untouched


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match=r"block: expected one of .*MixtralSparseMoeBlock"):
        pm.interop.from_hf(nn.Linear(4, 4))
    block = mixtral_block(16, 8, 4, 2, seed=0)
    moe = pm.interop.from_hf(block)
    other = mixtral_block(16, 8, 4, 3, seed=0)
    with pytest.raises(ValueError, match=r"moe.router.top_k: expected 3 .* got 2"):
        pm.interop.to_hf(moe, like=other)
    wider = mixtral_block(16, 12, 4, 2, seed=0)
    with pytest.raises(ValueError, match=r"like\.experts\.gate_up_proj: expected shape"):
        pm.interop.to_hf(moe, like=wider)
    with pytest.raises(TypeError, match="moe: expected a pytorch_mixtures MoELayer"):
        pm.interop.to_hf(block, like=block)
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    config = transformers.SwitchTransformersConfig(
        d_model=8, d_ff=8, num_experts=2, router_bias=True
    )
    with pytest.raises(ValueError, match=r"router\.classifier\.bias: expected None"):
        pm.interop.from_hf(SwitchTransformersSparseMLP(config))
    # GELU experts convert now (GeGLU); learned or unknown activations are refused by name
    block.experts.act_fn = nn.PReLU()
    with pytest.raises(ValueError, match=r"block\.experts\.act_fn: .* PReLU with learned"):
        pm.interop.from_hf(block)
    block.experts.act_fn = nn.Softsign()
    with pytest.raises(ValueError, match=r"block\.experts\.act_fn: expected one of .* Softsign"):
        pm.interop.from_hf(block)
    gelu_moe = pm.interop.from_hf(mixtral_block(16, 8, 4, 2, seed=0, act="gelu"))
    with pytest.raises(ValueError, match=r"moe\.experts\.activation: expected 'silu' .* 'gelu'"):
        pm.interop.to_hf(gelu_moe, like=mixtral_block(16, 8, 4, 2, seed=0))


# every parameter-free activation of transformers' ACT2FN (prelu and xielu learn parameters)
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_10": "gelu_10",
    "gelu_accurate": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_python": "gelu",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "hardswish": "hardswish",
    "laplace": "laplace",
    "leaky_relu": "leaky_relu",
    "linear": "identity",
    "mish": "mish",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "relu2": "relu2",
    "relu6": "relu6",
    "sigmoid": "sigmoid",
    "silu": "silu",
    "sqrtsoftplus": "sqrtsoftplus",
    "swish": "silu",
    "tanh": "tanh",
}


def test_activation_table_covers_transformers_act2fn():
    from transformers.activations import ACT2FN

    assert set(ACT2FN) - set(HF_ACTIVATIONS) == {"prelu", "xielu"}


@pytest.mark.parametrize("hidden_act", sorted(HF_ACTIVATIONS))
def test_mixtral_block_with_each_transformers_activation(hidden_act):
    block = mixtral_block(16, 12, 4, 2, seed=5, act=hidden_act)
    moe = pm.interop.from_hf(block)
    assert moe.experts.activation == HF_ACTIVATIONS[hidden_act]
    # the fused CPU SwiGLU kernel stays for SiLU only
    x = torch.randn(10, 16)
    assert moe.experts.fuses_combine(x, "loop") == (HF_ACTIVATIONS[hidden_act] == "silu")
    assert_block_equivalent(block, moe, (2, 5, 16), *fused_params(block, moe))
    for backend in ("loop", "grouped_mm"):
        moe.experts.backend = backend
        assert_block_equivalent(block, moe, (3, 4, 16), *fused_params(block, moe))
    back = pm.interop.to_hf(moe, like=block)
    for key, value in block.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("hidden_act", ["prelu", "xielu"])
def test_activations_with_learned_parameters_are_refused(hidden_act):
    with pytest.raises(ValueError, match=r"block\.experts\.act_fn: .* with learned parameters"):
        pm.interop.from_hf(mixtral_block(16, 12, 4, 2, seed=5, act=hidden_act))


def test_qwen2_moe_geglu_experts_and_shared_expert_round_trip():
    block = qwen2_block(16, 8, 12, 4, 2, True, seed=21, act="gelu_pytorch_tanh")
    moe = pm.interop.from_hf(block)
    assert moe.experts.activation == moe.shared_experts.activation == "gelu_tanh"
    hf, ours = shared_params(block, moe, "shared_expert")
    hf.append(block.shared_expert_gate.weight)
    ours.append((moe.shared_expert_gate.weight, lambda g: g))
    assert_block_equivalent(block, moe, (2, 5, 16), hf, ours)
    back = pm.interop.to_hf(moe, like=block)
    for key, value in block.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
