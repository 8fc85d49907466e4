#!/usr/bin/env python3
"""Where the CPU goes end to end: CPU time per task of every process and thread.

    .venv/bin/python bench/bench_e2e_cpu.py [--tasks 20000] [--workers 1] [--runs 1]

`bench_worker_e2e.run` (3 schedulers, fsync on, W worker processes x 1 slot, no-op
Python tasks submitted with `submit_many` in batches of 500), warmed up with 50 tasks.
Around the timed part it reads utime + stime of every thread of every process the
run started from /proc, and prints them per task, largest first, with the rate.
On a CPU-bound 2-core machine the total per task is what bounds throughput; compare
two checkouts by running each one's copy of this script, alternated. Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

# The checkout this script is in (a side-by-side run from another worktree must
# measure that worktree's code; its schedulers and workers import from the cwd).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

from bench import bench_worker_e2e  # noqa: E402
from dtask.broker.localcluster import SchedulerCluster  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
TASK = {"type": "python", "payload": {"fn": "builtins:int"}}

Sample = dict[tuple[int, int], tuple[str, int]]  # (pid, tid) -> (label, cpu ticks)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, i = [root], 0
    while i < len(out):
        out += children.get(out[i], [])
        i += 1
    return out[1:]


def label(pid: int, thread: str, roles: dict[int, str]) -> str:
    role = roles.get(pid)
    if role is None:
        with open(f"/proc/{pid}/cmdline") as f:
            argv = f.read().split("\0")
        role = "pool child" if "dtask.worker.pychild" in argv else " ".join(argv[1:3])
    return f"{role} / {thread}"


def sample(roles: dict[int, str]) -> Sample:
    out: Sample = {}
    for pid in descendants(os.getpid()):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                fields = stat.rsplit(")", 1)[1].split()
                out[(pid, int(tid))] = (label(pid, name, roles), int(fields[11]) + int(fields[12]))
        except OSError:
            continue  # exited meanwhile
    return out


def run(n: int, workers: int) -> None:
    found: dict[str, object] = {}

    @contextlib.contextmanager
    def timed(cluster: SchedulerCluster) -> Iterator[None]:
        leader = cluster.wait_leader()
        roles = {m.proc.pid: ("leader" if i == leader else f"follower {i}")
                 for i, m in cluster.members.items()}
        roles.update({w.pid: f"worker {i + 1}" for i, w in enumerate(cluster.workers)})
        found["before"], own = sample(roles), os.times()
        yield
        found["after"], own_after = sample(roles), os.times()
        found["client_s"] = own_after.user + own_after.system - own.user - own.system

    rate = bench_worker_e2e.run("python", TASK["payload"], n, workers, 1, warm=50,
                                timed=timed)
    before, after = found["before"], found["after"]
    per_task = 1e6 / TICK / n
    rows = sorted(((ticks - before.get(key, ("", 0))[1]) * per_task, name)
                  for key, (name, ticks) in after.items())
    rows = [r for r in rows if r[0] > 0][::-1]
    client_us = found["client_s"] * 1e6 / n
    print(f"{n} tasks, {workers} worker process(es) x 1 slot: {rate:,.0f} tasks/s; "
          f"CPU {sum(r[0] for r in rows) + client_us:.0f} us per task")
    for us, name in rows:
        print(f"  {us:7.1f} us  {name}")
    print(f"  {client_us:7.1f} us  client (this process)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    for _ in range(args.runs):
        run(args.tasks, args.workers)


if __name__ == "__main__":
    main()
