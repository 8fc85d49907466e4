"""Cron on a local 3-node cluster (fsync on): firing lag with many jobs, and exactly-once
across leader kills.

    python bench/bench_cron.py                         # 10,000 jobs for 2 minutes, 20 kills
    python bench/bench_cron.py --jobs 600 --minutes 1 --kills 3     # quick

Scale: N jobs, each firing once a minute at second i % 60 (spread over the minute),
overlap=allow and no workers, so every tick creates a task. Firing lag is the task's
`created_us` (the leader's clock when it proposed the firing) minus the scheduled
instant; the entry then commits one fsync round later (the leader's commit latency is
printed alongside). The leader's CPU share is its user+system time over the window.

Failover: one job firing every second while the leader is SIGKILLed `--kills` times
(restarted each time); afterwards the fired ticks must have no duplicate and no gap.
"""

from __future__ import annotations

import argparse
import calendar
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)

from dtask.broker.localcluster import SchedulerCluster  # noqa: E402
from dtask.client import Client  # noqa: E402

TICKS = 1_000_000


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tick_of(task_id: str) -> int:
    stamp = task_id.split("@", 1)[1]
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))


def scale(jobs: int, minutes: float) -> None:
    root = tempfile.mkdtemp(prefix="bench-cron-")
    cluster = SchedulerCluster(root)
    cluster.start_all()
    try:
        leader = cluster.wait_leader()
        with Client(cluster.endpoints, timeout=60, max_in_flight=256) as client:
            t0 = time.monotonic()
            for i in range(jobs):
                client.cron_define(f"job{i}", f"* * * * * {i % 60}", "noop", {},
                                   overlap="allow", task={"queue": "bench-idle"})
            print(f"defined {jobs} jobs in {time.monotonic() - t0:.1f} s")
            # Start measuring at the next full minute, for whole minutes.
            start = (int(time.time()) // 60 + 1) * 60
            time.sleep(max(0.0, start - time.time()))
            pid = cluster.members[leader].proc.pid
            cpu0, wall0 = cpu_seconds(pid), time.monotonic()
            end = start + int(minutes * 60)
            time.sleep(max(0.0, end - time.time()) + 2)
            cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
            tasks = [t for t in client.list(limit=None) if t.get("cron_job")]
            info = cluster.node_info(cluster.wait_leader()) or {}
        window = [t for t in tasks if start <= tick_of(t["id"]) < end]
        lags = [(t["created_us"] - tick_of(t["id"]) * TICKS) / 1e3 for t in window]
        expected = jobs * int(minutes)
        ids = [t["id"] for t in window]
        print(f"scale: {jobs} jobs, {minutes:g} min, leader node {leader}")
        print(f"  fired {len(window)} of {expected} expected ticks, duplicates "
              f"{len(ids) - len(set(ids))}, missed {expected - len(set(ids))}")
        print(f"  firing lag ms: p50 {pct(lags, 0.5):.1f}  p99 {pct(lags, 0.99):.1f}  "
              f"max {max(lags):.1f}   (+ commit latency {info.get('commit_latency_ms')})")
        print(f"  leader CPU share: {cpu * 100:.1f} % of one core")
    finally:
        cluster.stop_all()


def failover(kills: int) -> None:
    root = tempfile.mkdtemp(prefix="bench-cron-fo-")
    cluster = SchedulerCluster(root)
    cluster.start_all()
    try:
        cluster.wait_leader()
        with Client(cluster.endpoints, timeout=60) as client:
            client.cron_define("every-second", "* * * * * *", "noop", {}, overlap="allow",
                               task={"queue": "bench-idle"})
            time.sleep(2)
            for _ in range(kills):
                leader = cluster.wait_leader()
                cluster.kill(leader)
                cluster.wait_leader(exclude=leader)
                cluster.start(leader)
                time.sleep(1.5)
            time.sleep(2)
            ticks = sorted(tick_of(t["id"]) for t in client.list(limit=None)
                           if t.get("cron_job") == "every-second")
        gaps = (ticks[-1] - ticks[0] + 1) - len(set(ticks))
        print(f"failover: {kills} leader SIGKILLs over {ticks[-1] - ticks[0] + 1} s of "
              f"ticks: {len(ticks)} fired, duplicates {len(ticks) - len(set(ticks))}, "
              f"missed {gaps}")
    finally:
        cluster.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--minutes", type=float, default=2)
    ap.add_argument("--kills", type=int, default=20)
    args = ap.parse_args()
    print(f"bench_cron: {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.jobs:
        scale(args.jobs, args.minutes)
    if args.kills:
        failover(args.kills)


if __name__ == "__main__":
    main()
