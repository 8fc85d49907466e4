"""The Raft layer alone: committed writes per second, one at a time, 3 local nodes.

DTask: `dtask raft-node` processes (fsync on) driven by bench_raft.one_at_a_time.
PySyncObj: three `pysyncobj_node` processes with a journal file each; one of them
writes (see that module for what its journal does and does not promise).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

from bench import bench_raft
from bench.suite import procs
from bench.suite.model import Config
from dtask.raft.kvclient import KVClient
from dtask.raft.localcluster import Cluster


def dtask_rate(seconds: float) -> float:
    root = tempfile.mkdtemp(prefix="dtask-bench-raft-")
    c = Cluster(root, size=3)
    try:
        c.start_all()
        c.wait_leader()
        c.client = KVClient(c.endpoints(), timeout=5.0)
        c.client.call("put", "warm", "up")
        return len(bench_raft.one_at_a_time(c, seconds)) / seconds
    finally:
        c.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def pysyncobj_rate(seconds: float, tick: float = 0.0) -> float:
    root = tempfile.mkdtemp(prefix="dtask-bench-pysyncobj-")
    addrs = [f"127.0.0.1:{p}" for p in _free_ports(3)]

    def argv(i: int) -> list[str]:
        others = [a for a in addrs if a != addrs[i]]
        return [sys.executable, "-m", "bench.suite.pysyncobj_node", addrs[i],
                os.path.join(root, f"journal{i}"), *others, "--tick", str(tick)]

    try:
        with procs.running(argv(1)), procs.running(argv(2)):
            out = subprocess.run([*argv(0), "--write", str(seconds)], cwd=procs.REPO,
                                 env=procs.env(), capture_output=True, text=True,
                                 timeout=seconds + 60)
        if out.returncode:
            raise RuntimeError(f"PySyncObj writer failed: {out.stderr.strip()[-300:]}")
        return float(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def dtask_config() -> Config:
    return Config("dtask", "dtask raft", "3 raft-node processes, KV put one at a time",
                  "replicated, fdatasync before ack", raft=dtask_rate)


def pysyncobj_configs() -> list[Config]:
    setup = "3 processes, counter inc(sync=True) one at a time"
    guarantees = "replicated, journal on disk (mmap), never fsynced"
    return [Config("pysyncobj", "pysyncobj default", f"{setup}, default ticks",
                   guarantees, raft=pysyncobj_rate),
            Config("pysyncobj", "pysyncobj 1 ms ticks", f"{setup}, tick + AppendEntries 1 ms",
                   guarantees, raft=lambda seconds: pysyncobj_rate(seconds, 0.001))]
