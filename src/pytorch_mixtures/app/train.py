"""A small, honest trainer for the reference LM: AdamW, cosine schedule, aux losses, telemetry.

* Optimizer: AdamW (decoupled weight decay on matrices only), gradient clipping, learning rate
  with linear warm-up then cosine decay to ``min_lr_ratio * lr`` (``lr_at``).
* Loss: the LM's cross-entropy plus ``pm.aux_loss(model)`` (every MoE/MoD layer's weighted
  auxiliary losses).
* Per-step metrics: loss, aux loss, learning rate, tokens/s, each MoE layer's expert loads (from
  ``MoELayer.stats.tokens_per_expert``) and each MoD layer's realized capacity (read generically
  from the layer's ``stats``).
* Checkpoints (:mod:`~pytorch_mixtures.app.checkpoint`): weights in safetensors, optimizer
  state and a JSON sidecar with the step, both configs and the metric history. Batches depend
  only on ``(seed, step)``, so a resumed run continues the same loss curve.
* :func:`flops_per_token`: a small estimator of training FLOPs per token (Kaplan et al. 2020,
  ``6 N`` plus the attention term), with routed (MoD) layers counted at their capacity.

Shape legend: B batch, T sequence length, V vocabulary, E experts.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import MixtureOfDepths, MoELayer, aux_loss, calibrate_thresholds
from ..models import ModelConfig, TransformerLM
from .checkpoint import load_run_checkpoint, save_run_checkpoint
from .data import Corpus

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "flops_per_token",
    "lr_at",
    "mod_layers",
    "train",
]

EvalMode = Literal["causal", "topk"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings shared by every model of a comparison (steps, batch, schedule)."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1.5e-3  # best of 0.75e-3..1e-2 for dense and MoE alike at 150 demo steps
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: expected a finite value > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class EvalResult:
    """Held-out evaluation of one model.

    Attributes:
        loss: mean cross-entropy (nats per byte) over the held-out batches.
        mode: ``"causal"`` (eval mode: MoD layers use their causal router) or ``"topk"``
            (train-mode routing, top-k over each sequence, evaluated without gradients).
        mod_capacity: per MoD layer, the fraction of tokens it processed (empty without MoD).
        expert_load: per MoE layer, slots per expert summed over the batches.
    """

    loss: float
    mode: EvalMode
    mod_capacity: list[float] = field(default_factory=list)
    expert_load: list[list[int]] = field(default_factory=list)

    @property
    def load_imbalance(self) -> list[float]:
        """Per MoE layer: max over mean of the expert loads (1.0 is perfect balance)."""
        return [max(load) / max(sum(load) / len(load), 1e-9) for load in self.expert_load]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced: per-step history and the held-out evaluations."""

    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    train_seconds: float
    tokens_per_second: float


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine to the floor."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _calibrate_mod(model: nn.Module, calibration: list[Tensor] | None) -> list[float]:
    """Calibrate the MoD layers' eval thresholds to their capacity on training windows.

    Without it the causal router's fixed 0.5 threshold decides how many tokens a layer
    processes in eval, and a causal-mode loss at an unknown realized capacity compares nothing.
    Training windows, not held-out ones, so the held-out loss stays held out.
    """
    layers = [m for m in model.modules() if isinstance(m, MixtureOfDepths)]
    if not calibration or not layers or any(m.causal_router == "none" for m in layers):
        return [m.threshold for m in layers]
    return calibrate_thresholds(model, calibration)


# ---------------------------------------------------------------------------------------------
# Telemetry, read generically so that layers landing later (MoD) are picked up as they are.


def mod_layers(model: nn.Module) -> list[nn.Module]:
    """The Mixture-of-Depths modules in ``model`` (any module with a float ``capacity`` and a
    ``block`` submodule), in model order."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "capacity", None), float)
        and isinstance(getattr(m, "block", None), nn.Module)
    ]


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


_CAPACITY_FIELDS = ("realized_capacity", "selected_fraction", "selection_rate", "capacity")


def _stat_value(stats: object) -> float | None:
    """The realized capacity a MoD layer reports in its ``stats`` (first known field)."""
    for name in _CAPACITY_FIELDS:
        value = getattr(stats, name, None)
        if isinstance(value, Tensor) and value.numel() == 1:
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _mod_rates(model: nn.Module) -> list[float]:
    rates = []
    for layer in mod_layers(model):
        rate = _stat_value(getattr(layer, "stats", None))
        if rate is not None:
            rates.append(rate)
    return rates


def _expert_loads(model: nn.Module) -> list[list[int]]:
    loads = []
    for layer in _moe_layers(model):
        if layer.stats is not None:
            loads.append([int(n) for n in layer.stats.tokens_per_expert.tolist()])
    return loads


# ---------------------------------------------------------------------------------------------
# FLOPs


def _active_params(module: nn.Module) -> float:
    """Parameters one token uses in ``module``: a MoE layer's experts count ``top_k / E``."""
    total = float(sum(p.numel() for p in module.parameters()))
    for moe in _moe_layers(module):
        expert_params = sum(p.numel() for p in moe.experts.parameters())
        top_k = getattr(moe.router, "top_k", None)
        if isinstance(top_k, int):
            total -= expert_params * (1 - top_k / moe.num_experts)
    return total


def flops_per_token(model: TransformerLM, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), an estimate.

    Per layer, ``6 * active params`` (Kaplan et al. 2020, eq. 2.2) plus causal attention
    ``6 * T * D`` (scores and weighted sum, ``2 * 2 * D`` FLOPs per key, ``T / 2`` keys on
    average, times 3). A Mixture-of-Depths layer at capacity ``c`` runs its block on ``c * T``
    tokens that attend to ``c * T`` keys: ``c * (6 * block params + 6 * c * T * D)``, plus its
    router on every token. Plus the output head ``6 * V * D`` (tied to the embedding, whose
    lookup is free). Norms and elementwise work are ignored.
    """
    dim, vocab = model.config.dim, model.config.vocab_size
    total = 6.0 * vocab * dim
    for layer in model.layers:
        routed = mod_layers(layer)
        if routed:  # the outermost MoD module of this layer, with attention inside its block
            block = getattr(routed[0], "block")  # noqa: B009 - typed by mod_layers' filter
            capacity = float(getattr(routed[0], "capacity"))  # noqa: B009
            block_params = _active_params(block)
            outside_params = _active_params(layer) - block_params  # router, predictor
            total += 6 * outside_params + capacity * (
                6 * block_params + 6 * capacity * seq_len * dim
            )
        else:
            total += 6 * _active_params(layer) + 6 * seq_len * dim
    return total


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], mode: EvalMode = "causal"
) -> EvalResult:
    """Mean held-out loss over ``batches`` (each ``(idx [B, T], targets [B, T])`` int64).

    ``mode="causal"``: the model in ``eval()``; a MoD layer decides per token with its causal
    router, as in generation. ``mode="topk"``: the model in ``train()`` (top-k over each
    sequence, which sees the future) but without gradients. Dense and MoE models give the same
    loss in both modes. The model's train/eval mode is restored.
    """
    if mode not in ("causal", "topk"):
        raise ValueError(f"mode: expected 'causal' or 'topk', got {mode!r}")
    was_training = model.training
    model.train(mode == "topk")
    try:
        losses, rates, loads = [], [], []
        for idx, targets in batches:
            out = model(idx, targets=targets)
            losses.append(float(out.loss))
            rates.append(_mod_rates(model))
            loads.append(_expert_loads(model))
    finally:
        model.train(was_training)
    mod_capacity = [sum(col) / len(col) for col in zip(*rates, strict=True)] if rates else []
    expert_load = [
        [sum(counts) for counts in zip(*per_layer, strict=True)]
        for per_layer in zip(*loads, strict=True)
    ]
    return EvalResult(sum(losses) / len(losses), mode, mod_capacity, expert_load)


# ---------------------------------------------------------------------------------------------
# Training


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # decay matrices only: decaying norm gains and the router's bias-free gate rows is harmful
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


class _NoBar:
    """Stands in for a tqdm bar when progress is off (tqdm is then not needed)."""

    def set_postfix(self, **values: str) -> None:
        pass

    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=True)


class _StopOnSigint:
    """While active (main thread only), a first SIGINT (Ctrl-C) asks the run to stop at the next
    step boundary, after its checkpoint; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(
    model: TransformerLM,
    corpus: Corpus,
    config: TrainConfig,
    *,
    out: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
    stop_at: int | None = None,
    name: str = "",
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on ``corpus`` for ``config.steps`` steps.

    Args:
        out: checkpoint folder (written at the end and every ``checkpoint_every`` steps);
            None for no checkpoints.
        resume: continue from the checkpoint in ``out`` (same model and training config).
        stop_at: stop after this step (and checkpoint), keeping the schedule of
            ``config.steps``; resume later to finish the same run.
        name: label for the progress bar.
        progress: show a tqdm progress bar.

    Returns:
        :class:`TrainResult`: per-step history (``step``, ``lr``, ``loss``, ``aux_loss``,
        ``tokens_per_s``, ``expert_load`` per MoE layer, ``mod_capacity`` per MoD layer) and
        held-out evaluations every ``eval_every`` steps and at the end.
    """
    optimizer = _optimizer(model, config)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    start = 0
    if resume:
        if out is None:
            raise ValueError("resume: expected a checkpoint folder `out`, got None")
        state = load_run_checkpoint(out, model, optimizer, config)
        start, history, evals = int(state["step"]), state["history"], state["evals"]
    val = corpus.val_batches(config.batch_size, config.seq_len, config.eval_batches)
    # MoD eval thresholds are calibrated on the windows of the steps after the run's last
    calibration = [
        corpus.train_batch(config.batch_size, config.seq_len, config.seed, config.steps + i)[0]
        for i in range(2 if mod_layers(model) else 0)
    ]
    tokens_per_step = config.batch_size * config.seq_len
    train_seconds = 0.0
    model.train()
    end = config.steps if stop_at is None else min(max(stop_at, start), config.steps)
    bar = _progress(config.steps, start, name, progress)
    with _StopOnSigint() as stop:
        try:
            for step in range(start, end):
                idx, targets = corpus.train_batch(
                    config.batch_size, config.seq_len, config.seed, step
                )
                lr = lr_at(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                tick = time.perf_counter()
                output = model(idx, targets=targets)
                assert output.loss is not None
                aux = aux_loss(model)
                (output.loss + aux).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss = float(output.loss.detach())  # syncs, so the timing below is honest
                seconds = time.perf_counter() - tick
                train_seconds += seconds
                history.append(
                    {
                        "step": step + 1,
                        "lr": lr,
                        "loss": loss,
                        "aux_loss": float(aux.detach()),
                        "tokens_per_s": tokens_per_step / seconds,
                        "expert_load": _expert_loads(model),
                        "mod_capacity": _mod_rates(model),
                    }
                )
                done = step + 1
                if done % config.eval_every == 0 or done == config.steps:
                    evals.append(_eval_record(model, val, done, calibration))
                    bar.set_postfix(loss=f"{loss:.3f}", val=f"{evals[-1]['loss']:.3f}")
                else:
                    bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)
                if out is not None and checkpoint_every and done % checkpoint_every == 0:
                    save_run_checkpoint(out, model, optimizer, config, done, history, evals)
                if stop.requested:  # Ctrl-C: stop here, at a step boundary, and checkpoint below
                    end = done
                    print(f"\ninterrupted at step {done}; resume with --resume", file=sys.stderr)
                    break
        finally:
            bar.close()
    if out is not None:
        save_run_checkpoint(out, model, optimizer, config, end, history, evals)
    run_steps = end - start
    tokens_per_second = run_steps * tokens_per_step / train_seconds if train_seconds else 0.0
    return TrainResult(history, evals, train_seconds, tokens_per_second)


def _eval_record(
    model: nn.Module,
    val: list[tuple[Tensor, Tensor]],
    step: int,
    calibration: list[Tensor] | None = None,
) -> dict[str, Any]:
    thresholds = _calibrate_mod(model, calibration)
    causal = evaluate(model, val, "causal")
    record: dict[str, Any] = {"step": step, "loss": causal.loss}
    if mod_layers(model):
        topk = evaluate(model, val, "topk")
        record |= {
            "topk_loss": topk.loss,
            "mod_capacity": causal.mod_capacity,
            "topk_mod_capacity": topk.mod_capacity,
            "mod_threshold": thresholds,
        }
    if causal.expert_load:
        record |= {"expert_load": causal.expert_load, "load_imbalance": causal.load_imbalance}
    return record


def build_model(config: ModelConfig, seed: int) -> TransformerLM:
    """The reference LM with weights initialised from ``seed`` (so matched runs share it).

    The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformerLM(config)
