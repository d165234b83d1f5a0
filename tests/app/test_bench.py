"""The benchmark (``pytorch_mixtures.app.bench``, ``pytorch-mixtures bench``): its baseline is a
correct MoE, every candidate runs and reports, and the subcommand writes its JSON."""

from __future__ import annotations

import pytest
import torch

import pytorch_mixtures as pm
from pytorch_mixtures.app.bench import CONFIGS, NaiveMaskedLoopMoE, run_bench

# odd dims, as in test_backends.py
DIM, HIDDEN, EXPERTS = 6, 10, 5


def test_bench_baseline_is_a_correct_moe():
    """The benchmark's naive masked loop computes the same MoE as MoELayer (fair baseline)."""
    torch.manual_seed(9)
    naive = NaiveMaskedLoopMoE(DIM, EXPERTS, HIDDEN, 2)
    moe = pm.MoELayer(
        DIM, pm.TopKRouter(DIM, EXPERTS, 2), pm.SwiGLUExperts(EXPERTS, DIM, HIDDEN, backend="auto")
    )
    with torch.no_grad():
        moe.router.gate.weight.copy_(naive.gate.weight)
        for e, expert in enumerate(naive.experts):
            moe.experts.w_gate_up[e].copy_(expert.gate_up.weight.T)
            moe.experts.w_down[e].copy_(expert.down.weight.T)
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(naive(x), moe(x), rtol=1e-5, atol=1e-6)


def test_bench_runs_and_reports_every_candidate():
    result = run_bench(CONFIGS["tiny"], repeats=1, warmup=0, memory=False, threads=None)
    assert result.fwd_ratio["dense-equivalent"] == 1.0
    for name in ["moe[loop]", "moe[auto]", "moe[bmm] cf=1.25", "naive masked loop"]:
        assert result.fwd_ratio[name] > 0 and result.fwd_bwd_ratio[name] > 0


def test_cli_bench_subcommand(tmp_path, capsys):
    from pytorch_mixtures.app.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--config", "tiny", "--repeats", "1", "--warmup", "0", "--no-memory"]
    assert main([*args, "--only", "moe[auto]", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "moe[auto]" in printed and "dense-equivalent" in printed
    import json

    (result,) = json.loads(out.read_text())
    assert set(result["fwd_ratio"]) == {"dense-equivalent", "moe[auto]"}


def test_decode_bench_tables_have_every_ratio():
    """bench --decode's tables at the small size, one repetition: every candidate's ratio to
    dense is there and positive (no timing is asserted)."""
    from pytorch_mixtures.app import decode_bench

    size = decode_bench.SIZES["small"]
    rows = decode_bench.layer_table(size, repeats=1, inner=1)
    rows += decode_bench.generate_table(size, repeats=1, prompt=4, new_tokens=2)
    rows += decode_bench.train_table(size, repeats=1, batch=2, seq=8)
    whats = [what for _, what, _ in rows]
    assert whats == [
        "layer, 1 token",
        "layer, 8 tokens",
        "generate, batch 1",
        "generate, batch 8",
        "train step, batch 2x8",
    ]
    for _, what, values in rows:
        ratios = {k: v for k, v in values.items() if k.endswith(" x")}
        expected = {"moe x", "moe full path x"} if what.startswith("layer") else {"moe x", "mod x"}
        assert expected <= ratios.keys(), what
        assert all(v > 0 for v in values.values()), what
    table = decode_bench.format_rows("t", rows)
    assert table.count("\n") == len(rows) + 2


@pytest.mark.slow
def test_decode_bench_compiled_rows():
    """bench --decode --compile: compiled layer and generate rows, with the compiled models'
    speed-up over their eager decoding (one repetition, no timing asserted)."""
    from pytorch_mixtures.app import decode_bench

    size = decode_bench.SIZES["small"]
    rows = decode_bench.layer_table(size, repeats=1, inner=1, tokens=(1,), compile=True)
    rows += decode_bench.generate_table(
        size, repeats=1, prompt=4, new_tokens=3, batches=(2,), compile=True
    )
    assert [what for _, what, _ in rows] == [
        "layer, 1 token",
        "layer, 1 token, compiled",
        "generate, batch 2",
        "generate, compiled, batch 2",
    ]
    compiled = rows[-1][2]
    assert {"moe x", "mod x", "dense vs eager", "moe vs eager", "mod vs eager"} <= compiled.keys()
    assert all(v > 0 for _, _, values in rows for v in values.values())


def test_hf_mod_generate_table_one_repetition():
    """bench --decode's HF Mixture-of-Depths row, tiny and once: both ratios and every
    candidate's tokens/s are there and positive."""
    pytest.importorskip("transformers")
    from pytorch_mixtures.app import decode_bench

    rows = decode_bench.hf_mod_generate_table(
        repeats=1, dim=32, num_layers=2, num_heads=4, prompt=6, new_tokens=3
    )
    assert len(rows) == 1
    _, what, values = rows[0]
    assert "hf llama generate" in what
    for key in (
        "mod cache x",
        "mod no-cache x cache",
        "dense tok/s",
        "mod cache tok/s",
        "mod no-cache tok/s",
    ):
        assert values[key] > 0, key
    assert "hf llama generate" in decode_bench.format_rows("t", rows)
