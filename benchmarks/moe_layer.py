"""MoELayer vs the naive masked-loop MoE and the dense references: a side-by-side ratio table.

Usage: ``python benchmarks/moe_layer.py --config std|fine|all [--json FILE]`` (same as
``pytorch-mixtures bench``). See :mod:`pytorch_mixtures.app.bench` for what each column means.
"""

from __future__ import annotations

import argparse

from pytorch_mixtures.app.bench import add_bench_arguments, run_bench_cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_bench_arguments(parser)
    raise SystemExit(run_bench_cli(parser.parse_args()))
