"""`dtask dev`: a local cluster on 127.0.0.1, one OS process per node, for laptops.

Until the scheduler daemon exists the cluster is three replicated key-value nodes;
the command, ports and data directory layout stay the same when it grows workers.
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
    peer_arg = ",".join(f"{p.node_id}={p.raft}" for p in peers)
    return [sys.executable, "-m", "dtask", "raft-node", "--id", str(node.node_id),
            "--data-dir", node.data_dir, "--raft", node.raft, "--client", node.client,
            "--peers", peer_arg]


def run(data_dir: str, base_port: int, nodes: int = 3, echo=print) -> int:
    cluster = plan(os.path.abspath(data_dir), base_port, nodes)
    procs = []
    for node in cluster:
        os.makedirs(node.data_dir, exist_ok=True)
        logf = open(os.path.join(node.data_dir, "node.log"), "ab")  # noqa: SIM115 (child owns it)
        procs.append(subprocess.Popen(node_command(node, cluster), stdout=logf,
                                      stderr=subprocess.STDOUT))
    endpoints = ",".join(n.client for n in cluster)
    echo(f"DTask dev cluster: {nodes} Raft nodes, data in {os.path.abspath(data_dir)}")
    for node, proc in zip(cluster, procs, strict=True):
        echo(f"  node {node.node_id}: clients {node.client}  raft {node.raft}  pid {proc.pid}"
             f"  log {node.data_dir}/node.log")
    echo(f"Try:  dtask kv --endpoints {endpoints} put greeting hello")
    echo(f"      dtask kv --endpoints {endpoints} get greeting")
    echo(f"      dtask kv --endpoints {endpoints} status")
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
