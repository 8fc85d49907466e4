"""Dispatch latency of a peer at a steady rate: submit call -> the task's first line.

Each peer's `stamp(path, i)` task appends "i time.time()" to a file as its first act
(one worker process; the clock is this machine's). The client sleeps between
submissions (never spins: it shares the cores with the worker and the broker) and
records time.time() just before each submit call; the delay is stamp - that time, so it
includes the enqueue round trip, as DTask's figure includes its quorum fsync.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

from bench.suite import procs
from bench.suite.mark import wait_mark


def record(path: str, i: int) -> None:
    """The task side: the first thing a `stamp` task does."""
    now = time.time()
    with open(path, "a") as f:
        f.write(f"{i} {now!r}\n")


def paced(rate: float, count: int, submit: Callable[[int], object]) -> list[float]:
    """Call submit(i) for i < count at `rate`/s; return the time before each call."""
    sent = []
    interval = 1.0 / rate
    nxt = time.perf_counter()
    for i in range(count):
        time.sleep(max(0.0, nxt - time.perf_counter()))
        nxt += interval
        sent.append(time.time())
        submit(i)
    return sent


def _stamps(path: str, count: int, timeout: float) -> dict[int, float]:
    deadline = time.monotonic() + timeout
    while True:
        with open(path) as f:
            lines = [ln.split() for ln in f.read().splitlines()]
        got = {int(i): float(t) for i, t in (ln for ln in lines if len(ln) == 2)}
        if len(got) >= count:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(got)} of {count} latency tasks started")
        time.sleep(0.01)


def delays(argv: list[str], submit_stamp: Callable[[str, int], object],
           enqueue_mark: Callable[[str], None], rate: float, count: int, runs: int,
           env: dict[str, str] | None = None) -> list[list[float]]:
    """Start the worker once, warm it up with a sentinel, then `runs` paced runs."""
    root = tempfile.mkdtemp(prefix="dtask-bench-latency-")
    mark = os.path.join(root, "done")
    out = []
    with procs.running(argv, **(env or {})) as worker:
        try:
            enqueue_mark(mark)
            wait_mark(mark, timeout=60)
            for run in range(runs):
                path = os.path.join(root, f"stamps{run}")
                open(path, "w").close()
                sent = paced(rate, count, lambda i, p=path: submit_stamp(p, i))
                got = _stamps(path, count, timeout=60 + count / 50)
                out.append([got[i] - sent[i] for i in range(count)])
                os.remove(path)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}; worker output:\n{procs.output(worker)}") from exc
    os.rmdir(root)
    return out
