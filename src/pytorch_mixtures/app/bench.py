"""Side-by-side benchmark of MoELayer against its dense references (README, "Performance").

Every candidate runs on the same input in the same process, interleaved, after warm-up; each
repetition gives a ratio ``candidate time / dense-equivalent time`` and the table shows the
median of those pairwise ratios (this kind of machine is shared and noisy: absolute
milliseconds mean little, ratios from one run mean a lot).

Candidates:

* ``moe[<backend>]``: this library's ``MoELayer`` (top-k router + ``SwiGLUExperts``), dropless,
  one row per backend; ``moe[bmm] cf=1.25``: capacity mode with the padded batched backend.
* ``naive masked loop``: the per-expert loop over a token mask that most MoE code copies
  (Hugging Face's eager Mixtral experts): written here as the baseline users start from.
* ``hf mixtral``: ``transformers``' ``MixtralSparseMoeBlock``, only when ``transformers`` is
  importable.
* ``dense-equivalent``: every token through one SwiGLU of hidden ``top_k * H`` (what a dense
  model of equal active compute costs). The ratio column is against it.
* ``shape limit``: one expert-shaped SwiGLU (hidden H) over ``tokens * top_k`` rows: the
  experts' matmuls with zero routing overhead.

Peak memory: on CPU each candidate does one forward+backward in a fresh subprocess; reported is
the peak RSS above the process's RSS after building the layer, its input and filled gradient
buffers (so it measures activations and temporaries, not the MoE's E/top_k times larger
weights), as a ratio to the dense-equivalent's. On CUDA: ``torch.cuda.max_memory_allocated``
above the allocation before the step, same meaning.

Shape legend: B batch, T sequence, N = B*T tokens, D dim, E experts, H expert hidden, K top-k.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import grouped_mm_available
from ..models import SwiGLU

__all__ = [
    "CONFIGS",
    "BenchConfig",
    "BenchResult",
    "add_bench_arguments",
    "build_candidates",
    "run_bench",
    "run_bench_cli",
]


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark shape: ``batch * seq`` tokens of ``dim``, E SwiGLU experts of hidden H."""

    name: str
    batch: int
    seq: int
    dim: int
    num_experts: int
    hidden: int
    top_k: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


CONFIGS: dict[str, BenchConfig] = {
    "std": BenchConfig("std", 8, 512, 512, 8, 1024, 2),
    "fine": BenchConfig("fine", 8, 512, 512, 64, 256, 8),
    # a few-second smoke configuration (tests, quick checks)
    "tiny": BenchConfig("tiny", 2, 32, 32, 8, 16, 2),
    # GPU scale (benchmarks/gpu.sh): a Mixtral-8x7B-sized layer, and `fine` scaled up
    "mixtral": BenchConfig("mixtral", 1, 4096, 4096, 8, 14336, 2),
    "fine-xl": BenchConfig("fine-xl", 4, 2048, 2048, 64, 1024, 8),
}


@dataclass(frozen=True)
class BenchResult:
    """Ratios of one config: candidate name -> median ratio to the dense-equivalent.

    ``fwd_ms``/``fwd_bwd_ms`` are medians in milliseconds (for orientation only);
    ``memory_ratio`` is peak activation RSS over the dense-equivalent's (None when skipped).
    """

    config: BenchConfig
    fwd_ratio: dict[str, float]
    fwd_bwd_ratio: dict[str, float]
    fwd_ms: dict[str, float]
    fwd_bwd_ms: dict[str, float]
    memory_ratio: dict[str, float] = field(default_factory=dict)
    memory_mib: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


class NaiveMaskedLoopMoE(nn.Module):
    """The copy-paste MoE: a softmax top-k gate and a Python loop over experts with a token mask.

    Written the way Hugging Face's eager Mixtral block does it (one-hot expert mask, ``where``
    per expert, ``index_add_``): the baseline this library is measured against.
    """

    def __init__(self, dim: int, num_experts: int, hidden: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))

    def forward(self, x: Tensor) -> Tensor:
        x_ND = x.reshape(-1, x.shape[-1])
        probs_NE = self.gate(x_ND).softmax(dim=-1)
        weights_NK, ids_NK = probs_NE.topk(self.top_k, dim=-1)
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        out_ND = torch.zeros_like(x_ND)
        mask_EKN = F.one_hot(ids_NK, len(self.experts)).permute(2, 1, 0)
        for expert, module in enumerate(self.experts):
            slot, token = torch.where(mask_EKN[expert])
            y = module(x_ND[token]) * weights_NK[token, slot, None]
            out_ND.index_add_(0, token, y)
        return out_ND.reshape(x.shape)


class _RowsRepeated(nn.Module):
    """Shape limit: one expert-shaped SwiGLU over ``tokens * top_k`` rows."""

    def __init__(self, dim: int, hidden: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.ffn = SwiGLU(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).repeat_interleave(self.top_k, dim=0)
        out: Tensor = self.ffn(rows)
        return out


def _hf_mixtral(config: BenchConfig) -> nn.Module:
    from transformers import MixtralConfig  # optional extra, imported only here
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_config = MixtralConfig(
        hidden_size=config.dim,
        intermediate_size=config.hidden,
        num_local_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
    )
    block: nn.Module = MixtralSparseMoeBlock(hf_config)
    return block


class _FirstOutput(nn.Module):
    """Wraps a module that returns a tuple (Hugging Face's block returns (y, logits))."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        result: Tensor = out[0] if isinstance(out, tuple) else out
        return result


def _moe(config: BenchConfig, backend: str, capacity_factor: float | None = None) -> nn.Module:
    from .. import MoELayer, SwiGLUExperts, TopKRouter

    router = TopKRouter(
        config.dim, config.num_experts, config.top_k, capacity_factor=capacity_factor
    )
    experts = SwiGLUExperts(config.num_experts, config.dim, config.hidden, backend=backend)  # type: ignore[arg-type]
    return MoELayer(config.dim, router, experts)


DENSE = "dense-equivalent"
SHAPE_LIMIT = "shape limit"


def build_candidates(
    config: BenchConfig, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[dict[str, Callable[[], nn.Module]], dict[str, str]]:
    """Candidate name -> constructor, and name -> reason for the ones skipped."""
    makers: dict[str, Callable[[], nn.Module]] = {
        DENSE: lambda: SwiGLU(config.dim, config.top_k * config.hidden),
        SHAPE_LIMIT: lambda: _RowsRepeated(config.dim, config.hidden, config.top_k),
        "moe[auto]": lambda: _moe(config, "auto"),
        "moe[loop]": lambda: _moe(config, "loop"),
    }
    skipped: dict[str, str] = {}
    if grouped_mm_available(torch.device(device), dtype):
        makers["moe[grouped_mm]"] = lambda: _moe(config, "grouped_mm")
    else:
        skipped["moe[grouped_mm]"] = f"F.grouped_mm unavailable for {dtype} on {device}"
    makers["moe[bmm] cf=1.25"] = lambda: _moe(config, "bmm", capacity_factor=1.25)
    makers["naive masked loop"] = lambda: NaiveMaskedLoopMoE(
        config.dim, config.num_experts, config.hidden, config.top_k
    )
    try:
        import transformers  # noqa: F401
    except ImportError:
        skipped["hf mixtral"] = "transformers not installed"
    else:
        makers["hf mixtral"] = lambda: _FirstOutput(_hf_mixtral(config))
    return makers, skipped


def _time_once(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _median_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    dense = times[DENSE]
    return {
        name: statistics.median(t / d for t, d in zip(values, dense, strict=True))
        for name, values in times.items()
    }


def run_bench(
    config: BenchConfig,
    *,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = 2,
    memory: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    only: Sequence[str] | None = None,
    seed: int = 0,
) -> BenchResult:
    """Time every candidate on ``config`` side by side; return median pairwise ratios.

    Args:
        config: the shape.
        repeats: timed repetitions (each runs every candidate once, in rotating order).
        warmup: untimed repetitions first.
        threads: ``torch.set_num_threads`` value (None keeps torch's default).
        memory: also measure peak RSS in fresh subprocesses (CPU only).
        dtype: parameter and input dtype.
        device: ``"cpu"`` or ``"cuda"``.
        only: restrict to these candidate names (the dense-equivalent is always included).
        seed: RNG seed for weights and input.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    makers, skipped = build_candidates(config, dtype, device)
    if only is not None:
        makers = {n: m for n, m in makers.items() if n in only or n == DENSE}
    modules = {name: make().to(device=device, dtype=dtype) for name, make in makers.items()}
    x = torch.randn(config.batch, config.seq, config.dim, device=device, dtype=dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def forward(module: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return module(x)

        return run

    def forward_backward(module: nn.Module) -> Callable[[], object]:
        x_grad = x.detach().requires_grad_(True)

        def run() -> object:
            module(x_grad).float().square().mean().backward()
            for param in module.parameters():
                param.grad = None
            return None

        return run

    names = list(modules)
    results: dict[str, dict[str, list[float]]] = {}
    for mode, wrap in (("fwd", forward), ("fwd_bwd", forward_backward)):
        fns = {name: wrap(modules[name]) for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(warmup + repeats):
            rotated = names[rep % len(names) :] + names[: rep % len(names)]
            for name in rotated:
                elapsed = _time_once(fns[name], sync)
                if rep >= warmup:
                    times[name].append(elapsed)
        results[mode] = times

    memory_ratio: dict[str, float] = {}
    memory_mib: dict[str, float] = {}
    if memory and device.startswith("cuda"):
        memory_mib = {name: _peak_cuda_mib(modules[name], x) for name in names}
    elif memory and device == "cpu":
        for name in names:
            mib = _peak_rss_subprocess(config, name, dtype, threads)
            if mib is None:
                skipped[f"{name} (memory)"] = "subprocess failed"
            else:
                memory_mib[name] = mib
    if DENSE in memory_mib:
        dense_mib = max(memory_mib[DENSE], 1e-9)
        memory_ratio = {name: mib / dense_mib for name, mib in memory_mib.items()}

    def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
        return {name: 1e3 * statistics.median(values) for name, values in times.items()}

    return BenchResult(
        config=config,
        fwd_ratio=_median_ratios(results["fwd"]),
        fwd_bwd_ratio=_median_ratios(results["fwd_bwd"]),
        fwd_ms=medians_ms(results["fwd"]),
        fwd_bwd_ms=medians_ms(results["fwd_bwd"]),
        memory_ratio=memory_ratio,
        memory_mib=memory_mib,
        skipped=skipped,
    )


def _peak_cuda_mib(module: nn.Module, x: Tensor) -> float:
    """Peak CUDA memory of one forward+backward above what was allocated before it."""
    x = x.detach().requires_grad_(True)
    x.grad = torch.zeros_like(x)
    for param in module.parameters():
        param.grad = torch.zeros_like(param)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    module(x).float().square().mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for param in module.parameters():
        param.grad = None
    return peak / 2**20


def _status_mib(field_name: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _memory_child(config_name: str, candidate: str, dtype_name: str, threads: int | None) -> None:
    """Run in a fresh process: peak RSS of one forward+backward above the set-up RSS.

    A first forward+backward on a few rows maps torch's kernel code and warms the allocator
    (hundreds of MiB of RSS that every candidate pays alike); then the peak-RSS mark is reset
    (``/proc/self/clear_refs``) and the measured step runs.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    config = CONFIGS[config_name]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    makers, _ = build_candidates(config, dtype)
    module = makers[candidate]().to(dtype=dtype)
    x = torch.randn(config.batch, config.seq, config.dim, dtype=dtype, requires_grad=True)
    module(x[:1, :8]).float().square().mean().backward()
    # fill_, not zeros_like: calloc'd pages are not resident until written
    x.grad = torch.empty_like(x).fill_(0.0)
    for param in module.parameters():
        param.grad = torch.empty_like(param).fill_(0.0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = _status_mib("VmRSS")
    module(x).float().square().mean().backward()
    print(json.dumps({"activation_mib": _status_mib("VmHWM") - before}))


def _peak_rss_subprocess(
    config: BenchConfig, name: str, dtype: torch.dtype, threads: int | None
) -> float | None:
    if config.name not in CONFIGS or not sys.platform.startswith("linux"):
        return None
    code = (
        "from pytorch_mixtures.app.bench import _memory_child; "
        f"_memory_child({config.name!r}, {name!r}, {str(dtype).split('.')[-1]!r}, {threads!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        return None
    try:
        value: float = json.loads(proc.stdout.strip().splitlines()[-1])["activation_mib"]
    except (ValueError, KeyError, IndexError):
        return None
    return value


def format_table(result: BenchResult) -> str:
    """A plain-text table of one config's results.

    Columns ``x limit``: fwd and fwd+bwd ratios over the shape limit's (the second reference
    of the README's Performance section: the experts' matmuls with zero routing overhead), when
    it was run.
    """
    c = result.config
    limit_fwd = result.fwd_ratio.get(SHAPE_LIMIT)
    limit_fwd_bwd = result.fwd_bwd_ratio.get(SHAPE_LIMIT)
    lines = [
        f"config {c.name}: {c.batch}x{c.seq} tokens, dim {c.dim}, {c.num_experts} experts of "
        f"hidden {c.hidden}, top-{c.top_k}; ratios = time / dense-equivalent time "
        "(median of pairwise ratios)",
        f"{'candidate':<22} {'fwd ms':>9} {'fwd x':>7} {'fwd+bwd ms':>11} {'fwd+bwd x':>10}"
        f" {'act. mem MiB':>13} {'mem x':>6} {'x limit (fwd, f+b)':>19}",
    ]
    for name in result.fwd_ratio:
        mem_mib = result.memory_mib.get(name)
        mem_ratio = result.memory_ratio.get(name)
        vs_limit = "-"
        if limit_fwd and limit_fwd_bwd:
            vs_limit = (
                f"{result.fwd_ratio[name] / limit_fwd:.2f}, "
                f"{result.fwd_bwd_ratio[name] / limit_fwd_bwd:.2f}"
            )
        lines.append(
            f"{name:<22} {result.fwd_ms[name]:>9.1f} {result.fwd_ratio[name]:>7.2f} "
            f"{result.fwd_bwd_ms[name]:>11.1f} {result.fwd_bwd_ratio[name]:>10.2f}"
            f" {'-' if mem_mib is None else f'{mem_mib:.0f}':>13}"
            f" {'-' if mem_ratio is None else f'{mem_ratio:.2f}':>6} {vs_limit:>19}"
        )
    for name, reason in result.skipped.items():
        lines.append(f"{name:<22} skipped: {reason}")
    return "\n".join(lines)


def _count(minimum: int) -> Callable[[str], int]:
    """An option type: an integer >= ``minimum``, else "expected ..., got '<text>'"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _device_option(text: str) -> str:
    """``--device``: ``cpu`` or an available ``cuda[:N]``."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"expected cpu (CUDA is not available), got {text!r}")
    return text


def _candidate_name(text: str) -> str:
    """``--only``: a name :func:`build_candidates` knows (built or skipped here)."""
    makers, skipped = build_candidates(CONFIGS["std"])
    known = [*makers, *skipped]
    if text not in known:
        raise argparse.ArgumentTypeError(
            f"expected candidate names among {', '.join(map(repr, known))}, got {text!r}"
        )
    return text


def _json_file(text: str) -> str:
    """``--json``: a file to write, in an existing folder (checked before the benchmark runs)."""
    path = Path(text)
    if path.is_dir() or not path.parent.is_dir():
        what = "a folder" if path.is_dir() else "a file in a missing folder"
        raise argparse.ArgumentTypeError(
            f"expected a file to write in an existing folder, got {what} {text!r}"
        )
    return text


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pytorch-mixtures bench`` and ``benchmarks/moe_layer.py``."""
    parser.add_argument(
        "--config", choices=[*CONFIGS, "all"], default="std", help="all = std and fine"
    )
    parser.add_argument(
        "--json", type=_json_file, metavar="FILE", help="also write the results as JSON"
    )
    parser.add_argument("--repeats", type=_count(1), default=5, help="timed repetitions")
    parser.add_argument("--warmup", type=_count(0), default=1, help="untimed repetitions first")
    parser.add_argument("--threads", type=_count(1), default=2, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS subprocesses")
    parser.add_argument("--device", type=_device_option, default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument(
        "--only", type=_candidate_name, nargs="+", metavar="NAME", help="restrict the candidates"
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="inference tables instead: decode-shaped layer calls, generate() per token, "
        "training steps (MoE and MoD against dense)",
    )
    parser.add_argument(
        "--sizes", nargs="+", choices=["small", "medium"], default=["small", "medium"],
        help="with --decode: the LM sizes",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true",
        help="with --decode: also compiled layer calls and generate(compile=True)",
    )  # fmt: skip


def run_bench_cli(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed :func:`add_bench_arguments` options; print the tables."""
    if args.decode:
        return _run_decode_cli(args)
    names = ["std", "fine"] if args.config == "all" else [args.config]
    print(
        f"torch {torch.__version__}, {args.device}, {args.dtype}, threads {args.threads}, "
        f"repeats {args.repeats} (+{args.warmup} warm-up)"
    )
    payload = []
    for name in names:
        result = run_bench(
            CONFIGS[name],
            repeats=args.repeats,
            warmup=args.warmup,
            threads=args.threads,
            memory=not args.no_memory,
            dtype=getattr(torch, args.dtype),
            device=args.device,
            only=args.only,
        )
        print(format_table(result), flush=True)
        payload.append({**asdict(result), "torch": torch.__version__, "threads": args.threads})
    if args.json:
        with open(args.json, "w") as out:
            json.dump(payload, out, indent=2)
    return 0


def _run_decode_cli(args: argparse.Namespace) -> int:
    import importlib.util

    from . import decode_bench

    torch.set_num_threads(args.threads)
    where = decode_bench.Where(args.device, getattr(torch, args.dtype))
    batches = (1, 8, 64) if args.device.startswith("cuda") else (1, 8)
    print(
        f"torch {torch.__version__}, {args.device}, {args.dtype}, threads {args.threads}, "
        f"repeats {args.repeats}"
    )
    tables: dict[str, list[decode_bench.Row]] = {"layer": [], "generate": [], "train step": []}
    for name in args.sizes:
        size = decode_bench.SIZES[name]
        tables["layer"] += decode_bench.layer_table(
            size, repeats=args.repeats, where=where, tokens=batches, compile=args.compile
        )
        tables["generate"] += decode_bench.generate_table(
            size, repeats=args.repeats, where=where, batches=batches, compile=args.compile
        )
        if where == decode_bench.CPU:  # (the training step is a CPU table)
            tables["train step"] += decode_bench.train_table(size, repeats=args.repeats)
    if importlib.util.find_spec("transformers") is not None:  # an optional extra
        tables["hf mod generate"] = decode_bench.hf_mod_generate_table(
            repeats=args.repeats, where=where
        )
    titles = {
        "layer": "one layer, eval, no grad: time / dense SwiGLU of width k*H (x), microseconds",
        "generate": "generate() with the KV cache: time per token / dense (x), tokens/s",
        "train step": "training step (forward, backward, AdamW): time / dense (x), milliseconds",
        "hf mod generate": "HF generate(), Mixture-of-Depths: with its KV cache / dense (x), "
        "without / with (x), tokens/s",
    }
    for key, rows in tables.items():
        if rows:
            print()
            print(decode_bench.format_rows(titles[key], rows), flush=True)
    if args.json:
        payload = {key: [list(row) for row in rows] for key, rows in tables.items()}
        with open(args.json, "w") as out:
            json.dump(payload, out, indent=2)
    return 0
