"""The demo (``pytorch-mixtures demo``) end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pytorch_mixtures.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_end_to_end(tmp_path: Path, capsys, tiny):
    out = tmp_path / "demo"
    args = ["demo", "--steps", "3", "--out", str(out), "--max-bytes", "60000", *tiny]
    args += ["--sample-tokens", "8"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    models = results["models"]
    assert list(models) == ["dense", "moe", "mod", "mode"]
    for kind in ("dense", "moe"):
        entry = models[kind]
        assert entry["status"] == "ok"
        assert [h["step"] for h in entry["history"]] == [1, 2, 3]
        assert math.isfinite(entry["val_loss"]) and entry["flops_per_token"] > 0
        assert len(entry["samples"]) == 3
    assert models["moe"]["params_total"] > models["dense"]["params_total"]
    assert "load_imbalance" in models["moe"] and "load_imbalance" not in models["dense"]
    for kind in ("mod", "mode"):  # built when the library has MoD, never silently skipped
        assert models[kind]["status"] in ("ok", "not available")
        if models[kind]["status"] == "ok":
            assert "val_loss_topk" in models[kind] and "val_loss_causal" in models[kind]
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "| moe |" in printed and "| mod |" in printed
    assert "[dense] def " in printed
