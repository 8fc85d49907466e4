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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5000)
    args = ap.parse_args()
    cluster = SchedulerCluster(tempfile.mkdtemp(prefix="dtask-bench-scale-"), size=3)
    cluster.start_all()
    try:
        leader = cluster.wait_leader()
        base = {i: rss_mib(m.proc.pid) for i, m in cluster.members.items()}
        spec = {"type": "shell", "payload": {"cmd": "true"}, "queue": "nobody"}
        with Client(cluster.endpoints, timeout=120) as c:
            t0 = time.perf_counter()
            rates = []
            for done in range(0, args.tasks, args.batch):
                t = time.perf_counter()
                c.submit_many([spec] * min(args.batch, args.tasks - done))
                rates.append(args.batch / (time.perf_counter() - t))
            elapsed = time.perf_counter() - t0
            info = c.cluster()
        time.sleep(2)  # let followers apply the tail
        print(f"{args.tasks:,} pending tasks on 3 schedulers, {os.cpu_count()} CPUs, "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
        print(f"submit_many overall: {args.tasks / elapsed:,.0f} tasks/s; first 10% of batches "
              f"{sum(rates[:len(rates) // 10]) / max(1, len(rates) // 10):,.0f}/s, last 10% "
              f"{sum(rates[-(len(rates) // 10):]) / max(1, len(rates) // 10):,.0f}/s")
        for i, m in cluster.members.items():
            rss = rss_mib(m.proc.pid)
            role = "leader" if i == leader else "follower"
            print(f"scheduler {i} ({role}): RSS {rss:,.0f} MiB (started at {base[i]:,.0f}), "
                  f"{(rss - base[i]) * 1024 * 1024 / args.tasks:,.0f} bytes per task")
        print(f"pending per the leader: {info.get('node', {}).get('tasks', {}).get('PENDING')}")
    finally:
        cluster.stop_all()


if __name__ == "__main__":
    main()
