"""The node driver in process: a proposer's callback that raises costs that reply only;
when each node of a cluster takes its snapshots."""

from __future__ import annotations

import time
from types import SimpleNamespace

import zmq

from dtask.raft.localcluster import free_ports
from dtask.raft.node import LEADER_SNAPSHOT_SPACING, NodeConfig, RaftNode
from dtask.raft.progress import Role


class Log:
    def __init__(self):
        self.applied: list[bytes] = []

    def apply(self, index: int, data: bytes) -> object:
        self.applied.append(data)
        return len(self.applied)

    def snapshot(self) -> bytes:
        return b""

    def restore(self, data: bytes) -> None:
        self.applied = []


def run_until(node: RaftNode, cond, timeout: float = 10.0) -> None:
    poller = zmq.Poller()
    poller.register(node.socket, zmq.POLLIN)
    poller.register(node.wake_fd, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        events = dict(poller.poll(node.next_timeout_ms()))
        if node.socket in events:
            node.on_readable()
        if node.wake_fd in events:
            node.on_wake()
        node.on_timer()
        node.process()


def test_a_raising_callback_does_not_stop_the_node(tmp_path, caplog):
    addr = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    sm = Log()
    node = RaftNode(NodeConfig(1, str(tmp_path), addr, {1: addr}), sm)
    try:
        run_until(node, lambda: node.is_leader)
        results = []

        def broken(result, err):
            raise RuntimeError("a bug in a reply")

        node.propose(b"first", broken)
        node.propose(b"second", lambda result, err: results.append((result, err)))
        run_until(node, lambda: results)
        assert sm.applied == [b"first", b"second"] and results == [(2, None)]
        assert "event=callback_failed" in caplog.text
    finally:
        node.close()


def snapshot_points(node_id: int, every: int, entries: int,
                    role: Role = Role.FOLLOWER) -> list[int]:
    """The applied indices at which a node with this id starts a snapshot."""
    node = SimpleNamespace(cfg=SimpleNamespace(node_id=node_id, snapshot_every=every,
                                               snapshot_bytes=1 << 60),
                           raft=SimpleNamespace(log=SimpleNamespace(applied=0), role=role),
                           snapshot_index=0, _applied_bytes=0)
    points = []
    for applied in range(1, entries + 1):
        node.raft.log.applied = applied
        if RaftNode._snapshot_due(node):
            points.append(applied)
            node.snapshot_index = applied
    return points


def test_the_nodes_of_a_cluster_snapshot_at_different_times_once_per_interval():
    every = 1000
    points = {i: snapshot_points(i, every, 10 * every) for i in range(1, 6)}
    for p in points.values():
        assert len(p) in (9, 10)  # once per interval...
        assert all(b - a == every for a, b in zip(p, p[1:], strict=False))  # ...evenly
    # Spread over the interval: no two of five nodes within a tenth of it of each other.
    phases = sorted(p[0] % every for p in points.values())
    gaps = [b - a for a, b in zip(phases, phases[1:] + [phases[0] + every], strict=True)]
    assert min(gaps) >= every // 10, phases


def test_the_leader_snapshots_less_often():
    every = 1000
    leading = snapshot_points(1, every, 20 * every, Role.LEADER)
    assert all(b - a == every * LEADER_SNAPSHOT_SPACING for a, b in zip(leading, leading[1:],
                                                                         strict=False))
    assert len(leading) >= 20 // LEADER_SNAPSHOT_SPACING - 1
