"""Fixtures of the application's tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"".join(f"line {i}: the quick brown fox\n".encode() for i in range(300)))
    return path


@pytest.fixture
def tiny() -> list[str]:
    """Command-line options of a tiny, fast model and schedule."""
    options = ["--dim", "32", "--num-layers", "2", "--num-heads", "2", "--ffn-hidden", "64"]
    options += ["--num-experts", "4", "--batch-size", "2", "--seq-len", "16"]
    options += ["--eval-batches", "1", "--no-progress"]
    return options
