"""Raft messages between schedulers over ZeroMQ.

Each node binds one ROUTER for inbound messages and reaches each peer through a
DEALER whose identity is its own node id, so the ROUTER's first frame names the
sender. Frames are `[identity, message]` — no empty delimiter frame (it costs a third
of the throughput, see DESIGN.md). Sends never block: Raft tolerates lost messages,
so a full queue to a slow or dead peer drops and counts instead of stalling the loop.
"""

from __future__ import annotations

import logging
from collections import Counter

import zmq

from .messages import Message, ProtocolError, decode, encode

log = logging.getLogger("dtask.raft.transport")

MAX_FRAME = 64 << 20


class Transport:
    def __init__(self, ctx: zmq.Context, node_id: int, bind: str, peers: dict[int, str], *,
                 hwm: int = 10_000, max_frame: int = MAX_FRAME) -> None:
        self.ctx = ctx
        self.node_id = node_id
        self.identity = str(node_id).encode()
        self.hwm = hwm
        self.max_frame = max_frame
        self.counters: Counter[str] = Counter()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.RCVHWM, hwm)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes over at once
        self.router.setsockopt(zmq.MAXMSGSIZE, max_frame)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(bind)
        self.dealers: dict[int, zmq.Socket] = {}
        self.addresses: dict[int, str] = {}
        self.set_peers(peers)

    def set_peers(self, peers: dict[int, str]) -> None:
        """Connect to new peers, drop departed ones; `peers` may include ourselves."""
        for node_id in list(self.dealers):
            if peers.get(node_id) != self.addresses.get(node_id):
                self.dealers.pop(node_id).close(0)
                self.addresses.pop(node_id, None)
        for node_id, addr in peers.items():
            if node_id == self.node_id or node_id in self.dealers:
                continue
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, self.identity)
            sock.setsockopt(zmq.SNDHWM, self.hwm)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # don't queue for a peer that is down
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # notice dead TCP connections
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
            try:
                sock.connect(addr)
            except zmq.ZMQError as exc:
                # A bad address that reached the log must not stop every node that
                # reads it; the member stays unreachable until it is removed.
                log.error("event=peer_address_invalid peer=%d address=%r error=%s",
                          node_id, addr, exc)
                sock.close(0)
                continue
            self.dealers[node_id] = sock
            self.addresses[node_id] = addr

    def send(self, msgs: list[Message]) -> None:
        for m in msgs:
            sock = self.dealers.get(m.to)
            if sock is None:
                self.counters["send_no_route"] += 1
                continue
            try:
                sock.send(encode(m), zmq.NOBLOCK)
            except zmq.Again:
                self.counters["send_dropped"] += 1

    def recv(self, limit: int = 10_000) -> list[Message]:
        """Drain up to `limit` inbound messages without blocking; drop malformed ones."""
        out: list[Message] = []
        router = self.router
        for _ in range(limit):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            msg = self._parse(frames)
            if msg is not None:
                out.append(msg)
        return out

    def _parse(self, frames: list[bytes]) -> Message | None:
        try:
            if len(frames) != 2:
                raise ProtocolError(f"expected 2 frames, got {len(frames)}")
            msg = decode(frames[1], self.max_frame)
            if str(msg.frm).encode() != frames[0]:
                raise ProtocolError(f"sender {msg.frm} does not match identity {frames[0]!r}")
            if msg.to != self.node_id:
                raise ProtocolError(f"addressed to node {msg.to}, this is {self.node_id}")
        except ProtocolError as exc:
            n = self.counters["recv_malformed"] = self.counters["recv_malformed"] + 1
            if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th...: a flood cannot flood the log
                log.warning("event=raft_frame_dropped node=%d peer=%r reason=%r dropped=%d",
                            self.node_id, frames[0][:32], str(exc), n)
            return None
        self.counters["recv"] += 1
        return msg

    def close(self) -> None:
        for sock in self.dealers.values():
            sock.close(0)
        self.dealers.clear()
        self.router.close(0)
