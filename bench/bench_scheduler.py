"""The scheduler on a local 3-node cluster (fsync on): submit throughput and
submit-to-start latency.

    python bench/bench_scheduler.py                  # full run
    python bench/bench_scheduler.py --seconds 2 --latency-tasks 300

Every submission is acknowledged only after the quorum's fsync. Latency is measured
from just before `submit()` is called to the first line of a Python task running in
a worker's warm pool (the task returns time.time()).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import wait

import msgpack

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)

from dtask.broker.localcluster import SchedulerCluster  # noqa: E402
from dtask.client import Client  # noqa: E402

NOOP = {"cmd": "true"}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


def sync_one_by_one(endpoints: list[str], seconds: float) -> tuple[float, list[float]]:
    lat = []
    with Client(endpoints, timeout=30) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            c.submit("shell", NOOP, queue="bench-idle")
            lat.append(time.perf_counter() - t)
    return len(lat) / seconds, lat


def async_in_flight(endpoints: list[str], seconds: float, window: int) -> float:
    with Client(endpoints, timeout=30, max_in_flight=window) as c:
        n = 0
        t0 = time.perf_counter()
        end = time.monotonic() + seconds
        futures = []
        while time.monotonic() < end:
            futures.append(c.submit_async("shell", NOOP, queue="bench-idle"))
            n += 1
            if len(futures) >= 4096:
                wait(futures)
                futures = []
        wait(futures)
        return n / (time.perf_counter() - t0)


def _client_proc(endpoints: list[str], seconds: float, out: mp.Queue) -> None:
    rate, _ = sync_one_by_one(endpoints, seconds)
    out.put(rate)


def many_clients(endpoints: list[str], seconds: float, n: int) -> float:
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_client_proc, args=(endpoints, seconds, out)) for _ in range(n)]
    for proc in procs:
        proc.start()
    rates = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sum(rates)


def submit_many(endpoints: list[str], seconds: float, batch: int) -> float:
    with Client(endpoints, timeout=30) as c:
        n = 0
        t0 = time.perf_counter()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            c.submit_many([{"type": "shell", "payload": NOOP, "queue": "bench-idle"}] * batch)
            n += batch
        return n / (time.perf_counter() - t0)


def latency(endpoints: list[str], rate: float, count: int) -> list[float]:
    """Submit at a steady rate; return submit -> first-line-ran delays in seconds."""
    sent: dict[str, float] = {}
    with Client(endpoints, timeout=30) as c:
        interval = 1.0 / rate
        nxt = time.perf_counter()
        futures = []
        for _ in range(count):
            # Sleep, don't spin: a spinning client would steal one of the two cores.
            time.sleep(max(0.0, nxt - time.perf_counter()))
            nxt += interval
            t = time.time()
            fut = c.submit_async("python", {"fn": "bench_tasks:stamp"})
            futures.append((fut, t))
        for fut, t in futures:
            sent[fut.result()] = t
        out = []
        for task_id, t in sent.items():
            task = c.wait(task_id, timeout=60)
            last = task["attempts"][-1]
            if task["status"] != "COMPLETED" or not last["result"]:
                raise RuntimeError(f"latency task did not complete: {task}")
            out.append(msgpack.unpackb(last["result"]) - t)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--latency-tasks", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="dtask-bench-sched-")
    os.environ["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + \
        os.environ.get("PYTHONPATH", "")
    cluster = SchedulerCluster(root, size=3)
    cluster.start_all()
    try:
        cluster.wait_leader()
        for i in range(args.workers):
            cluster.start_worker(f"bench-w{i}", 2, "--import", "bench_tasks")
        eps = cluster.endpoints
        with Client(eps, timeout=30) as c:  # warm up: leader found, workers registered
            c.wait(c.submit("python", {"fn": "bench_tasks:stamp"}), timeout=30)
        rows = []
        rate, lat = sync_one_by_one(eps, args.seconds)
        rows.append(("submit, one by one, 1 sync client", f"{rate:,.0f} tasks/s"))
        rows.append(("  latency p50 / p99", f"{statistics.median(lat) * 1e3:.2f} / "
                     f"{pct(lat, 0.99) * 1e3:.2f} ms"))
        rows.append(("submit_async, 64 in flight, 1 client",
                     f"{async_in_flight(eps, args.seconds, 64):,.0f} tasks/s"))
        rows.append(("submit, one by one, 8 client processes",
                     f"{many_clients(eps, args.seconds, 8):,.0f} tasks/s"))
        rows.append(("submit_many, 1000 per call",
                     f"{submit_many(eps, args.seconds, 1000):,.0f} tasks/s"))
        for r in (100, 1000):
            lat = latency(eps, r, min(args.latency_tasks, int(r * 5)))
            rows.append((f"submit -> start at {r}/s: p50 / p99",
                         f"{statistics.median(lat) * 1e3:.2f} / {pct(lat, 0.99) * 1e3:.2f} ms"))
    finally:
        cluster.stop_all()
    print(f"3 schedulers (fsync on), {args.workers} workers x 2 slots, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    for name, fig in rows:
        print(f"{name:<44}{fig:>26}")


if __name__ == "__main__":
    main()
