"""A pool of W spawned gloo ranks that run test functions, each under a hard timeout.

Starting processes and importing torch costs seconds per rank on a small machine, so a pool
is started once per world size (see the fixtures in test_distributed.py) and each test sends
it one task: ``fn(rank, world_size, *args)`` on every rank. Workers do their own assertions
and report only ``None`` or a traceback string, so no tensors cross process boundaries.

On a failure or a timeout the whole pool is killed (peers may be stuck in a collective, or the
collectives out of step) and the next task starts a fresh one: a hang fails its test instead
of stalling CI, and no process outlives the test session.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300)
        )
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        return
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args = task
            try:
                fn(rank, world_size, *args)
                dist.barrier()
                results.put((rank, None))
            except BaseException:
                results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class RankPool:
    """``world_size`` processes in one gloo process group, run lazily and killed on failure."""

    def __init__(self, world_size: int, start_timeout_s: float = 120.0) -> None:
        self.world_size = world_size
        self.start_timeout_s = start_timeout_s
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, self.world_size, port, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._collect("start-up", self.start_timeout_s)

    def _collect(self, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        errors: list[str] = []
        done = 0
        try:
            while done < self.world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{what} timed out after {timeout_s}s on {self.world_size} ranks "
                        f"({done} finished); errors so far: {errors}"
                    )
                try:
                    rank, error = self._results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    codes = [p.exitcode for p in self._procs]
                    if any(code is not None for code in codes):
                        raise AssertionError(f"{what}: a rank died (exit codes {codes})") from None
                    continue
                done += 1
                if error is not None:
                    errors.append(f"rank {rank}:\n{error}")
                    break  # its peers may now wait forever in a collective
            if errors:
                raise AssertionError(f"{what} failed:\n" + "\n".join(errors))
        except BaseException:
            self.close()
            raise

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0) -> None:
        """Run ``fn(rank, world_size, *args)`` on every rank; raise on any failure or timeout."""
        if not self._procs:
            self._start()
        for tasks in self._tasks:
            tasks.put((fn, args))
        self._collect(f"{getattr(fn, '__name__', fn)}{args}", timeout_s)

    def close(self) -> None:
        """Stop the workers (politely if idle, else kill them) and forget them."""
        for tasks in self._tasks:
            with contextlib.suppress(OSError, ValueError):
                tasks.put(None)
        deadline = time.monotonic() + 3.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs, self._tasks = [], []
