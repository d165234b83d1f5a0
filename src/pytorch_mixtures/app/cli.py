"""Command line: ``pytorch-mixtures demo`` and ``pytorch-mixtures train``.

Needs the ``[cli]`` extra (tqdm, matplotlib, safetensors); each is imported where it is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .data import Corpus, load_corpus
from .demo import KINDS, SizeConfig, format_table, model_config, run_demo
from .train import TrainConfig, build_model, train

__all__ = ["main"]

# `make demo` trains four models: 150 steps (where the README's seed table was measured) took
# 2 min 45 s on an idle 2-core machine, inside the 5-minute budget with room for a busy one.
DEMO_STEPS = 150


# config fields that are options of the same name (``--batch-size`` sets ``batch_size``)
_SCHEDULE_OPTIONS = ("batch_size", "seq_len", "lr", "warmup_steps", "eval_every", "eval_batches")
_SIZE_OPTIONS = (
    "dim",
    "num_layers",
    "num_heads",
    "ffn_hidden",
    "num_experts",
    "top_k",
    "mod_capacity",
)


def _add_field_options(
    group: argparse._ArgumentGroup, defaults: object, names: Sequence[str]
) -> None:
    """One option per field in ``names``, typed and defaulted by its value in ``defaults``."""
    for name in names:
        value = getattr(defaults, name)
        group.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)


def _add_common(parser: argparse.ArgumentParser, steps: int) -> None:
    """Options shared by ``demo`` and ``train``: data, schedule and model size."""
    size, schedule = SizeConfig(), TrainConfig()
    parser.add_argument("--steps", type=int, default=steps, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batches")
    parser.add_argument(
        "--data", type=Path, default=None, help="a text file (default: Python's stdlib sources)"
    )
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="corpus size cap")
    _add_field_options(parser.add_argument_group("schedule"), schedule, _SCHEDULE_OPTIONS)
    group = parser.add_argument_group("model size")
    _add_field_options(group, size, _SIZE_OPTIONS)
    group.add_argument(
        "--balance-coef",
        type=float,
        default=size.balance_loss_coef,
        help="MoE balance-loss coefficient (default: the demo's choice, see README)",
    )
    group.add_argument(
        "--routed-scaling-factor",
        type=float,
        default=size.routed_scaling_factor,
        help="what MoE combine weights sum to (default: top_k, matching the dense FFN; "
        "1.0 = Mixtral)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _configs(args: argparse.Namespace) -> tuple[TrainConfig, SizeConfig]:
    schedule = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, args.steps),
        seed=args.seed,
        eval_every=min(args.eval_every, args.steps),
        eval_batches=args.eval_batches,
    )
    size = SizeConfig(
        **{name: getattr(args, name) for name in _SIZE_OPTIONS},
        balance_loss_coef=args.balance_coef,
        routed_scaling_factor=args.routed_scaling_factor,
    )
    return schedule, size


def _corpus(args: argparse.Namespace) -> Corpus:
    """Load the corpus; a bad ``--data`` ends the program with a one-line message."""
    try:
        return load_corpus(args.data, max_bytes=args.max_bytes, min_split_tokens=args.seq_len + 1)
    except ValueError as error:
        raise SystemExit(f"pytorch-mixtures: error: --{error}") from None


def _check_out_dir(out: Path) -> None:
    """``--out`` must be a writable folder (made if missing): say so before any training."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"pytorch-mixtures: error: --out: expected a folder, got the file '{out}'")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as error:
        raise SystemExit(
            f"pytorch-mixtures: error: --out: expected a writable folder, got '{out}' "
            f"({error.strerror or error})"
        ) from None


def _demo(args: argparse.Namespace) -> int:
    _check_out_dir(args.out)
    schedule, size = _configs(args)
    corpus = _corpus(args)
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    print(f"data: {corpus.source}")
    results = run_demo(
        corpus,
        schedule,
        size,
        args.out,
        kinds=kinds,
        sample_tokens=args.sample_tokens,
        progress=not args.no_progress,
    )
    print()
    print(format_table(results))
    print()
    for kind, entry in results["models"].items():
        for text in entry.get("samples", []):
            lines = text.splitlines()[:3]
            print(f"[{kind}] " + "\n        ".join(lines))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'report.png'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    _check_out_dir(args.out)
    schedule, size = _configs(args)
    corpus = _corpus(args)
    try:
        model = build_model(model_config(args.model, size), args.seed)
    except NotImplementedError as error:
        raise SystemExit(f"pytorch-mixtures: error: --model {args.model}: {error}") from None
    try:
        result = train(
            model,
            corpus,
            schedule,
            out=args.out,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            stop_at=args.stop_at,
            name=args.model,
            progress=not args.no_progress,
        )
    except ValueError as error:  # resume problems: no checkpoint, different model
        raise SystemExit(f"pytorch-mixtures: error: {error}") from None
    final = result.evals[-1] if result.evals else {}
    done = result.history[-1]["step"] if result.history else 0
    print(
        json.dumps(
            {
                "step": done,
                "train_loss": result.history[-1]["loss"] if result.history else None,
                "last_eval": final,
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pytorch-mixtures")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="train dense, MoE, MoD and MoDE LMs under matched settings and compare"
    )
    _add_common(demo, DEMO_STEPS)
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    demo.add_argument("--sample-tokens", type=int, default=80, help="bytes sampled per prompt")
    demo.add_argument("--models", default="dense,moe,mod,mode", help="comma-separated kinds")
    demo.set_defaults(func=_demo)

    trainer = sub.add_parser("train", help="train one model with checkpoints and resume")
    trainer.add_argument("--model", choices=KINDS, required=True)
    trainer.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    trainer.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    trainer.add_argument("--checkpoint-every", type=int, default=0, help="0: only at the end")
    trainer.add_argument(
        "--stop-at", type=int, default=None, help="stop (and checkpoint) after this step"
    )
    _add_common(trainer, DEMO_STEPS)
    trainer.set_defaults(func=_train)

    from .bench import add_bench_arguments, run_bench_cli

    bench = sub.add_parser("bench", help="MoE vs dense-equivalent speed/memory ratio table")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench_cli)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    raise SystemExit(main())
