"""The write-behind persister's lag under a steady load, on a local 3-node cluster
(fsync on) writing into the local PostgreSQL (or SQLite).

    python bench/bench_persist_lag.py                        # 5,000 tasks/s for 30 s
    python bench/bench_persist_lag.py --rate 2000 --seconds 10 --db sqlite

An open-loop client submits `--rate` tasks a second (batches of 50 every 10 ms) with no
workers, so every task is one row to write. Every 100 ms the leader's `persist` figures
are sampled: `lag_s` (age of the oldest change not yet in the database) and
`pending_rows`. Reported: lag p50/p99/max while loaded, rows written per second, and
the time to drain once the load stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import psycopg

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)

from dtask.broker.localcluster import SchedulerCluster  # noqa: E402
from dtask.client import Client  # noqa: E402

PG = os.environ.get("DTASK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


def run(rate: float = 5000, seconds: float = 30, db: str = "postgresql") -> dict:
    """Run once; return the figures (lag in s, rows, rates, drain time)."""
    args = argparse.Namespace(rate=rate, seconds=seconds, db=db)
    root = tempfile.mkdtemp(prefix="bench-persist-")
    schema = "bench_" + uuid.uuid4().hex[:8]
    if args.db == "postgresql":
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        dsn = f"{PG}?options=-csearch_path%3D{schema}"
    else:
        dsn = os.path.join(root, "history.sqlite3")
    cluster = SchedulerCluster(root, extra_args=["--db", dsn])
    cluster.start_all()
    try:
        leader = cluster.wait_leader()
        stop = threading.Event()
        submitted = [0]

        def feed() -> None:
            batch = [{"type": "noop", "payload": {"n": i}, "queue": "bench-idle"}
                     for i in range(50)]
            with Client(cluster.endpoints, timeout=30) as client:
                next_at = time.monotonic()
                while not stop.is_set():
                    client.submit_many(batch)
                    submitted[0] += len(batch)
                    next_at += len(batch) / args.rate
                    time.sleep(max(0.0, next_at - time.monotonic()))

        feeder = threading.Thread(target=feed)
        time.sleep(1)
        before = cluster.node_info(leader)["persist"]
        feeder.start()
        t0 = time.monotonic()
        lags, pending = [], []
        while time.monotonic() - t0 < args.seconds:
            persist = (cluster.node_info(leader) or {}).get("persist", {})
            lags.append(persist.get("lag_s", 0.0))
            pending.append(persist.get("pending_rows", 0))
            time.sleep(0.1)
        stop.set()
        feeder.join()
        loaded = time.monotonic() - t0
        stopped = time.monotonic()
        while (cluster.node_info(leader) or {}).get("persist", {}).get("pending_rows"):
            time.sleep(0.05)
        drain = time.monotonic() - stopped
        after = cluster.node_info(leader)["persist"]
        rows = after["rows"] - before["rows"]
        return {"submitted_per_s": submitted[0] / loaded, "loaded_s": loaded, "rows": rows,
                "rows_per_s": rows / (loaded + drain), "lag_p50": pct(lags, 0.5),
                "lag_p99": pct(lags, 0.99), "lag_max": max(lags),
                "pending_p99": pct(pending, 0.99), "drain_s": drain,
                "batches": after["batches"] - before["batches"],
                "last_batch_s": after["last_batch_s"]}
    finally:
        cluster.stop_all()
        if args.db == "postgresql":
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    args = ap.parse_args()
    r = run(args.rate, args.seconds, args.db)
    print(f"bench_persist_lag: {os.cpu_count()} CPUs, {args.db}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"  offered {args.rate}/s, submitted {r['submitted_per_s']:.0f}/s for "
          f"{r['loaded_s']:.0f} s; rows written {r['rows']} ({r['rows_per_s']:.0f}/s)")
    print(f"  lag s: p50 {r['lag_p50']:.3f}  p99 {r['lag_p99']:.3f}  "
          f"max {r['lag_max']:.3f};  pending rows p99 {r['pending_p99']}")
    print(f"  drained {r['drain_s']:.2f} s after the load stopped; batches "
          f"{r['batches']}, last batch {r['last_batch_s']:.4f} s")


if __name__ == "__main__":
    main()
