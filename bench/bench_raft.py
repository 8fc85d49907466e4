"""Raft on a 3-node loopback cluster, fsync on: throughput, commit latency, failover.

    python bench/bench_raft.py                 # everything, 20 failover trials
    python bench/bench_raft.py --trials 5 --seconds 3

Each node is a real `dtask raft-node` process (the replicated key-value daemon) with
its log on local disk and one fdatasync per loop turn. Figures are medians; compare
them with the fsync baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dtask.raft.kv import KVStore, command  # noqa: E402
from dtask.raft.kvclient import KVClient, KVError  # noqa: E402
from dtask.raft.localcluster import Cluster  # noqa: E402
from dtask.raft.messages import Entry  # noqa: E402
from dtask.raft.node import NodeConfig, RaftNode  # noqa: E402
from dtask.raft.storage import DiskStorage  # noqa: E402


def fsync_baseline(path: str, n: int = 300) -> float:
    """Median seconds of one 4 KiB append + fdatasync on the same disk."""
    fd = os.open(os.path.join(path, "fsync-probe"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        os.write(fd, b"x" * 4096)
        os.fdatasync(fd)
        samples.append(time.perf_counter() - t)
    os.close(fd)
    return statistics.median(samples)


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))]


def one_at_a_time(c: Cluster, seconds: float) -> list[float]:
    lat = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        t = time.perf_counter()
        c.client.call("put", f"s{i}", "v")
        lat.append(time.perf_counter() - t)
        i += 1
    return lat


def pipelined(c: Cluster, seconds: float, window: int) -> float:
    end = time.monotonic() + seconds
    done = 0
    t0 = time.perf_counter()
    while time.monotonic() < end:
        c.client.pipeline([("put", f"p{done + i}", "v") for i in range(1000)], window=window)
        done += 1000
    return done / (time.perf_counter() - t0)


def batched(c: Cluster, seconds: float, batch: int, window: int) -> float:
    """put_many: each request carries `batch` commands, each its own log entry."""
    end = time.monotonic() + seconds
    entries = 0
    t0 = time.perf_counter()
    k = 0
    while time.monotonic() < end:
        ops = []
        for _ in range(window * 4):
            ops.append(("put_many", "", [[f"b{k + j}", "v"] for j in range(batch)]))
            k += batch
        c.client.pipeline(ops, window=window)
        entries += batch * len(ops)
    return entries / (time.perf_counter() - t0)


def failover_trials(root: str, trials: int) -> list[float]:
    """SIGKILL the leader; time until a write through the client succeeds again."""
    out = []
    c = Cluster(root, size=3)
    c.start_all()
    # Short per-attempt timeouts, so the figure is the cluster's failover, not the
    # client's patience with a dead leader.
    c.client = KVClient(c.endpoints(), timeout=0.05)
    try:
        for trial in range(trials):
            leader = c.wait_leader(timeout=15)
            c.client.call("put", "warm", str(trial))
            c.kill(leader)
            t = time.perf_counter()
            while True:
                try:
                    c.client.call("put", "after", str(trial), deadline=time.monotonic() + 0.2)
                    break
                except (TimeoutError, KVError):
                    pass
            out.append(time.perf_counter() - t)
            c.start(leader)
            c.wait_applied([leader], c.status(c.wait_leader())["commit"], timeout=15)
    finally:
        c.stop_all()
    return out


def recovery(root: str, n: int) -> tuple[float, float]:
    """Seconds to restart a node whose log holds `n` small entries: storage load alone,
    and the whole node (storage load + Raft core + transport) until it can serve."""
    peers = {1: "tcp://127.0.0.1:0"}
    node = RaftNode(NodeConfig(1, root, "tcp://127.0.0.1:*", peers), KVStore())
    node.close()
    st = DiskStorage(os.path.join(root, "raft"))
    for lo in range(2, n + 2, 1000):
        st.append([Entry(1, i, 0, command("put", f"k{i % 1000}", "v" * 20))
                   for i in range(lo, min(lo + 1000, n + 2))])
    st.sync()
    st.close()
    t = time.perf_counter()
    st = DiskStorage(os.path.join(root, "raft"))
    _, _, entries = st.load()
    storage_s = time.perf_counter() - t
    st.close()
    assert len(entries) == n
    t = time.perf_counter()
    node = RaftNode(NodeConfig(1, root, "tcp://127.0.0.1:*", peers), KVStore())
    node_s = time.perf_counter() - t
    assert node.raft.log.last_index() == n + 1
    node.close()
    return storage_s, node_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="per throughput scenario")
    p.add_argument("--trials", type=int, default=20, help="failover trials")
    p.add_argument("--dir", default=None, help="where the nodes keep their logs")
    p.add_argument("--recovery-entries", type=int, default=1_000_000)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="dtask-bench-raft-", dir=args.dir)
    fsync = fsync_baseline(root)
    c = Cluster(os.path.join(root, "tp"), size=3)
    c.start_all()
    try:
        c.wait_leader()
        c.client = KVClient(c.endpoints(), timeout=5.0)
        c.client.call("put", "warm", "up")
        lat = one_at_a_time(c, args.seconds)
        # The leader's own view: propose -> applied, without the client's round trip.
        leader_lat = c.status(c.wait_leader())["commit_latency_ms"]
        rate_pipe = pipelined(c, args.seconds, window=64)
        rate_batch = batched(c, args.seconds, batch=256, window=8)
    finally:
        c.stop_all()
    failovers = failover_trials(os.path.join(root, "fo"), args.trials)
    rec_storage, rec_node = recovery(os.path.join(root, "rec"), args.recovery_entries)
    p50 = statistics.median(lat)
    print(f"3-node loopback cluster, fsync on, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'scenario':<48}{'figure':>24}")
    print(f"{'fdatasync of a 4 KiB append (baseline)':<48}{fsync * 1e3:>21.3f} ms")
    print(f"{'commit latency, one at a time, p50':<48}{p50 * 1e3:>21.3f} ms")
    print(f"{'commit latency, one at a time, p99':<48}{pct(lat, 0.99) * 1e3:>21.3f} ms")
    print(f"{'  p50 / fsync':<48}{p50 / fsync:>22.2f} x")
    print(f"{'leader propose -> applied, p50 / p99':<48}"
          f"{leader_lat['p50']:>11.3f} / {leader_lat['p99']:.3f} ms")
    print(f"{'  p50 / fsync':<48}{leader_lat['p50'] / (fsync * 1e3):>22.2f} x")
    print(f"{'committed/s, one at a time':<48}{len(lat) / args.seconds:>20,.0f} /s")
    print(f"{'committed/s, pipelined puts (64 in flight)':<48}{rate_pipe:>20,.0f} /s")
    print(f"{'committed/s, put_many 256/request, 8 in flight':<48}{rate_batch:>20,.0f} /s")
    print(f"{'failover (SIGKILL leader -> next commit), p50':<48}"
          f"{statistics.median(failovers) * 1e3:>21.0f} ms")
    print(f"{'failover p99 (max of ' + str(len(failovers)) + ' trials)':<48}"
          f"{max(failovers) * 1e3:>21.0f} ms")
    n = f"{args.recovery_entries:,}"
    print(f"{'restart with ' + n + ' log entries: storage load':<48}{rec_storage:>22.2f} s")
    print(f"{'restart with ' + n + ' log entries: whole node':<48}{rec_node:>22.2f} s")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
