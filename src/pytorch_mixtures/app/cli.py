"""Command line: ``pytorch-mixtures demo``, ``pytorch-mixtures train`` and ``... bench``.

Needs the ``[cli]`` extra (tqdm, matplotlib, safetensors); each is imported where it is used,
and checked for before any training.

A bad value, on the command line or found by the run (an unusable ``--out``, ``--data`` or
checkpoint), ends the program with one line on stderr, ``pytorch-mixtures: error: --flag:
expected ..., got ...``, and exit status 2, before any training where it can be found then.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .data import Corpus, load_corpus
from .demo import KINDS, SizeConfig, format_table, model_config, run_demo
from .train import TrainConfig, build_model, train

__all__ = ["UsageError", "main"]

_EXTRA = 'pip install "pytorch-mixtures[cli]"'
_EXTRA_MODULES = ("tqdm", "matplotlib", "safetensors")


class UsageError(SystemExit):
    """A bad command line or setting: exit status 2 and one line ``pytorch-mixtures: error:
    <message>`` (its ``str``), which :func:`main` prints on stderr."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.line = "pytorch-mixtures: error: " + re.sub(r"\s*[\r\n]+\s*", " ", message.strip())

    def __str__(self) -> str:
        return self.line


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) raised as :class:`UsageError`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message.removeprefix("argument "))


# -- option types: each rejects a bad value with "expected ..., got '<value>'" (exit 2) ------


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    expected = (
        f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    )

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _positive_float(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:  # False for nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _kinds(text: str) -> list[str]:
    """``--models``: comma-separated kinds, each known and named once."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    among = ", ".join(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        what = f"the unknown {', '.join(map(repr, unknown))} in" if unknown else "no kind in"
        raise argparse.ArgumentTypeError(
            f"expected comma-separated model kinds among {among}, got {what} {text!r}"
        )
    if len(set(kinds)) < len(kinds):
        raise argparse.ArgumentTypeError(f"expected each model kind once, got {text!r}")
    return kinds


_positive = _integer(1)
_nonnegative = _integer(0)
_FIELD_TYPES: dict[str, Callable[[str], object]] = {
    "batch_size": _positive,
    "seq_len": _positive,
    "lr": _positive_float,
    "warmup_steps": _nonnegative,
    "eval_every": _positive,
    "eval_batches": _positive,
    "dim": _positive,
    "num_layers": _positive,
    "num_heads": _positive,
    "ffn_hidden": _positive,
    "num_experts": _positive,
    "top_k": _positive,
    "mod_capacity": _fraction,
}
# config fields whose option is not ``--`` + the field's name with dashes
_FIELD_FLAGS = {"balance_loss_coef": "--balance-coef"}

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
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, type=_FIELD_TYPES.get(name, type(value)), default=value)


def _add_common(parser: argparse.ArgumentParser, steps: int) -> None:
    """Options shared by ``demo`` and ``train``: data, schedule and model size."""
    size, schedule = SizeConfig(), TrainConfig()
    parser.add_argument("--steps", type=_positive, default=steps, help="training steps per model")
    parser.add_argument(
        "--seed", type=_integer(0, 2**32 - 1), default=0, help="seed of weights and batches"
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="a text file (default: Python's stdlib sources)"
    )
    parser.add_argument("--max-bytes", type=_integer(2), default=4_000_000, help="corpus size cap")
    _add_field_options(parser.add_argument_group("schedule"), schedule, _SCHEDULE_OPTIONS)
    group = parser.add_argument_group("model size")
    _add_field_options(group, size, _SIZE_OPTIONS)
    group.add_argument(
        "--balance-coef",
        type=_nonnegative_float,
        default=size.balance_loss_coef,
        help="MoE balance-loss coefficient (default: the demo's choice, see README)",
    )
    group.add_argument(
        "--routed-scaling-factor",
        type=_positive_float,
        default=size.routed_scaling_factor,
        help="what MoE combine weights sum to (default: top_k, matching the dense FFN; "
        "1.0 = Mixtral)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _configs(args: argparse.Namespace, kinds: Sequence[str]) -> tuple[TrainConfig, SizeConfig]:
    """The schedule and size of the options, and the model config of each of ``kinds`` built
    once: a bad value or combination is a :class:`UsageError` naming its option."""
    if args.top_k > args.num_experts:
        raise UsageError(
            f"--top-k: expected an integer <= --num-experts={args.num_experts}, got {args.top_k}"
        )
    if args.dim % args.num_heads or (args.dim // args.num_heads) % 2:
        raise UsageError(
            f"--num-heads: expected a divisor of --dim={args.dim} giving an even head dim, "
            f"got {args.num_heads}"
        )
    if any(kind in ("moe", "mode") for kind in kinds) and args.ffn_hidden < args.top_k:
        raise UsageError(  # MoE experts are ffn_hidden // top_k wide
            f"--ffn-hidden: expected an integer >= --top-k={args.top_k} for MoE experts of "
            f"width ffn_hidden // top_k, got {args.ffn_hidden}"
        )
    try:
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
        for kind in kinds:
            model_config(kind, size)
    except (TypeError, ValueError) as error:
        raise UsageError(_flag_message(str(error))) from None
    return schedule, size


def _flag_message(message: str) -> str:
    """``"batch_size: expected ..."`` (a config's message) as ``"--batch-size: expected ..."``."""
    fields = {f.name for c in (TrainConfig, SizeConfig) for f in dataclasses.fields(c)}
    fields |= {"data", "max_bytes"}  # load_corpus's arguments
    name, sep, rest = message.partition(": ")
    if not sep or name not in fields:
        return message
    for other in fields:  # "top_k: ... num_experts=8" -> "--top-k: ... --num-experts=8"
        rest = re.sub(rf"(?<![\w-]){other}=", _flag(other) + "=", rest)
    return f"{_flag(name)}: {rest}"


def _flag(field: str) -> str:
    return _FIELD_FLAGS.get(field, "--" + field.replace("_", "-"))


def _require_extras(command: str, modules: Sequence[str]) -> None:
    """The ``[cli]`` extra's modules ``command`` imports later: say which is missing now."""
    missing = [name for name in modules if not _importable(name)]
    if missing:
        hint = " (or pass --no-progress)" if missing == ["tqdm"] else ""
        raise UsageError(
            f"{command} needs {', '.join(missing)}, from the [cli] extra: {_EXTRA}{hint}"
        )


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module in sys.modules without a __spec__
        return name in sys.modules and sys.modules[name] is not None


def _corpus(args: argparse.Namespace) -> Corpus:
    """Load the corpus; a bad ``--data`` ends the program with a one-line message."""
    try:
        return load_corpus(args.data, max_bytes=args.max_bytes, min_split_tokens=args.seq_len + 1)
    except ValueError as error:
        message = str(error)
        if args.data is None and message.startswith("data: expected at least"):
            message = "max_bytes" + message.removeprefix("data")  # the stdlib corpus, cut short
        raise UsageError(_flag_message(message)) from None


def _check_out_dir(out: Path) -> None:
    """``--out`` must be a writable folder (made if missing): say so before any training."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: expected a folder, got the file '{out}'")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as error:
        raise UsageError(
            f"--out: expected a writable folder, got '{out}' ({error.strerror or error})"
        ) from None


def _demo(args: argparse.Namespace) -> int:
    kinds: list[str] = args.models
    schedule, size = _configs(args, kinds)
    _require_extras("demo", ["matplotlib"] + ([] if args.no_progress else ["tqdm"]))
    _check_out_dir(args.out)
    corpus = _corpus(args)
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
    schedule, size = _configs(args, [args.model])
    _require_extras("train", ["safetensors"] + ([] if args.no_progress else ["tqdm"]))
    _check_out_dir(args.out)
    corpus = _corpus(args)
    try:
        model = build_model(model_config(args.model, size), args.seed)
    except NotImplementedError as error:
        raise UsageError(f"--model: {args.model} is not available ({error})") from None
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
    except ValueError as error:  # resume problems: no checkpoint, corrupt, different model
        raise UsageError(str(error)) from None
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
    """Run the command line ``argv``; a bad value raises :class:`UsageError` (exit status 2)
    after printing its one line on stderr."""
    try:
        return _main(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        raise
    except ModuleNotFoundError as error:  # an extra missing where no check foresaw it
        if (error.name or "").partition(".")[0] not in _EXTRA_MODULES:
            raise
        usage = UsageError(f"{error.name} is missing, from the [cli] extra: {_EXTRA}")
        print(usage, file=sys.stderr)
        raise usage from None


def _main(argv: Sequence[str] | None) -> int:
    parser = _Parser(prog="pytorch-mixtures")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="train dense, MoE, MoD and MoDE LMs under matched settings and compare"
    )
    _add_common(demo, DEMO_STEPS)
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    demo.add_argument(
        "--sample-tokens", type=_nonnegative, default=80, help="bytes sampled per prompt"
    )
    demo.add_argument(
        "--models", type=_kinds, default="dense,moe,mod,mode", help="comma-separated kinds"
    )
    demo.set_defaults(func=_demo)

    trainer = sub.add_parser("train", help="train one model with checkpoints and resume")
    trainer.add_argument("--model", choices=KINDS, required=True)
    trainer.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    trainer.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    trainer.add_argument(
        "--checkpoint-every", type=_nonnegative, default=0, help="0: only at the end"
    )
    trainer.add_argument(
        "--stop-at", type=_nonnegative, default=None, help="stop (and checkpoint) after this step"
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
