"""The trainer (``pytorch_mixtures.app.train``): schedule, FLOPs estimate, evaluation, telemetry,
checkpoints and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pytorch_mixtures.app.cli import main
from pytorch_mixtures.app.data import load_corpus
from pytorch_mixtures.app.train import (
    TrainConfig,
    build_model,
    evaluate,
    flops_per_token,
    lr_at,
    mod_layers,
    train,
)
from pytorch_mixtures.models import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# --- schedule, FLOPs, evaluation -------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    config = TrainConfig(steps=14, lr=1.0, min_lr_ratio=0.1, warmup_steps=4)
    assert [lr_at(s, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, config) == 1.0
    # halfway through the 10 cosine steps: floor + half the range
    assert math.isclose(lr_at(9, config), 0.1 + 0.9 * 0.5)
    assert math.isclose(lr_at(14, config), 0.1)


def _tiny_config(kind: str = "dense") -> ModelConfig:
    return ModelConfig(
        vocab_size=256, dim=32, num_layers=2, num_heads=2, ffn_hidden=64, kind=kind, num_experts=4
    )


def test_flops_per_token_hand_computed():
    d, f, v, t, e, k = 32, 64, 256, 16, 4, 2
    attn = 4 * d * d  # qkv + proj
    norms = 2 * d
    dense_layer = attn + 3 * d * f + norms  # SwiGLU: gate, up, down
    expected_dense = 2 * (6 * dense_layer + 6 * t * d) + 6 * v * d
    assert flops_per_token(build_model(_tiny_config(), 0), t) == expected_dense
    # MoE: router d*e, and top-k of e experts of width f/k
    moe_layer = attn + norms + d * e + k * 3 * d * (f // k)
    expected_moe = 2 * (6 * moe_layer + 6 * t * d) + 6 * v * d
    assert flops_per_token(build_model(_tiny_config("moe"), 0), t) == expected_moe


class FakeMoD(nn.Module):
    """Stands in for a Mixture-of-Depths layer: a router, a block and ``stats``."""

    def __init__(self, block: nn.Module, dim: int, capacity: float) -> None:
        super().__init__()
        self.block, self.capacity = block, capacity
        self.router = nn.Linear(dim, 1, bias=False)
        self.stats: object = None

    def forward(self, x, **kwargs):
        # "selects" a different share in train (top-k) and eval (causal) mode
        rate = self.capacity if self.training else self.capacity / 2
        self.stats = type("Stats", (), {"realized_capacity": torch.tensor(rate)})()
        return self.block(x, **kwargs) + 0 * self.router(x)


def test_mod_layers_are_read_generically():
    model = build_model(_tiny_config(), 0)
    d, t = 32, 16
    plain = flops_per_token(model, t)
    block_params = sum(p.numel() for p in model.layers[1].parameters())
    model.layers[1] = FakeMoD(model.layers[1], d, 0.25)
    assert mod_layers(model) == [model.layers[1]]
    expected = (
        plain
        - (6 * block_params + 6 * t * d)
        + 6 * d
        + 0.25 * (6 * block_params + 6 * 0.25 * t * d)
    )
    assert math.isclose(flops_per_token(model, t), expected)

    batches = [(torch.randint(0, 256, (2, t)), torch.randint(0, 256, (2, t)))]
    model.train()
    causal, topk = evaluate(model, batches, "causal"), evaluate(model, batches, "topk")
    assert model.training  # restored
    assert causal.mod_capacity == [0.125] and topk.mod_capacity == [0.25]
    assert causal.loss == topk.loss  # the fake routes nothing differently
    with pytest.raises(ValueError, match="mode"):
        evaluate(model, batches, "sometimes")  # type: ignore[arg-type]


def test_moe_experts_start_like_the_dense_ffn():
    dense, moe = build_model(_tiny_config(), 0), build_model(_tiny_config("moe"), 0)
    dense_std = dense.layers[0].ffn.gate_up.weight.std()
    for weight in moe.layers[0].ffn.experts.parameters():
        assert abs(float(weight.detach().std()) - 0.02) < 0.003
    assert abs(float(dense_std.detach()) - 0.02) < 0.003


# --- training, checkpoints, resume ----------------------------------------------------------


def _history(out: Path) -> list[dict]:
    return json.loads((out / "state.json").read_text())["history"]


def test_resume_continues_the_same_loss_curve(tmp_path: Path, text_file: Path, tiny):
    args = ["train", "--model", "moe", "--data", str(text_file), "--steps", "6", *tiny]
    args += ["--warmup-steps", "2", "--eval-every", "3"]
    main([*args, "--out", str(tmp_path / "full")])
    main([*args, "--out", str(tmp_path / "split"), "--stop-at", "3"])
    assert [h["step"] for h in _history(tmp_path / "split")] == [1, 2, 3]
    main([*args, "--out", str(tmp_path / "split"), "--resume"])
    full, split = _history(tmp_path / "full"), _history(tmp_path / "split")
    assert [h["step"] for h in split] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, split, strict=True):
        assert a["lr"] == b["lr"]
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["expert_load"] == b["expert_load"]
    # the curve moved: a resumed run that restarted from scratch would not match
    assert full[0]["loss"] != full[-1]["loss"]
    # weights on disk are the same after both routes
    from safetensors.torch import load_file

    w_full = load_file(str(tmp_path / "full" / "model.safetensors"))
    w_split = load_file(str(tmp_path / "split" / "model.safetensors"))
    for name, tensor in w_full.items():
        torch.testing.assert_close(tensor, w_split[name], rtol=1e-6, atol=1e-7)


def test_resume_refuses_a_different_model_or_schedule(tmp_path: Path, text_file: Path, tiny):
    args = ["train", "--data", str(text_file), "--steps", "2", *tiny, "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="found none"):
        main(["train", "--model", "dense", "--resume", *args[1:]])
    main(["train", "--model", "dense", *args[1:]])
    with pytest.raises(SystemExit, match="model config differs"):
        main(["train", "--model", "moe", "--resume", *args[1:]])
    with pytest.raises(SystemExit, match="training config differs"):
        main(["train", "--model", "dense", "--resume", "--lr", "0.01", *args[1:]])


def test_train_records_expert_loads(text_file: Path):
    corpus = load_corpus(text_file)
    config = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_batches=1)
    result = train(build_model(_tiny_config("moe"), 0), corpus, config, progress=False)
    for record in result.history:
        assert len(record["expert_load"]) == 2  # one list per MoE layer
        for load in record["expert_load"]:
            assert len(load) == 4 and sum(load) == 2 * 16 * 2  # every token's top-2 slots
    assert result.evals[-1]["step"] == 2 and len(result.evals[-1]["load_imbalance"]) == 2


def test_mod_eval_thresholds_are_calibrated_to_the_capacity(text_file: Path):
    # uncalibrated, the causal predictor's 0.5 threshold processes an arbitrary share of tokens
    corpus = load_corpus(text_file)
    config = TrainConfig(steps=2, batch_size=4, seq_len=32, eval_every=2, eval_batches=1)
    model = build_model(_tiny_config("mod"), 0)
    result = train(model, corpus, config, progress=False)
    final = result.evals[-1]
    layers = mod_layers(model)
    assert final["mod_threshold"] == [m.threshold for m in layers]
    assert all(m.threshold != 0.5 for m in layers)
    # calibrated on training windows, so held-out capacity is near, not exactly, the target
    for rate in final["mod_capacity"]:
        assert abs(rate - 0.125) < 0.06
