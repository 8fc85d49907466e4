"""`dtask dev`: a whole local cluster on 127.0.0.1 for laptops — three schedulers and
two workers, one OS process each, state under one data directory.

Started again on the same data directory it resumes the same cluster and its tasks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(slots=True)
class DevNode:
    node_id: int
    client: str
    raft: str
    data_dir: str


def plan(data_dir: str, base_port: int, nodes: int = 3) -> list[DevNode]:
    """Client ports base..base+n-1, Raft ports base+100.. (7301-7303 and 7401-7403)."""
    return [DevNode(i, f"tcp://127.0.0.1:{base_port + i - 1}",
                    f"tcp://127.0.0.1:{base_port + 100 + i - 1}",
                    os.path.join(data_dir, f"node{i}"))
            for i in range(1, nodes + 1)]


def node_command(node: DevNode, peers: list[DevNode]) -> list[str]:
    peer_arg = ",".join(f"{p.node_id}={p.raft}@{p.client}" for p in peers)
    return [sys.executable, "-m", "dtask", "scheduler", "--id", str(node.node_id),
            "--data-dir", node.data_dir, "--raft", node.raft, "--client", node.client,
            "--peers", peer_arg,
            # One history database for the cluster (only the leader writes it).
            "--db", os.path.join(os.path.dirname(node.data_dir), "dtask.sqlite3")]


def worker_command(worker_id: str, endpoints: str) -> list[str]:
    return [sys.executable, "-m", "dtask.worker", "--endpoint", endpoints, "--id", worker_id]


def _spawn(cmd: list[str], log_dir: str, log_name: str) -> subprocess.Popen:
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, log_name), "ab") as logf:
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)


def run(data_dir: str, base_port: int, nodes: int = 3, workers: int = 2, echo=print) -> int:
    cluster = plan(os.path.abspath(data_dir), base_port, nodes)
    procs = []
    endpoints = ",".join(n.client for n in cluster)
    for node in cluster:
        procs.append(_spawn(node_command(node, cluster), node.data_dir, "node.log"))
    worker_dir = os.path.join(os.path.abspath(data_dir), "workers")
    for i in range(1, workers + 1):
        procs.append(_spawn(worker_command(f"dev-worker-{i}", endpoints), worker_dir,
                            f"worker{i}.log"))
    echo(f"DTask dev cluster: {nodes} schedulers, {workers} workers, data in "
         f"{os.path.abspath(data_dir)}")
    for node, proc in zip(cluster, procs, strict=False):
        echo(f"  scheduler {node.node_id}: clients {node.client}  raft {node.raft}  "
             f"pid {proc.pid}  log {node.data_dir}/node.log")
    echo(f"  workers: logs in {worker_dir}")
    echo(f"Endpoints: {endpoints} (dtask.Client and dtaskctl use these by default)")
    echo("Try:  .venv/bin/python -c \"import dtask; c = dtask.Client('" + endpoints + "'); "
         "t = c.submit('shell', {'cmd': 'echo hello'}); print(c.wait(t)['status'], "
         "c.logs(t))\"")
    echo("Stop with Ctrl-C.")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        if any(p.poll() is not None for p in procs):
            echo("a node exited unexpectedly; stopping the cluster (see its node.log)")
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    echo("stopped")
    return 0 if stopping else 1
