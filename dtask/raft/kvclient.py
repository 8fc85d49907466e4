"""Client of the replicated key-value daemon (`kvserver`): finds and follows the leader.

Endpoints are the servers' client addresses in node-id order (node 1 first), so a
`not_leader` reply's leader id maps straight to an endpoint.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import msgpack
import zmq


class KVError(Exception):
    pass


class KVClient:
    def __init__(self, endpoints: list[str], timeout: float = 2.0,
                 ctx: zmq.Context | None = None) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self.ctx = ctx or zmq.Context.instance()
        self.socks = []
        for ep in endpoints:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IMMEDIATE, 1)
            s.connect(ep)
            self.socks.append(s)
        self.leader = 0  # index into endpoints
        self.ids = itertools.count(1)

    def close(self) -> None:
        for s in self.socks:
            s.close(0)

    def call(self, op: str, key: str = "", value: object = None, node: int | None = None,
             deadline: float | None = None) -> object:
        """One request, retried on other nodes until `deadline` (default: 10 timeouts).

        A retried write may apply twice (its first try's outcome was unknown); the
        tests and benchmarks only retry idempotent puts.
        """
        deadline = deadline or time.monotonic() + 10 * self.timeout
        while True:
            target = self.leader if node is None else node - 1
            req = next(self.ids)
            sock = self.socks[target]
            reply = None
            # IMMEDIATE sockets refuse to queue until connected: wait for the connection.
            if sock.poll(int(self.timeout * 1000), zmq.POLLOUT):
                sock.send(msgpack.packb([req, op, key, value]), zmq.NOBLOCK)
                reply = self._recv(target, req, time.monotonic() + self.timeout)
            if reply is not None:
                _, code, result, hint = reply
                if code == "ok":
                    return result
                if code == "error":
                    raise KVError(result)
                if node is not None:
                    raise KVError(f"node {node} is not the leader")
                self._follow(hint)
            elif node is None:
                self._follow(0)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{op} {key!r}: no leader answered")
            time.sleep(0.02)

    def pipeline(self, ops: Iterable[tuple[str, str, object]], window: int = 64) -> list:
        """Send many requests to the leader with up to `window` in flight; results in order."""
        ops = list(ops)
        results: list = [None] * len(ops)
        sock = self.socks[self.leader]
        inflight: dict[int, int] = {}
        sent = done = 0
        while done < len(ops):
            while sent < len(ops) and len(inflight) < window:
                req = next(self.ids)
                op, key, value = ops[sent]
                sock.send(msgpack.packb([req, op, key, value]))
                inflight[req] = sent
                sent += 1
            if not sock.poll(int(self.timeout * 1000)):
                raise TimeoutError("pipeline stalled")
            req, code, result, _ = msgpack.unpackb(sock.recv())
            pos = inflight.pop(req, None)
            if pos is None:
                continue
            if code != "ok":
                raise KVError(f"{code}: {result}")
            results[pos] = result
            done += 1
        return results

    def _recv(self, target: int, req: int, deadline: float) -> list | None:
        sock = self.socks[target]
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                return None
            reply = msgpack.unpackb(sock.recv(), strict_map_key=False)
            if reply[0] == req:
                return reply

    def _follow(self, hint: int) -> None:
        if hint and 0 < hint <= len(self.socks):
            self.leader = hint - 1
        else:
            self.leader = (self.leader + 1) % len(self.socks)
