"""The trainer (``pytorch_mixtures.app.train``): schedule, FLOPs estimate, evaluation, telemetry,
checkpoints and resume."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pytorch_mixtures.app.checkpoint import checkpoint_dir
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
    folder = checkpoint_dir(out)
    assert folder is not None
    return json.loads((folder / "state.json").read_text())["history"]


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

    w_full = load_file(str(checkpoint_dir(tmp_path / "full") / "model.safetensors"))
    w_split = load_file(str(checkpoint_dir(tmp_path / "split") / "model.safetensors"))
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


# --- runs that survive a kill ---------------------------------------------------------------


def _train_cmd(text_file: Path, out: Path, tiny: list[str], steps: int) -> list[str]:
    return [
        sys.executable, "-m", "pytorch_mixtures.app.cli", "train", "--model", "moe",
        "--data", str(text_file), "--steps", str(steps), *tiny, "--warmup-steps", "2",
        "--eval-every", str(steps), "--checkpoint-every", "1", "--no-progress", "--out", str(out),
    ]  # fmt: skip


@pytest.mark.slow
def test_a_run_killed_at_random_moments_resumes_to_the_same_losses(tmp_path, text_file, tiny):
    """SIGKILL a real training process at random moments (while it trains and while it writes
    its every-step checkpoints), resume each time: every resume succeeds, and the finished
    run's loss curve equals an uninterrupted run's."""
    steps = 40
    reference = tmp_path / "reference"
    main([*_train_cmd(text_file, reference, tiny, steps)[3:]])
    killed = tmp_path / "killed"
    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def latest_step() -> int:
        try:
            folder = checkpoint_dir(killed)
        except ValueError:  # read while the writer replaced LATEST and removed the old folder
            return -1
        return -1 if folder is None else int(folder.name.split("-")[1])

    def start() -> subprocess.Popen[bytes]:
        resume = ["--resume"] if checkpoint_dir(killed) is not None else []
        cmd = [*_train_cmd(text_file, killed, tiny, steps), *resume]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    kills = 0
    for _ in range(5):
        before, proc = latest_step(), start()
        deadline = time.monotonic() + 120
        # past the import: kill once this process has trained (and saved) at least one step,
        # a random moment later (while it trains or while it writes the next checkpoint)
        while proc.poll() is None and latest_step() == before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    else:  # not finished yet: one last uninterrupted resume
        proc = start()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    assert kills >= 3  # the test did kill the run, several times
    want, got = _history(reference), _history(killed)
    assert [h["step"] for h in got] == list(range(1, steps + 1))
    for a, b in zip(want, got, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), (a["step"], a["loss"], b["loss"])
    leftovers = [p.name for p in killed.iterdir() if p.name.startswith(".incomplete-")]
    assert leftovers == []  # an interrupted save is cleaned by the next one


def test_a_corrupt_checkpoint_is_named_on_resume(tmp_path, text_file, tiny):
    args = ["train", "--data", str(text_file), "--steps", "2", *tiny, "--out", str(tmp_path)]
    main(["train", "--model", "dense", *args[1:]])
    folder = checkpoint_dir(tmp_path)
    assert folder is not None and (folder / "manifest.json").is_file()
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"model\.safetensors' does not match its manifest"):
        main(["train", "--model", "dense", "--resume", *args[1:]])
    (tmp_path / "LATEST").write_text("step-missing\n")
    with pytest.raises(SystemExit, match="names 'step-missing', which is missing"):
        main(["train", "--model", "dense", "--resume", *args[1:]])


def test_an_unwritable_out_is_refused_before_training(tmp_path, text_file, tiny):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["train", "--model", "dense", "--data", str(text_file), "--steps", "2", *tiny]
    with pytest.raises(SystemExit, match="--out: expected a writable folder"):
        main([*args, "--out", str(blocker / "sub")])


def test_sigint_stops_at_a_step_boundary_after_a_checkpoint(tmp_path, text_file, tiny):
    """The first Ctrl-C lets the step finish, checkpoints it and returns; resume continues."""
    from pytorch_mixtures.app import train as train_module

    corpus = load_corpus(text_file, min_split_tokens=65)
    model = build_model(_tiny_config("moe"), 0)
    config = TrainConfig(steps=6, batch_size=2, seq_len=32, warmup_steps=1, eval_every=6)
    original = train_module.lr_at

    def lr_then_interrupt(step: int, cfg: TrainConfig) -> float:
        if step == 2:  # during step 3: as if the user pressed Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return original(step, cfg)

    train_module.lr_at = lr_then_interrupt
    try:
        result = train(model, corpus, config, out=tmp_path, progress=False)
    finally:
        train_module.lr_at = original
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert _history(tmp_path)[-1]["step"] == 3
    resumed = train(build_model(_tiny_config("moe"), 0), corpus, config, out=tmp_path,
                    resume=True, progress=False)  # fmt: skip
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
