"""The demo: dense, MoE, MoD and MoDE language models trained under matched settings.

Every model has the same attention, embedding, depth and width, sees the same batches (they
depend only on the seed and the step) with the same learning-rate schedule, and one token uses
the same FFN parameters in the dense and the MoE model (dense FFN width = ``top_k`` x expert
width). A model kind the library cannot build yet is reported as "not available", never
silently left out.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..models import ModelConfig, TransformerLM
from .data import VOCAB_SIZE, Corpus
from .train import TrainConfig, build_model, flops_per_token, train

__all__ = ["KINDS", "SizeConfig", "format_table", "model_config", "run_demo", "sample"]

KINDS = ("dense", "moe", "mod", "mode")


@dataclasses.dataclass(frozen=True)
class SizeConfig:
    """Model size shared by every kind of a comparison."""

    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ffn_hidden: int = 512
    num_experts: int = 8
    top_k: int = 2
    mod_capacity: float = 0.125
    balance_loss_coef: float | None = None  # None: the router's default
    routed_scaling_factor: float | None = None  # None: top_k (see ModelConfig)


def model_config(kind: str, size: SizeConfig) -> ModelConfig:
    """The :class:`ModelConfig` of ``kind`` at ``size``: MoE experts of width
    ``ffn_hidden // top_k`` so active FFN parameters match the dense model."""
    return ModelConfig(
        vocab_size=VOCAB_SIZE,
        dim=size.dim,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        ffn_hidden=size.ffn_hidden,
        kind=kind,  # type: ignore[arg-type]
        num_experts=size.num_experts,
        top_k=size.top_k,
        mod_capacity=size.mod_capacity,
        routed_scaling_factor=size.routed_scaling_factor,
        router_kwargs=(
            {} if size.balance_loss_coef is None else {"balance_loss_coef": size.balance_loss_coef}
        ),
    )


def sample(
    model: TransformerLM, prompts: Sequence[str], max_new_tokens: int, seed: int
) -> list[str]:
    """Continue each prompt (bytes) with ``generate()`` (KV cache, temperature 0.8, top-k 20)."""
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for prompt in prompts:
        idx = torch.tensor([list(prompt.encode())], dtype=torch.long)
        out = model.generate(idx, max_new_tokens, temperature=0.8, top_k=20, generator=generator)
        texts.append(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
    return texts


def run_demo(
    corpus: Corpus,
    train_config: TrainConfig,
    size: SizeConfig,
    out: Path,
    *,
    kinds: Sequence[str] = KINDS,
    prompts: Sequence[str] = ("def ", "class ", "import "),
    sample_tokens: int = 80,
    progress: bool = True,
    report: bool = True,
) -> dict[str, Any]:
    """Train each of ``kinds``, evaluate, sample; write ``out/results.json`` (and
    ``out/report.png``). Returns the results dictionary."""
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        config = model_config(kind, size)
        try:
            model = build_model(config, train_config.seed)
        except NotImplementedError as error:
            models[kind] = {"status": "not available", "reason": str(error)}
            print(f"{kind}: not available ({error})")
            continue
        result = train(model, corpus, train_config, name=kind, progress=progress)
        final = result.evals[-1]  # train() always evaluates after its last step
        entry: dict[str, Any] = {
            "status": "ok",
            "config": dataclasses.asdict(config),
            "params_total": model.num_params(),
            "params_active": model.num_params(active=True),
            "flops_per_token": flops_per_token(model, train_config.seq_len),
            "tokens_per_s": result.tokens_per_second,
            "train_seconds": result.train_seconds,
            "train_loss": _tail_mean([h["loss"] for h in result.history], 10),
            "val_loss": final["loss"],
            "history": result.history,
            "evals": result.evals,
        }
        if "topk_loss" in final:
            entry |= {
                "val_loss_topk": final["topk_loss"],
                "val_loss_causal": final["loss"],
                "mod_capacity_causal": final["mod_capacity"],
                "mod_capacity_topk": final["topk_mod_capacity"],
            }
        if "expert_load" in final:
            entry |= {
                "expert_load": final["expert_load"],
                "load_imbalance": final["load_imbalance"],
            }
        entry["samples"] = sample(model, prompts, sample_tokens, train_config.seed)
        models[kind] = entry
    results: dict[str, Any] = {
        "data": corpus.source,
        "train_config": dataclasses.asdict(train_config),
        "size": dataclasses.asdict(size),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "models": models,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if report:
        from .report import make_report

        make_report(results, out / "report.png")
    return results


def _tail_mean(values: Sequence[float], count: int) -> float:
    tail = values[-count:]
    return sum(tail) / len(tail)


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(results: dict[str, Any]) -> str:
    """The comparison as a Markdown table (one row per kind, "not available" rows included)."""
    header = (
        "| model | params total | params active | train FLOPs/token | tokens/s "
        "| train loss | held-out loss | MoD held-out top-k / causal | MoD capacity (causal) "
        "| MoE load imbalance |"
    )
    rows = [header, "|" + "---|" * 10]
    models = results["models"]
    dense = models.get("dense", {})
    for kind, entry in models.items():
        if entry["status"] != "ok":
            rows.append(f"| {kind} | not available: {entry['reason']} |" + " |" * 8)
            continue
        flops = _fmt_count(entry["flops_per_token"])
        if dense.get("status") == "ok" and kind != "dense":
            flops += f" ({entry['flops_per_token'] / dense['flops_per_token']:.2f}x)"
        mod, capacity, imbalance = "-", "-", "-"
        if "val_loss_topk" in entry:
            mod = f"{entry['val_loss_topk']:.3f} / {entry['val_loss_causal']:.3f}"
            capacity = ", ".join(f"{c:.3f}" for c in entry["mod_capacity_causal"]) or "?"
        if "load_imbalance" in entry:
            imbalance = "mean {:.2f}, max {:.2f}".format(
                sum(entry["load_imbalance"]) / len(entry["load_imbalance"]),
                max(entry["load_imbalance"]),
            )
        rows.append(
            f"| {kind} | {_fmt_count(entry['params_total'])} | {_fmt_count(entry['params_active'])}"
            f" | {flops} | {entry['tokens_per_s']:,.0f} | {entry['train_loss']:.3f}"
            f" | {entry['val_loss']:.3f} | {mod} | {capacity} | {imbalance} |"
        )
    return "\n".join(rows)
