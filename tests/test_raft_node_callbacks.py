"""The node driver in process: a proposer's callback that raises costs that reply only."""

from __future__ import annotations

import time

import zmq

from dtask.raft.localcluster import free_ports
from dtask.raft.node import NodeConfig, RaftNode


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
    poller.register(node.wake_socket, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        events = dict(poller.poll(node.next_timeout_ms()))
        if node.socket in events:
            node.on_readable()
        if node.wake_socket in events:
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
