"""A scheduler holding many pending tasks: memory per task and submit rate at scale.

    python bench/bench_scale.py --tasks 1000000

Submits N small shell tasks (to a queue no worker serves, so they all stay PENDING)
through `submit_many` on a 3-scheduler cluster, then reads each scheduler's resident
memory from /proc. The leader's figure includes its ready queue; followers hold the
same replicated state without it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dtask.broker.localcluster import SchedulerCluster  # noqa: E402
from dtask.client import Client  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _avg(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run(tasks: int = 1_000_000, batch: int = 5000, dispatch: int = 0,
        slots: int = 4) -> dict:
    """Submit `tasks` shell tasks to a queue nobody serves; return the figures.

    With `dispatch` > 0, then start one worker process with `slots` slots on the queue
    `bench-dispatch` and time `dispatch` no-op Python tasks (`builtins:int`) submitted
    there, from the first submit call to the last one completed, while the others wait."""
    root = tempfile.mkdtemp(prefix="dtask-bench-scale-")
    cluster = SchedulerCluster(root, size=3, worker_timeout=5.0)
    cluster.start_all()
    try:
        leader = cluster.wait_leader()
        base = {i: rss_mib(m.proc.pid) for i, m in cluster.members.items()}
        spec = {"type": "shell", "payload": {"cmd": "true"}, "queue": "nobody"}
        out: dict = {"tasks": tasks, "leader": leader}
        with Client(cluster.endpoints, timeout=120) as c:
            t0 = time.perf_counter()
            rates = []
            for done in range(0, tasks, batch):
                n = min(batch, tasks - done)
                t = time.perf_counter()
                c.submit_many([spec] * n)
                rates.append(n / (time.perf_counter() - t))
            elapsed = time.perf_counter() - t0
            info = c.cluster()
            tenth = max(1, len(rates) // 10)
            out.update(overall=tasks / elapsed, first10=_avg(rates[:tenth]),
                       last10=_avg(rates[-tenth:]))
            time.sleep(2)  # let followers apply the tail
            out["rss"] = {}
            for i, m in cluster.members.items():
                rss = rss_mib(m.proc.pid)
                out["rss"][i] = (rss, base[i], (rss - base[i]) * 1024 * 1024 / tasks)
            out["pending"] = info.get("node", {}).get("tasks", {}).get("PENDING")
            if dispatch:
                out["dispatch"] = _dispatch(cluster, c, dispatch, slots)
                out["dispatch_n"], out["dispatch_slots"] = dispatch, slots
        return out
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def _dispatch(cluster: SchedulerCluster, c: Client, n: int, slots: int) -> float:
    cluster.start_worker("bench-scale-w", slots, "--queue", "bench-dispatch",
                         "--log-level", "warning")
    spec = {"type": "python", "payload": {"fn": "builtins:int"}, "queue": "bench-dispatch"}
    for tid in c.submit_many([spec] * 20):  # warm: worker registered, pool up
        c.wait(tid, timeout=120)
    t0 = time.perf_counter()
    ids: list[str] = []
    for i in range(0, n, 500):
        ids += c.submit_many([spec] * min(500, n - i))
    for tid in ids:
        task = c.wait(tid, timeout=600)
        assert task["status"] == "COMPLETED", task
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--dispatch", type=int, default=0,
                    help="then time this many no-op tasks on a worker with --slots slots")
    ap.add_argument("--slots", type=int, default=4)
    args = ap.parse_args()
    r = run(args.tasks, args.batch, args.dispatch, args.slots)
    print(f"{args.tasks:,} pending tasks on 3 schedulers, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"submit_many overall: {r['overall']:,.0f} tasks/s; first 10% of batches "
          f"{r['first10']:,.0f}/s, last 10% {r['last10']:,.0f}/s")
    for i, (rss, base, per) in r["rss"].items():
        role = "leader" if i == r["leader"] else "follower"
        print(f"scheduler {i} ({role}): RSS {rss:,.0f} MiB (started at {base:,.0f}), "
              f"{per:,.0f} bytes per task")
    print(f"pending per the leader: {r['pending']}")
    if "dispatch" in r:
        print(f"dispatch: {args.dispatch:,} no-op tasks on 1 worker x {args.slots} slots: "
              f"{r['dispatch']:,.0f} tasks/s")


if __name__ == "__main__":
    main()
