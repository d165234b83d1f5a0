"""Byte-level text corpus for the demo and the trainer: no downloads, a fixed held-out split.

The default corpus is the running interpreter's own standard library (its ``.py`` files under
``sysconfig.get_paths()["stdlib"]``, without ``site-packages``), present on every machine.
Files are taken in a fixed pseudo-random order (sorted by a hash of their relative path, so the
sample spans the whole library rather than the first letters of the alphabet) until a size cap
is reached; the last ``val_fraction`` of the bytes is the held-out split. ``--data FILE`` uses
the user's own file the same way.

Tokens are bytes (vocabulary 256): no tokenizer to train or download.

Shape legend: B batch, T sequence length.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..files import readable_file

__all__ = ["Corpus", "load_corpus", "stdlib_files"]

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 4_000_000
_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split once into training and held-out parts.

    Attributes:
        train: ``[N_train]`` uint8 tokens.
        val: ``[N_val]`` uint8 tokens (the corpus's last ``val_fraction``).
        source: where the bytes came from, for reports.
        num_files: how many files were read.
    """

    train: Tensor
    val: Tensor
    source: str
    num_files: int

    def train_batch(
        self, batch_size: int, seq_len: int, seed: int, step: int
    ) -> tuple[Tensor, Tensor]:
        """Random training windows for ``step``: ``(idx, targets)``, each ``[B, T]`` int64.

        The windows depend only on ``(seed, step)``, so a run resumed from a checkpoint sees
        exactly the batches an uninterrupted run would.
        """
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts_B = torch.randint(
            0, self.train.numel() - seq_len, (batch_size,), generator=generator
        )
        return _windows(self.train, starts_B, seq_len)

    def val_batches(
        self, batch_size: int, seq_len: int, num_batches: int
    ) -> list[tuple[Tensor, Tensor]]:
        """Fixed held-out windows, evenly spaced over the held-out split (same for every model)."""
        count = batch_size * num_batches
        last_start = self.val.numel() - seq_len - 1
        starts = torch.linspace(0, last_start, count).long()
        return [
            _windows(self.val, starts[i * batch_size : (i + 1) * batch_size], seq_len)
            for i in range(num_batches)
        ]


def _windows(tokens: Tensor, starts_B: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    offsets_T = torch.arange(seq_len + 1)
    chunk_BT1 = tokens[starts_B[:, None] + offsets_T].long()
    return chunk_BT1[:, :-1], chunk_BT1[:, 1:]


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library ``.py`` files, in a fixed pseudo-random order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        # prune in place: site-packages can be far larger than the library itself
        subfolders[:] = [name for name in subfolders if name not in skip]
        files += [Path(folder, name) for name in names if name.endswith(".py")]

    def key(path: Path) -> str:
        return hashlib.sha1(path.relative_to(root).as_posix().encode()).hexdigest()

    return sorted(files, key=key)


def load_corpus(
    data: str | Path | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    val_fraction: float = 0.1,
    min_split_tokens: int = 0,
) -> Corpus:
    """Load the standard-library corpus (``data=None``) or the user's text file ``data``.

    Args:
        data: path of a text file, or None for the standard library.
        max_bytes: read at most this many bytes (the stdlib corpus stops adding files there; a
            user file is truncated there, and the truncation is reported in ``source``).
        val_fraction: share of the bytes held out for evaluation, in (0, 1).
        min_split_tokens: each split must hold at least this many bytes (e.g. ``seq_len + 1``
            so one window fits).

    Raises:
        ValueError: ``data`` does not exist, is a directory (or another non-file), is empty or
            unreadable (:func:`pytorch_mixtures.files.readable_file`), or is too small to give
            both splits ``min_split_tokens`` bytes; or a bad ``max_bytes`` / ``val_fraction``.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 2:
        raise ValueError(f"max_bytes: expected an integer >= 2, got {max_bytes!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction!r}")
    if data is None:
        chunks, total, files = [], 0, stdlib_files()
        read = 0
        for path in files:
            if total >= max_bytes:
                break
            text = path.read_bytes()
            chunks.append(text + _SEPARATOR)
            total += len(text) + len(_SEPARATOR)
            read += 1
        raw = b"".join(chunks)[:max_bytes]
        source = f"Python standard library ({read} of {len(files)} .py files, {len(raw):,} bytes)"
        num_files = read
    else:
        path = Path(data)
        if not path.exists():  # the one case readable_file words differently
            raise ValueError(f"data: expected an existing text file, got missing path '{path}'")
        path = readable_file(path, "data")  # not a directory, not empty, readable
        with path.open("rb") as handle:
            raw = handle.read(max_bytes)
        size = path.stat().st_size
        cut = "" if size <= max_bytes else f", first {len(raw):,} of {size:,} bytes"
        source = f"{path} ({len(raw):,} bytes{cut})"
        num_files = 1
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    num_val = int(len(raw) * val_fraction)
    train, val = tokens[: len(raw) - num_val], tokens[len(raw) - num_val :]
    if min(train.numel(), val.numel()) < max(min_split_tokens, 1):
        need = int(max(min_split_tokens, 1) / min(val_fraction, 1 - val_fraction)) + 1
        raise ValueError(
            f"data: expected at least {need:,} bytes so both the training and the held-out split "
            f"({val_fraction:.0%}) hold {min_split_tokens} bytes, got {len(raw):,} bytes "
            f"from {source}"
        )
    return Corpus(train=train, val=val, source=source, num_files=num_files)
