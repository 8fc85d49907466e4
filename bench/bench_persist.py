"""Benchmark the persister's database layer: rows/s per write method and batch size.

    python bench/bench_persist.py [--pg DSN] [--batches 1000,10000] [--rows 50000]
                                  [--runs 3]

Each "change" is one task row plus its one attempt row (~100-byte payload, a short
log), written as in production: `Store.write` of a `Batch`, one transaction per
batch, into a fresh PostgreSQL schema (dropped afterwards) and a fresh SQLite file.
Half of the rows are updates of tasks already written, as a task's later state
changes would be. Also timed: `task_row` + `attempt_rows` on the loop thread, in µs
per change. Figures are medians of --runs runs; nothing is asserted. The target: the
persister must sustain 50,000 task state changes/s into PostgreSQL.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

# The checkout this script is in, not whatever `pip install -e` points at: a side-by-side
# run from another worktree must measure that worktree's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dtask import protocol as p  # noqa: E402
from dtask.broker.state import Attempt, Task  # noqa: E402
from dtask.persist.rows import Batch, attempt_rows, task_row  # noqa: E402
from dtask.persist.store import COPY, UPSERT, open_store  # noqa: E402

T0 = 1_700_000_000_000_000
TARGET = 50_000


def make_tasks(n: int) -> list[Task]:
    policy = p.RetryPolicy()
    tasks = []
    for i in range(n):
        t = Task(f"{uuid.UUID(int=i)}", "report", "shell",
                 b'{"cmd": "generate-report --customer %08d --month 2024-05", "x": 1}' % i
                 + b" " * 30, p.JSON, i % 10, "default", ("linux",), 60.0, policy, "",
                 T0 + i, i + 1, p.RUNNING, T0 + i)
        t.attempts = [Attempt(1, "worker-7", T0 + i, T0 + i + 60_000_000, 0, "", None, "",
                              b"", b"started\n")]
        tasks.append(t)
    return tasks


def batches(tasks: list[Task], size: int, first_index: int) -> list[Batch]:
    out, index = [], first_index
    for start in range(0, len(tasks), size):
        b = Batch(last_index=index)
        for t in tasks[start:start + size]:
            b.tasks.append(task_row(t, index))
            b.attempts.extend(attempt_rows(t, index))
        out.append(b)
        index += 1
    return out


def time_rows(tasks: list[Task], runs: int) -> float:
    """µs per change for task_row + attempt_rows (the loop thread's share)."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        for i, t in enumerate(tasks):
            task_row(t, i)
            attempt_rows(t, i)
        samples.append((time.perf_counter() - started) / len(tasks) * 1e6)
    return statistics.median(samples)


def run_once(dsn: str, method: str, tasks: list[Task], size: int) -> float:
    """Changes/s: every task inserted, then every task updated (its attempt finished)."""
    store = open_store(dsn, method=method)
    inserts = batches(tasks, size, 1)
    for t in tasks:
        t.status, t.finished_us = p.COMPLETED, T0 + 1
        t.attempts[0].outcome, t.attempts[0].finished_us = p.SUCCEEDED, T0 + 1
    updates = batches(tasks, size, len(inserts) + 1)
    for t in tasks:  # back to RUNNING for the next run
        t.status, t.finished_us = p.RUNNING, 0
        t.attempts[0].outcome, t.attempts[0].finished_us = "", 0
    started = time.perf_counter()
    for b in inserts + updates:
        store.write(b)
    elapsed = time.perf_counter() - started
    store.close()
    return 2 * len(tasks) / elapsed


def pg_fresh(base: str) -> tuple[str, str]:
    name = "bench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in base else "?"
    return name, f"{base}{sep}options=-csearch_path%3D{name}"


def pg_drop(base: str, name: str) -> None:
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg", default=os.environ.get(
        "DTASK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--batches", default="1000,10000")
    ap.add_argument("--rows", type=int, default=50_000, help="tasks per run")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.batches.split(",")]
    tasks = make_tasks(args.rows)

    print(f"task_row + attempt_rows: {time_rows(tasks, args.runs):.2f} µs per change "
          f"(loop thread; median of {args.runs})")
    print(f"{args.rows} tasks x (insert + update), 1 attempt each; median of {args.runs} "
          f"runs; a change = 1 task row + 1 attempt row")
    print(f"{'database':<10} {'method':<7} {'batch':>6} {'changes/s':>10} {'vs target':>9}")
    for db, method in [("postgres", COPY), ("postgres", UPSERT), ("sqlite", UPSERT)]:
        for size in sizes:
            samples = []
            for _ in range(args.runs):
                if db == "postgres":
                    name, dsn = pg_fresh(args.pg)
                    try:
                        samples.append(run_once(dsn, method, tasks, size))
                    finally:
                        pg_drop(args.pg, name)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        samples.append(run_once(f"{tmp}/h.db", method, tasks, size))
            rate = statistics.median(samples)
            label = "executemany" if db == "sqlite" else method
            print(f"{db:<10} {label:<7} {size:>6} {rate:>10,.0f} {rate / TARGET:>8.2f}x")


if __name__ == "__main__":
    main()
