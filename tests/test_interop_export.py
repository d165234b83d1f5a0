"""``pm.interop.export_pretrained``: native ``transformers`` checkpoints, loaded without us.

Each case (a Llama upcycled as Mixtral, a Qwen3 upcycled as Qwen3-MoE, and converted Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 models whose weights and expert bias changed after
conversion, as in training) is exported once; one fresh Python process, which checks that it
never imports pytorch_mixtures, loads every folder with ``AutoModelForCausalLM.from_pretrained``
and writes its logits. Compared here: those logits with the library model's, and every key and
value of the loaded native model with the library model's tensors mapped by hand to the native
layout (nothing lost, nothing added).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import hf_models
import pytorch_mixtures as pm

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 53
IDS = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))

FRESH = r"""
import json, sys
import safetensors.torch as st
import torch
import transformers
jobs = json.loads(sys.argv[1])
ids = st.load_file(sys.argv[2])["ids"]
for folder, out in jobs:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    st.save_file({"logits": logits.contiguous(), "arch": torch.zeros(0)}, out,
                 metadata={"class": type(model).__name__})
assert not [m for m in sys.modules if m.split(".")[0] == "pytorch_mixtures"], "imported"
print("no pytorch_mixtures")
"""


def trained(model: nn.Module) -> nn.Module:
    """Stand-in for training: move every weight and expert bias (deterministically)."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
        for module in model.modules():
            bias = getattr(module, "expert_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.add_(0.1 * torch.randn(bias.shape, generator=gen))
    return model.eval()


def upcycled(dense: nn.Module, every: int) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    model = pm.interop.moeify(
        dense, num_experts=4, top_k=2, every=every, noise=0.1, router_init_std=0.5, generator=gen
    )
    return model.eval()


CASES = {
    "llama_as_mixtral": (lambda: upcycled(hf_models.tiny_llama(VOCAB, num_layers=2), 1), "mixtral"),
    "qwen3_as_qwen3_moe": (
        lambda: upcycled(hf_models.tiny_qwen3(VOCAB, num_layers=2), 2),
        "qwen3_moe",
    ),
    **{
        family: (
            lambda family=family: trained(
                pm.interop.from_hf_model(hf_models.tiny_moe_lm(family, VOCAB))
            ),
            None,
        )
        for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
    },
    "deepseek_v3": (
        lambda: trained(pm.interop.from_hf_model(hf_models.tiny_deepseek_v3(VOCAB))),
        None,
    ),
}


def native_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """The library model's tensors under the native block's names (written out by hand)."""
    moes = {n: m for n, m in model.named_modules() if isinstance(m, pm.MoELayer)}
    out = {}
    for key, value in model.state_dict().items():
        prefix = next((n for n in moes if key.startswith(n + ".")), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix) + 1 :]
        shared = "shared_experts" if "deepseek" in type(model).__name__.lower() else "shared_expert"
        # HF's fused experts compute x @ W.T with W [E, 2H, D]; the library's x @ W, W [E, D, 2H]
        transposed = {
            "experts.w_gate_up": "experts.gate_up_proj",
            "experts.w_down": "experts.down_proj",
        }
        same = {
            "router.gate.weight": "gate.weight",
            "router.expert_bias": "gate.e_score_correction_bias",
            "shared_expert_gate.weight": "shared_expert_gate.weight",
        }
        if rest in transposed:
            out[f"{prefix}.{transposed[rest]}"] = value.transpose(1, 2)
        elif rest in same:
            out[f"{prefix}.{same[rest]}"] = value
        else:
            assert rest.startswith("shared_experts."), rest
            out[f"{prefix}.{shared}{rest[len('shared_experts') :]}"] = value
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    models, jobs = {}, []
    for name, (build, like) in CASES.items():
        model = build()
        folder = pm.interop.export_pretrained(model, root / name, like=like)
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.json",
            "generation_config.json",
            "model.safetensors",
        ]
        models[name] = model
        jobs.append((str(folder), str(root / f"{name}.logits.safetensors")))
    safetensors_torch.save_file({"ids": IDS}, str(root / "ids.safetensors"))
    done = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(jobs), str(root / "ids.safetensors")],
        capture_output=True,
        text=True,
        timeout=240,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": ""},
        cwd=str(root),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no pytorch_mixtures" in done.stdout
    return root, models


@pytest.mark.parametrize("name", sorted(CASES))
def test_fresh_process_without_library_gives_same_logits(exported, name):
    root, models = exported
    with safetensors_torch.safe_open(str(root / f"{name}.logits.safetensors"), "pt") as file:
        got = file.get_tensor("logits")
        loaded_class = file.metadata()["class"]
    with torch.no_grad():
        want = models[name](input_ids=IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if CASES[name][1] is None:
        assert loaded_class == type(models[name]).__name__
    else:
        assert (
            loaded_class
            == {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[CASES[name][1]]
        )


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_key_and_value_survives(exported, name):
    root, models = exported
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(root / name))
    got = loaded.state_dict()
    want = native_layout(models[name])
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    if name == "deepseek_v3":  # the trained selection bias is written back
        biases = [k for k in got if k.endswith("e_score_correction_bias")]
        assert biases and all(got[k].abs().sum() > 0 for k in biases)
    if name == "qwen3_as_qwen3_moe":  # layer 0 stays dense, layer 1 is sparse
        assert loaded.config.mlp_only_layers == [0]
        assert type(loaded.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"


def llama(**config) -> nn.Module:
    model = hf_models.tiny_llama(VOCAB, num_layers=2)
    for key, value in config.items():
        setattr(model.config, key, value)
    return model


def test_refuses_what_the_target_cannot_express(tmp_path):
    def refused(model, match, like="mixtral"):
        with pytest.raises(ValueError, match=match):
            pm.interop.export_pretrained(model, tmp_path / "out", like=like)
        assert not (tmp_path / "out").exists()

    refused(upcycled(llama(), 2), r"layers\[0\]\.mlp: expected a MoELayer in every decoder layer")
    refused(upcycled(llama(attention_bias=True), 1), r"config\.attention_bias: expected False")
    model = upcycled(llama(), 1)
    model.model.layers[1].mlp.shared_experts = pm.interop.SwiGLUMLP(32, 8)
    refused(model, r"layers\[1\]\.mlp\.shared_experts: expected None .*got 'SwiGLUMLP'")
    model = upcycled(llama(), 1)
    model.model.layers[0].mlp.router.normalize_weights = False
    refused(model, r"router\.normalize_weights: expected True .*Mixtral")
    refused(
        pm.interop.moeify(llama(), num_experts=4, capacity_factor=1.25),
        r"router\.capacity_factor: expected None",
    )
    model = upcycled(llama(), 1)
    model.model.layers[0].mlp.router.schemes = type(model.model.layers[0].mlp.router.schemes)(
        **{**vars(model.model.layers[0].mlp.router.schemes), "routed_scaling_factor": 2.0}
    )
    refused(model, r"routed_scaling_factor: expected 1\.0")
    refused(upcycled(llama(), 1), r"like: expected 'mixtral' for an upcycled 'llama'", "qwen3_moe")
    refused(
        pm.interop.from_hf_model(hf_models.tiny_moe_lm("olmoe", VOCAB)),
        r"like: expected None or 'olmoe'",
        "mixtral",
    )
    refused(
        hf_models.tiny_qwen3(VOCAB, num_layers=2),
        r"expected moeify-upcycled MoE layers",
        "qwen3_moe",
    )
    refused(hf_models.tiny_gemma(VOCAB), r"model_type: expected one of")
    # a library module the native model has no place for (Mixture-of-Depths) is not dropped
    qwen = hf_models.tiny_qwen3(VOCAB, num_layers=2)
    qwen = pm.interop.route_depths(upcycled(qwen, 2), capacity=0.5, every=1)
    refused(
        qwen, r"layers\[0\]: expected a decoder layer with an mlp .*MoDDecoderLayer", "qwen3_moe"
    )


def test_path_and_argument_checks(tmp_path):
    model = upcycled(llama(), 1)
    with pytest.raises(TypeError, match=r"model: expected an nn\.Module"):
        pm.interop.export_pretrained("model", tmp_path / "a", like="mixtral")
    with pytest.raises(TypeError, match="like: expected None or a model_type string"):
        pm.interop.export_pretrained(model, tmp_path / "a", like=3)
    with pytest.raises(ValueError, match="path: expected a path in an existing folder"):
        pm.interop.export_pretrained(model, tmp_path / "no" / "a", like="mixtral")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="path: expected a new or empty folder"):
        pm.interop.export_pretrained(model, tmp_path / "full", like="mixtral")
    out = pm.interop.export_pretrained(model, tmp_path / "full", like="mixtral", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    # nothing is left behind next to the target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    copy.deepcopy(model)  # the exported model is unchanged and still usable
