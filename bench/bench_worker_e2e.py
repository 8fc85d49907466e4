#!/usr/bin/env python3
"""End to end through a real local cluster: submit -> COMPLETED for no-op tasks.

    .venv/bin/python bench/bench_worker_e2e.py [--tasks N]

Three scheduler processes (dtask.broker.localcluster), 1 or 2 worker processes, the
real client. Throughput = tasks / (last task finished - first submit), with the
submits pipelined in batches of 500 so the workers never run dry. Compare: Celery 5.7
+ Redis drains about 930 no-op tasks/s here with 2 prefork processes; Huey about 3,100
(DESIGN.md / issue 4). Worker processes below means Python pool processes in total.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dtask import protocol as p  # noqa: E402
from dtask.broker.localcluster import SchedulerCluster  # noqa: E402
from dtask.client import Client  # noqa: E402

BATCH = 500


def run(kind: str, payload: dict, n: int, workers: int, per_worker: int,
        prefetch: int | None = None, *, warm: int = 20,
        timed: Callable[[SchedulerCluster], AbstractContextManager] | None = None) -> float:
    """Tasks/s from the first submit to the last finish. `timed(cluster)`, if given, is
    entered just before the first submit and left once the last task has finished (how
    bench_e2e_cpu.py reads /proc around exactly the measured part)."""
    root = tempfile.mkdtemp(prefix="dtask-bench-")
    cluster = SchedulerCluster(root, size=3, worker_timeout=5.0)
    try:
        cluster.start_all()
        cluster.wait_leader()
        for i in range(workers):
            extra = () if prefetch is None else ("--prefetch", str(prefetch))
            cluster.start_worker(f"bench-w{i + 1}", per_worker, "--log-level", "warning", *extra)
        with Client(cluster.endpoints, timeout=60) as client:
            for tid in client.submit_many([{"type": kind, "payload": payload}] * warm):
                client.wait(tid, timeout=60)
            with timed(cluster) if timed else contextlib.nullcontext():
                start_us = time.time_ns() // 1000
                ids: list[str] = []
                for i in range(0, n, BATCH):
                    ids += client.submit_many([{"type": kind, "payload": payload}]
                                              * min(BATCH, n - i))
                # Wait for the last task first (FIFO within a priority: it finishes last
                # or nearly so), and check the others only then: a wait per task while
                # they run would add a request per task to the leader's load, which the
                # peers' harnesses (one sentinel task) do not carry. The end time is
                # exact either way: the latest finish of them all.
                client.wait(ids[-1], timeout=300)
            for tid in ids:
                task = client.wait(tid, timeout=300)
                assert task["status"] == p.COMPLETED, task
            tasks = client.list(limit=None)
            wanted = set(ids)
            end_us = max(t["finished_us"] for t in tasks if t["id"] in wanted)
        return n / ((end_us - start_us) / 1e6)
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--prefetch", default="default",
                    help="comma-separated worker --prefetch values to compare, side by "
                    "side; 'default' leaves the worker's default")
    args = ap.parse_args()
    print(f"end to end, submit -> COMPLETED, {args.tasks} tasks each (tasks/s)")
    print(f"{'setup':<34} {'prefetch':>9} {'python no-op':>13} {'shell true':>11}")
    for workers, per in ((1, 1), (1, 2), (2, 1)):
        for value in args.prefetch.split(","):
            prefetch = None if value == "default" else int(value)
            py = run("python", {"fn": "builtins:int"}, args.tasks, workers, per, prefetch)
            sh = run("shell", {"argv": ["/bin/true"]}, max(500, args.tasks // 5), workers, per,
                     prefetch)
            label = f"{workers} worker(s) x concurrency {per}"
            print(f"{label:<34} {value:>9} {py:>13.0f} {sh:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
