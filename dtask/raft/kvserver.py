"""A replicated key-value daemon: one Raft node, a KVStore, and a client ROUTER.

It exercises the Raft layer end to end with real processes (the real-process tests,
the Raft benchmark and, until the scheduler exists, `dtask dev`). The scheduler
daemon is built the same way, with its own state machine and protocol.

Client protocol (DEALER -> ROUTER, one frame per request, msgpack):
  request  [req_id, op, key, value]   op: put | append | cas | get | local_get | status
                                      | put_many | add_learner | promote | remove | transfer
  reply    [req_id, code, value, leader_id]   code: ok | not_leader | error
`get` is linearizable (ReadIndex); `local_get` reads this replica's state as it is.
Clients pipeline requests: replies carry the request id and may come out of order.
"""

from __future__ import annotations

import contextlib
import logging

import msgpack
import zmq

from .core import NotLeader
from .daemon import NodeDaemon, run_daemon
from .kv import KVStore
from .messages import ConfChangeType
from .node import NodeConfig, RaftNode

log = logging.getLogger("dtask.raft.kvserver")

WRITE_OPS = {"put", "append", "cas"}
# value = [node_id, raft_address]; the address matters for adding a learner only.
MEMBER_OPS = {"add_learner": ConfChangeType.ADD_LEARNER, "promote": ConfChangeType.PROMOTE,
              "remove": ConfChangeType.REMOVE}


class KVServer(NodeDaemon):
    def __init__(self, cfg: NodeConfig, client_bind: str, ctx: zmq.Context | None = None):
        self.ctx = ctx or zmq.Context.instance()
        self.kv = KVStore()
        clients = self.ctx.socket(zmq.ROUTER)
        clients.setsockopt(zmq.LINGER, 0)
        clients.setsockopt(zmq.RCVHWM, 100_000)
        clients.setsockopt(zmq.SNDHWM, 100_000)
        clients.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        clients.bind(client_bind)
        super().__init__(RaftNode(cfg, self.kv, self.ctx), clients)
        self._packer = msgpack.Packer(use_bin_type=True)

    def on_requests(self) -> None:
        for _ in range(10_000):
            try:
                ident, payload = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # wrong number of frames
                continue
            try:
                req_id, op, key, value = msgpack.unpackb(payload)
                if not isinstance(key, str):
                    raise TypeError("key must be a string")
            except Exception as exc:
                self._reply(ident, None, "error", f"malformed request: {exc}")
                continue
            self._handle(ident, req_id, op, key, value)

    def _handle(self, ident: bytes, req_id: object, op: object, key: str, value: object):
        if op in WRITE_OPS:
            def done(result: object, err: Exception | None) -> None:
                self._answer(ident, req_id, result, err)
            self.node.propose(msgpack.packb([op, key, value]), done)
        elif op == "put_many":
            self._put_many(ident, req_id, value)
        elif op == "get":
            def read_done(_: object, err: Exception | None) -> None:
                self._answer(ident, req_id, None if err else self.kv.get(key), err)
            self.node.read(read_done)
        elif op == "local_get":
            self._reply(ident, req_id, "ok", self.kv.get(key))
        elif op == "status":
            self._reply(ident, req_id, "ok", self.node.status())
        elif op in MEMBER_OPS:
            def changed(_: object, err: Exception | None) -> None:
                self._answer(ident, req_id, None, err)
            node_id, address = (value or [0, ""])[:2] if isinstance(value, list) else (0, "")
            self.node.change_membership(MEMBER_OPS[op], int(node_id), str(address), changed)
        elif op == "transfer":
            try:
                self._reply(ident, req_id, "ok", self.node.transfer_leadership(int(value or 0)))
            except Exception as exc:
                self._answer(ident, req_id, None, exc)
        else:
            self._reply(ident, req_id, "error", f"unknown op {op!r}")

    def _put_many(self, ident: bytes, req_id: object, pairs: object) -> None:
        """Many puts in one request, each its own log entry; one reply when all commit."""
        if not isinstance(pairs, list) or not pairs:
            self._reply(ident, req_id, "error", "put_many needs a list of [key, value]")
            return
        left = len(pairs)
        failed: list[Exception] = []

        def one_done(_: object, err: Exception | None) -> None:
            nonlocal left
            left -= 1
            if err is not None:
                failed.append(err)
            if left == 0:
                self._answer(ident, req_id, len(pairs) if not failed else None,
                             failed[0] if failed else None)

        for pair in pairs:
            self.node.propose(msgpack.packb(["put", *pair]), one_done)

    def _answer(self, ident: bytes, req_id: object, result: object, err: Exception | None):
        if err is None:
            self._reply(ident, req_id, "ok", result)
        elif isinstance(err, NotLeader):
            self._reply(ident, req_id, "not_leader", str(err), err.leader)
        else:
            self._reply(ident, req_id, "error", str(err))

    def _reply(self, ident: bytes, req_id: object, code: str, value: object,
               leader: int | None = None) -> None:
        hint = self.node.leader if leader is None else leader
        frame = self._packer.pack([req_id, code, value, hint])
        # A client that stopped reading loses the reply; it times out and retries.
        with contextlib.suppress(zmq.Again):
            self.sock.send_multipart([ident, frame], zmq.NOBLOCK)


def run(cfg: NodeConfig, client_bind: str) -> None:
    run_daemon(KVServer(cfg, client_bind),
               f"node={cfg.node_id} raft={cfg.bind} clients={client_bind}")
