"""End-to-end throughput of a peer: N no-op tasks, submit -> all completed, 1 worker.

The worker subprocess is started once per configuration, warmed up with a sentinel,
then each run enqueues N no-op tasks followed by a sentinel (see `mark`) and times
from the first enqueue to the moment the sentinel ran.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

from bench.suite import procs
from bench.suite.mark import wait_mark


def drain_rates(argv: list[str], enqueue_noops: Callable[[int], None],
                enqueue_mark: Callable[[str], None], n: int, runs: int,
                env: dict[str, str] | None = None) -> list[float]:
    path = os.path.join(tempfile.mkdtemp(prefix="dtask-bench-mark-"), "done")
    rates = []
    with procs.running(argv, **(env or {})) as worker:
        try:
            enqueue_mark(path)
            wait_mark(path, timeout=60)
            for _ in range(runs):
                t0 = time.time()
                enqueue_noops(n)
                enqueue_mark(path)
                rates.append(n / (wait_mark(path, timeout=60 + n / 50) - t0))
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}; worker output:\n{procs.output(worker)}") from exc
    os.rmdir(os.path.dirname(path))
    return rates


def timed_rate(seconds: float, step: Callable[[], int]) -> float:
    """Call `step` (which submits some tasks and returns how many) for `seconds`."""
    n = 0
    t0 = time.perf_counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        n += step()
    return n / (time.perf_counter() - t0)
