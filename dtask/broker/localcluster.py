"""A scheduler cluster of real OS processes on 127.0.0.1, for tests, benchmarks and
`dtask dev`-like setups. Workers are started separately (see `start_worker`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import zmq

from .. import protocol as p
from ..raft.localcluster import Member, free_ports


class SchedulerCluster:
    def __init__(self, root: str, size: int = 3, worker_timeout: float = 5.0,
                 extra_args: list[str] | None = None) -> None:
        self.root = root
        ports = free_ports(2 * size)
        self.members = {
            i: Member(i, f"tcp://127.0.0.1:{ports[2 * (i - 1)]}",
                      f"tcp://127.0.0.1:{ports[2 * (i - 1) + 1]}", os.path.join(root, f"s{i}"))
            for i in range(1, size + 1)}
        self.worker_timeout = worker_timeout
        self.extra_args = extra_args or []
        self.db = os.path.join(root, "dtask.sqlite3")  # shared, as in `dtask dev`
        self.workers: list[subprocess.Popen] = []

    @property
    def endpoints(self) -> list[str]:
        return [m.client for m in self.members.values()]

    def start_worker(self, worker_id: str, concurrency: int = 2, *args: str) -> subprocess.Popen:
        """A real worker process (python -m dtask.worker) logging to root/<id>.log."""
        cmd = [sys.executable, "-m", "dtask.worker", "--endpoint", ",".join(self.endpoints),
               "--id", worker_id, "--concurrency", str(concurrency),
               "--heartbeat-interval", "0.3", *args]
        with open(os.path.join(self.root, f"{worker_id}.log"), "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        return proc

    def start(self, node_id: int, join: bool = False) -> Member:
        m = self.members[node_id]
        os.makedirs(m.data_dir, exist_ok=True)
        peers = ",".join(f"{i}={x.raft}@{x.client}" for i, x in self.members.items())
        cmd = [sys.executable, "-m", "dtask", "scheduler", "--id", str(node_id),
               "--data-dir", m.data_dir, "--raft", m.raft, "--client", m.client,
               "--peers", peers, "--worker-timeout", str(self.worker_timeout),
               *(() if "--db" in self.extra_args else ("--db", self.db)), *self.extra_args,
               *(("--join",) if join else ())]
        with open(m.log_path, "ab") as log:
            m.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return m

    def start_all(self) -> None:
        for i in self.members:
            self.start(i)

    def kill(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        m = self.members[node_id]
        if m.proc and m.proc.poll() is None:
            m.proc.send_signal(sig)
            m.proc.wait(15)

    def alive(self, node_id: int) -> bool:
        m = self.members[node_id]
        return m.proc is not None and m.proc.poll() is None

    def stop_all(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for m in self.members.values():
            if m.proc and m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait(10)

    def node_info(self, node_id: int, timeout: float = 1.0) -> dict | None:
        """That node's own view (its `cluster` reply), or None if it does not answer."""
        reply = request(self.members[node_id].client, {"t": p.CLUSTER}, timeout)
        return reply.get("node") if reply and reply.get("t") == p.CLUSTER_INFO else None

    def wait_leader(self, timeout: float = 15.0, exclude: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in self.members:
                if i == exclude or not self.alive(i):
                    continue
                info = self.node_info(i, timeout=0.5)
                if info and info.get("role") == "leader":
                    return i
            time.sleep(0.05)
        raise TimeoutError("no scheduler became leader")


def request(endpoint: str, msg: dict, timeout: float = 1.0) -> dict | None:
    """One request on a fresh DEALER; None on timeout. For tests and tools."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(p.pack({"v": p.VERSION, "id": 1, **msg}))
        if not sock.poll(int(timeout * 1000)):
            return None
        return msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
    finally:
        sock.close(0)
