#!/usr/bin/env python3
"""Worker overhead and throughput against an in-process fake scheduler.

    .venv/bin/python bench/bench_worker.py [--tasks N] [--seconds S]

What it measures (one worker subprocess, real sockets, the fake scheduler driven from
this process's own loop — no helper threads in the timings):

- baseline round trip: send a `run` the worker rejects at once (unknown executor) and
  receive its `result`: transport + the worker's message handling, no executor.
- python overhead: `run` sent -> the task function starts, as the function's own
  time.time() minus the send time (one-way transport included; compare with half the
  baseline round trip).
- shell overhead: `run` sent -> `date +%s%N` reads the clock (fork + exec included).
- throughput: no-op tasks with the scheduler keeping every slot busy (a new task for
  each result, as credits come back), concurrency 1 and 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import msgpack

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dtask import protocol as p  # noqa: E402
from dtask.worker.testing import FakeScheduler, WorkerProcess, task  # noqa: E402

NOOP_PY = {"fn": "builtins:int"}  # returns 0: as close to a no-op as a call gets
NOOP_SHELL = {"argv": ["/bin/true"]}


class Bench:
    def __init__(self, concurrency: int) -> None:
        self.fake = FakeScheduler()
        self.worker = WorkerProcess([self.fake.endpoint], "--concurrency", str(concurrency),
                                    "--log-level", "warning")
        self.concurrency = concurrency
        self.n = 0
        self._wait(lambda: self.fake.messages(p.HEARTBEAT), 10)

    def _wait(self, pred, timeout: float):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not (value := pred()):
            if time.monotonic() > deadline:
                raise SystemExit("worker did not answer:\n" + self.worker.output())
            self.fake.step(0.01)
        return value

    def one(self, kind: str, payload: dict) -> tuple[float, dict]:
        """Send one task, wait for its result; (wall time sent, result)."""
        self.n += 1
        tid = f"b{self.n}"
        frame = p.pack({"v": 1, "t": p.RUN, "tasks": [task(tid, kind, payload)]})
        sent = time.time()
        self.fake.send_now(frame)
        while True:
            self.fake.step(1.0)
            res = self.fake.result(tid)
            if res is not None:
                return sent, res

    def throughput(self, kind: str, payload: dict, seconds: float) -> float:
        fake, done, inflight = self.fake, 0, 0
        seen = len(fake.received)

        def send(k: int) -> None:
            nonlocal inflight
            tasks = []
            for _ in range(k):
                self.n += 1
                tasks.append(task(f"b{self.n}", kind, payload))
            fake.send_now({"v": 1, "t": p.RUN, "tasks": tasks})
            inflight += k

        send(self.concurrency)
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            fake.step(1.0)
            new = fake.received[seen:]
            seen += len(new)
            finished = sum(1 for _, m in new if m["t"] == p.RESULT)
            if finished:
                done += finished
                inflight -= finished
                send(finished)
        elapsed = time.perf_counter() - start
        while inflight:  # let the last ones finish before the next measurement
            fake.step(1.0)
            new = fake.received[seen:]
            seen += len(new)
            inflight -= sum(1 for _, m in new if m["t"] == p.RESULT)
        fake.received.clear()
        return done / elapsed

    def close(self) -> None:
        self.worker.close()
        self.fake.close()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def row(name: str, us: list[float]) -> str:
    return (f"{name:<44} {statistics.median(us):>8.0f} {pct(us, 0.9):>8.0f} "
            f"{pct(us, 0.99):>8.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=2000, help="sequential tasks per latency row")
    ap.add_argument("--seconds", type=float, default=1.0, help="per throughput run")
    ap.add_argument("--runs", type=int, default=5, help="throughput runs per cell (median)")
    args = ap.parse_args()

    b = Bench(concurrency=1)
    try:
        for _ in range(200):  # warm up: imports in the pool child, caches, TCP
            b.one("python", NOOP_PY)
        base, py, sh = [], [], []
        for _ in range(args.tasks):
            sent, res = b.one("nosuch", {})
            base.append((time.time() - sent) * 1e6)
            sent, res = b.one("python", {"fn": "time:time"})
            py.append((msgpack.unpackb(res["result"]) - sent) * 1e6)
        for _ in range(max(100, args.tasks // 4)):
            sent, res = b.one("shell", {"argv": ["date", "+%s%N"]})
            sh.append((int(res["log"]) / 1e9 - sent) * 1e6)
        print(f"worker overhead, {args.tasks} sequential tasks (µs)")
        print(f"{'':<44} {'p50':>8} {'p90':>8} {'p99':>8}")
        print(row("baseline: run -> result round trip, no exec", base))
        print(row("python: run sent -> function starts", py))
        print(row("shell: run sent -> `date` reads the clock", sh))
        half = statistics.median(base) / 2
        print(f"python overhead beyond one-way transport (p50 - baseline/2): "
              f"{statistics.median(py) - half:.0f} µs")
    finally:
        b.close()

    print(f"\nthroughput, no-op tasks, median of {args.runs} runs of {args.seconds:g} s "
          "(tasks/s)")
    print(f"{'concurrency':<12} {'baseline':>10} {'python':>10} {'shell true':>11} "
          f"{'python/baseline':>16}")
    for conc in (1, 2):
        b = Bench(concurrency=conc)
        try:
            b.throughput("python", NOOP_PY, 0.5)  # warm up
            cells: dict[str, list[float]] = {"base": [], "py": [], "sh": []}
            for _ in range(args.runs):  # interleaved, so load changes hit every column
                cells["base"].append(b.throughput("nosuch", {}, args.seconds))
                cells["py"].append(b.throughput("python", NOOP_PY, args.seconds))
                cells["sh"].append(b.throughput("shell", NOOP_SHELL, args.seconds))
            base_tp, py_tp, sh_tp = (statistics.median(v) for v in cells.values())
        finally:
            b.close()
        print(f"{conc:<12} {base_tp:>10.0f} {py_tp:>10.0f} {sh_tp:>11.0f} "
              f"{py_tp / base_tp:>16.2f}")


if __name__ == "__main__":
    main()
