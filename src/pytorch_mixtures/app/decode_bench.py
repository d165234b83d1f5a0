"""Inference and training-step benchmark: ``pytorch-mixtures bench --decode``.

Three tables, every entry a ratio measured side by side in one process (candidates interleaved
after warm-up; median of the pairwise ratios to the dense reference of the same repetition):

* **layer**: one eval, no-grad call of a decode shape (1 token, or 8 tokens: batch 8 of one
  token each) of ``MoELayer`` (top-k router, ``SwiGLUExperts``), Hugging Face's eager
  ``MixtralSparseMoeBlock`` (when ``transformers`` is installed) and, for reference, one layer
  forced onto the full (plan) path, against a dense SwiGLU of the same active width ``k * H``.
* **generate**: the reference LM's ``generate()`` with its KV cache, time per new token, for
  MoE and MoD (12.5% capacity on every other block, causal predictor, thresholds calibrated
  to that capacity on random windows) against the dense model of equal active compute, at
  batch 1 and 8; tokens/s of each.
* **train step**: forward, backward and AdamW step of the same LMs, against dense.

Sizes: ``small`` (the demo's: dim 128, 4 layers, 8 experts of 256, top-2) and ``medium``
(dim 512, 4 layers, 8 experts of 1024, top-2). Shape legend: B batch, T tokens, D dim.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from .. import MoELayer, SwiGLUExperts, TopKRouter, calibrate_thresholds
from ..models import ModelConfig, SwiGLU, TransformerLM

__all__ = [
    "CPU",
    "SIZES",
    "DecodeSize",
    "Row",
    "Where",
    "format_rows",
    "generate_table",
    "hf_mod_generate_table",
    "layer_table",
    "train_table",
]


@dataclass(frozen=True)
class DecodeSize:
    """One benchmark size: the reference LM's dims and its MoE layers' shape."""

    name: str
    dim: int
    num_heads: int
    num_experts: int
    hidden: int
    top_k: int = 2
    num_layers: int = 4

    def model_config(self, kind: str) -> ModelConfig:
        return ModelConfig(
            dim=self.dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            ffn_hidden=self.top_k * self.hidden,
            kind=kind,  # type: ignore[arg-type]
            num_experts=self.num_experts,
            top_k=self.top_k,
        )


SIZES: dict[str, DecodeSize] = {
    "small": DecodeSize("small", 128, 4, 8, 256),
    "medium": DecodeSize("medium", 512, 8, 8, 1024),
}

Row = tuple[str, str, dict[str, float]]  # (size, what, column -> value)


@dataclass(frozen=True)
class Where:
    """Device and dtype of a benchmark run (CPU float32 by default; ``benchmarks/gpu.sh`` runs
    CUDA bf16)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


CPU = Where()


def _interleaved(
    fns: dict[str, Callable[[], object]],
    reference: str,
    repeats: int,
    inner: int,
    where: Where = CPU,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median over repeats of (candidate time / reference time), and median seconds per call."""
    for fn in fns.values():  # warm-up
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            where.sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            where.sync()
            seconds[name].append((time.perf_counter() - start) / inner)
    base = seconds[reference]
    ratios = {
        name: statistics.median(t / b for t, b in zip(values, base, strict=True))
        for name, values in seconds.items()
    }
    return ratios, {name: statistics.median(values) for name, values in seconds.items()}


def _hf_block(size: DecodeSize) -> nn.Module | None:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(
        hidden_size=size.dim,
        intermediate_size=size.hidden,
        num_local_experts=size.num_experts,
        num_experts_per_tok=size.top_k,
    )
    config._experts_implementation = "eager"  # a bare block (from_pretrained sets it)
    block: nn.Module = MixtralSparseMoeBlock(config)
    for weight in block.parameters():  # a bare block is uninitialised (torch.empty)
        nn.init.normal_(weight, std=0.02)
    return block.eval()


def layer_table(
    size: DecodeSize,
    *,
    repeats: int,
    inner: int = 50,
    where: Where = CPU,
    tokens: tuple[int, ...] = (1, 8),
    compile: bool = False,
) -> list[Row]:
    """Decode-shaped calls of one layer (eval, no grad) against a dense SwiGLU; with
    ``compile`` also both under ``torch.compile(fullgraph=True)``."""
    torch.manual_seed(0)
    dim = size.dim
    dense = SwiGLU(dim, size.top_k * size.hidden).eval()
    moe = MoELayer(
        dim,
        TopKRouter(dim, size.num_experts, size.top_k),
        SwiGLUExperts(size.num_experts, dim, size.hidden),
    ).eval()
    full = MoELayer(
        dim,
        TopKRouter(dim, size.num_experts, size.top_k),
        SwiGLUExperts(size.num_experts, dim, size.hidden),
        decode_max_slots=0,
    ).eval()
    full.load_state_dict(moe.state_dict())
    hf = _hf_block(size)
    for module in (dense, moe, full, hf):
        if module is not None:
            module.to(device=where.device, dtype=where.dtype)
            if isinstance(module, MoELayer):
                module.router.float()  # router math is float32 by design
    rows: list[Row] = []
    for count in tokens:
        x = torch.randn(count, 1, dim, device=where.device, dtype=where.dtype)
        fns: dict[str, Callable[[], object]] = {
            "dense": partial(dense, x),
            "moe": partial(moe, x),
            "moe full path": partial(full, x),
        }
        if hf is not None:
            fns["hf mixtral"] = partial(hf, x)
        what = f"layer, {count} token{'s' if count > 1 else ''}"
        with torch.no_grad():
            ratios, seconds = _interleaved(fns, "dense", repeats, inner, where)
            rows.append((size.name, what, _layer_values(ratios, seconds)))
            if compile:  # both compiled the same way, one graph each (the decode step's form)
                torch._dynamo.reset()
                mode = "reduce-overhead" if where.device.startswith("cuda") else None
                fns = {
                    name: partial(torch.compile(module, fullgraph=True, mode=mode), x)
                    for name, module in (("dense", dense), ("moe", moe))
                }
                ratios, seconds = _interleaved(fns, "dense", repeats, inner, where)
                rows.append((size.name, f"{what}, compiled", _layer_values(ratios, seconds)))
    return rows


def _layer_values(ratios: dict[str, float], seconds: dict[str, float]) -> dict[str, float]:
    values = {f"{name} x": ratio for name, ratio in ratios.items() if name != "dense"}
    return values | {f"{name} us": 1e6 * s for name, s in seconds.items()}


def _lm(size: DecodeSize, kind: str, where: Where = CPU) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(size.model_config(kind)).eval()
    model.to(device=where.device, dtype=where.dtype)
    if kind == "mod":  # eval thresholds at the trained capacity (12.5%), as the demo sets them
        gen = torch.Generator().manual_seed(3)
        windows = torch.randint(0, 256, (8, 128), generator=gen).to(where.device)
        calibrate_thresholds(model, lambda: model(windows))
    return model


def generate_table(
    size: DecodeSize,
    *,
    repeats: int,
    prompt: int = 32,
    new_tokens: int = 32,
    where: Where = CPU,
    batches: tuple[int, ...] = (1, 8),
    compile: bool = False,
) -> list[Row]:
    """Time per generated token with the KV cache, MoE and MoD against dense, per batch; with
    ``compile`` also ``generate(compile=True)`` (static cache, compiled decode step) against
    compiled dense, and each model's compiled speed-up over its eager decoding."""
    models = {kind: _lm(size, kind, where) for kind in ("dense", "moe", "mod")}
    rows: list[Row] = []
    for batch in batches:
        gen = torch.Generator().manual_seed(1)
        idx = torch.randint(0, 256, (batch, prompt), generator=gen).to(where.device)
        eager_seconds: dict[str, float] = {}
        for compiled in (False, True) if compile else (False,):
            if compiled:
                torch._dynamo.reset()  # one graph per model, within the recompile limit
            fns: dict[str, Callable[[], object]] = {
                kind: partial(model.generate, idx, new_tokens, compile=compiled)
                for kind, model in models.items()
            }
            ratios, seconds = _interleaved(fns, "dense", repeats, 1, where)
            values = {f"{kind} x": ratios[kind] for kind in ("moe", "mod")}
            values |= {f"{kind} tok/s": batch * new_tokens / seconds[kind] for kind in models}
            if compiled:
                values |= {f"{k} vs eager": eager_seconds[k] / seconds[k] for k in models}
            eager_seconds = seconds
            what = f"generate{', compiled' if compiled else ''}, batch {batch}"
            rows.append((size.name, what, values))
    return rows


def train_table(size: DecodeSize, *, repeats: int, batch: int = 8, seq: int = 128) -> list[Row]:
    """Whole-model training step (forward, backward, AdamW) against dense."""
    models = {kind: _lm(size, kind).train() for kind in ("dense", "moe", "mod")}
    optimizers = {kind: torch.optim.AdamW(m.parameters(), lr=1e-4) for kind, m in models.items()}
    idx = torch.randint(0, 256, (batch, seq + 1), generator=torch.Generator().manual_seed(2))
    inputs, targets = idx[:, :-1], idx[:, 1:]

    def step(kind: str) -> None:
        from .. import aux_loss

        model = models[kind]
        out = model(inputs, targets=targets)
        assert out.loss is not None
        loss: Tensor = out.loss + aux_loss(model)
        loss.backward()
        optimizers[kind].step()
        optimizers[kind].zero_grad(set_to_none=True)

    fns: dict[str, Callable[[], object]] = {kind: partial(step, kind) for kind in models}
    ratios, seconds = _interleaved(fns, "dense", repeats, 1)
    values = {f"{kind} x": ratios[kind] for kind in ("moe", "mod")}
    values |= {f"{kind} ms": 1e3 * seconds[kind] for kind in models}
    return [(size.name, f"train step, batch {batch}x{seq}", values)]


def hf_mod_generate_table(
    *,
    repeats: int,
    dim: int = 256,
    num_layers: int = 4,
    num_heads: int = 8,
    prompt: int = 64,
    new_tokens: int = 32,
    batch: int = 1,
    capacity: float = 0.125,
    where: Where = CPU,
) -> list[Row]:
    """Hugging Face ``generate()`` (greedy) of a random Llama: dense, and routed by
    :func:`~pytorch_mixtures.interop.route_depths` (``capacity`` on every other layer, eval
    thresholds calibrated to it) with its KV cache and without (the prefix recomputed each
    step). One row: ``mod cache x`` (time / dense), ``mod no-cache x cache`` (no-cache time /
    cached time: the cache's speed-up) and tokens/s of each. Needs ``transformers``.

    Timed with ``mod cache`` as the reference of the pairwise ratios, so both ratios are
    medians of same-repetition pairs (``mod cache x`` is the reciprocal of dense / cached).
    """
    import copy

    import transformers

    from ..interop import route_depths

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=dim,
        intermediate_size=(8 * dim // 3 + 63) // 64 * 64,  # Llama's ~8/3 ratio, a multiple of 64
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=prompt + new_tokens + 8,
    )
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    mod = route_depths(copy.deepcopy(dense), capacity=capacity, every=2).eval()
    for model in (dense, mod):
        model.to(device=where.device, dtype=where.dtype)
    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 512, (8, 128), generator=gen).to(where.device)
    calibrate_thresholds(mod, lambda: mod(input_ids=windows))
    ids = torch.randint(0, 512, (batch, prompt), generator=gen).to(where.device)
    # min_new_tokens: an end-of-sequence token must not stop one candidate early
    settings = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }
    # transformers' generate is untyped to mypy through nn.Module's __getattr__
    generate_dense: Callable[..., object] = getattr(dense, "generate")  # noqa: B009
    generate_mod: Callable[..., object] = getattr(mod, "generate")  # noqa: B009
    fns: dict[str, Callable[[], object]] = {
        "dense": partial(generate_dense, ids, use_cache=True, **settings),
        "mod cache": partial(generate_mod, ids, use_cache=True, **settings),
        "mod no-cache": partial(generate_mod, ids, use_cache=False, **settings),
    }
    with torch.no_grad():
        ratios, seconds = _interleaved(fns, "mod cache", repeats, 1, where)
    values = {
        "mod cache x": 1.0 / ratios["dense"],
        "mod no-cache x cache": ratios["mod no-cache"],
    }
    values |= {f"{name} tok/s": batch * new_tokens / seconds[name] for name in fns}
    what = f"hf llama generate, dim {dim}, {num_layers} layers, prompt {prompt}, batch {batch}"
    return [(f"hf c={capacity:g}", what, values)]


def format_rows(title: str, rows: list[Row]) -> str:
    """One markdown table; columns are the union of the rows' keys, in first-seen order."""
    columns: list[str] = []
    for _, _, values in rows:
        columns += [c for c in values if c not in columns]
    lines = [
        f"{title}",
        "| size | what | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for size, what, values in rows:
        cells = [f"{values[c]:.2f}" if c in values else "" for c in columns]
        lines.append(f"| {size} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
