"""A Raft key-value cluster of real OS processes on 127.0.0.1, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from dtask.raft.kvclient import KVClient, KVError


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Member:
    node_id: int
    raft: str
    client: str
    data_dir: str
    proc: subprocess.Popen | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def log_path(self) -> str:
        return os.path.join(self.data_dir, "node.log")

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


class Cluster:
    def __init__(self, root: str, size: int = 3, spares: int = 0,
                 snapshot_every: int = 50_000, keep_entries: int = 5_000) -> None:
        self.root = root
        ports = free_ports(2 * (size + spares))
        self.members = {
            i: Member(i, f"tcp://127.0.0.1:{ports[2 * (i - 1)]}",
                      f"tcp://127.0.0.1:{ports[2 * (i - 1) + 1]}", os.path.join(root, f"n{i}"))
            for i in range(1, size + spares + 1)}
        self.founders = list(range(1, size + 1))
        self.snapshot_args = ["--snapshot-every", str(snapshot_every),
                              "--keep-entries", str(keep_entries)]
        self.client = KVClient(self.endpoints(), timeout=1.0)

    def endpoints(self) -> list[str]:
        return [m.client for m in self.members.values()]

    def start(self, node_id: int, join: bool = False) -> Member:
        m = self.members[node_id]
        os.makedirs(m.data_dir, exist_ok=True)
        peers = ",".join(f"{i}={self.members[i].raft}" for i in self.founders)
        cmd = [sys.executable, "-m", "dtask", "raft-node", "--id", str(node_id),
               "--data-dir", m.data_dir, "--raft", m.raft, "--client", m.client,
               "--peers", peers, "--log-level", "info", *self.snapshot_args]
        if join:
            cmd.append("--join")
        with open(m.log_path, "ab") as log:
            m.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return m

    def start_all(self) -> None:
        for i in self.founders:
            self.start(i)

    def kill(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        m = self.members[node_id]
        if m.proc and m.proc.poll() is None:
            m.proc.send_signal(sig)
            m.proc.wait(10)

    def stop_all(self) -> None:
        for m in self.members.values():
            if m.proc and m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait(10)
        self.client.close()

    def status(self, node_id: int) -> dict | None:
        try:
            return self.client.call("status", node=node_id, deadline=time.monotonic())
        except (KVError, TimeoutError):
            return None

    def wait_leader(self, timeout: float = 10.0, exclude: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, m in self.members.items():
                if i == exclude or not m.proc or m.proc.poll() is not None:
                    continue
                st = self.status(i)
                if st and st["role"] == "leader":
                    return i
            time.sleep(0.05)
        raise TimeoutError("no leader elected")

    def wait_applied(self, node_ids: list[int], index: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sts = [self.status(i) for i in node_ids]
            if all(st and st["applied"] >= index for st in sts):
                return
            time.sleep(0.05)
        raise TimeoutError(f"nodes {node_ids} did not apply up to {index}: {sts}")
