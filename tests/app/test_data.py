"""The corpus (``pytorch_mixtures.app.data``): stdlib and user files, the split, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pytorch_mixtures.app.cli import main
from pytorch_mixtures.app.data import load_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stdlib_corpus_is_deterministic_with_tail_held_out():
    a, b = load_corpus(max_bytes=60_000), load_corpus(max_bytes=60_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train.numel() + a.val.numel() == 60_000
    assert a.val.numel() == 6_000
    assert "standard library" in a.source and a.num_files >= 1
    # byte tokens of real Python source
    text = bytes(a.train[:20_000].tolist())
    assert b"def " in text or b"import " in text


def test_user_file_split_and_batches(text_file: Path):
    raw = text_file.read_bytes()
    corpus = load_corpus(text_file, val_fraction=0.25)
    assert bytes(corpus.train.tolist()) + bytes(corpus.val.tolist()) == raw
    assert corpus.val.numel() == len(raw) // 4
    idx, targets = corpus.train_batch(3, 10, seed=1, step=5)
    assert idx.shape == targets.shape == (3, 10) and idx.dtype == torch.long
    assert torch.equal(idx[:, 1:], targets[:, :-1])  # targets are the next bytes
    again, _ = corpus.train_batch(3, 10, seed=1, step=5)
    other, _ = corpus.train_batch(3, 10, seed=1, step=6)
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    val = corpus.val_batches(2, 10, num_batches=3)
    assert len(val) == 3 and all(v[0].shape == (2, 10) for v in val)


def test_bad_data_file_errors(tmp_path: Path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 50)
    cases = [
        (tmp_path / "missing.txt", "missing path"),
        (tmp_path, "directory"),
        (empty, "empty file"),
        (small, "at least"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            load_corpus(path, min_split_tokens=17)
    for path, message in cases:
        with pytest.raises(SystemExit, match=f"error: --data.*{message}"):
            main(["train", "--model", "dense", "--out", str(tmp_path / "o"), "--data", str(path)])
