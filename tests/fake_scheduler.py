"""A fake DTask scheduler cluster for client tests: ROUTER sockets served by one thread.

It speaks the real protocol (it validates with `dtask.protocol`, so a client that
drifts from the scheduler's rules fails here too) on top of a dict of tasks, and
lets a test script faults:

- `leader`: index of the node that answers writes; the others say NOT_LEADER naming
  `advertised[leader]` (or "" when `leader` is None).
- `silent`: nodes that read requests and never answer.
- `drop_replies`: process the next N requests normally but lose their replies (the
  client cannot tell that from a lost request, so it must retry safely).
- `hold`: park every reply until `release()` (to prove requests are in flight together).
- `hook(node, msg)`: return a reply (dict or bytes), `DROP`, or None for the default.
- `kill(node)`: close a node's socket, as if the process died.

Everything a node receives is recorded in `received` (decoded) and `frames` (raw).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq

from dtask import protocol as p

DROP = object()


class FakeScheduler:
    def __init__(self, nodes: int = 1, leader: int | None = 0) -> None:
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket | None] = []
        self.endpoints: list[str] = []
        for _ in range(nodes):
            s = self.ctx.socket(zmq.ROUTER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, 100_000)
            s.setsockopt(zmq.SNDHWM, 100_000)
            port = s.bind_to_random_port("tcp://127.0.0.1")
            self.socks.append(s)
            self.endpoints.append(f"tcp://127.0.0.1:{port}")
        self.advertised = list(self.endpoints)  # what a NOT_LEADER reply names
        self.leader = leader
        self.silent: set[int] = set()
        self.drop_replies = 0
        self.hold = False
        self.hook: Callable[[int, dict], Any] | None = None
        self.received: list[tuple[int, dict]] = []
        self.frames: list[tuple[int, bytes]] = []
        self.tasks: dict[str, dict] = {}  # insertion order is creation order
        self.specs: dict[str, p.TaskSpec] = {}
        self.by_key: dict[str, str] = {}
        self.logs: dict[str, bytes] = {}
        self.log_chunk = 4  # tiny, so that clients must follow the offset
        self.page = 3  # at most this many tasks per list reply, so clients follow `next`
        self.max_held = 0
        self._held: list[tuple[int, bytes, bytes]] = []
        self._waits: list[tuple[int, bytes, object, str, float]] = []
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fake-scheduler", daemon=True)
        self._thread.start()

    # -- test-side controls (run inside the fake's thread) -------------------------------

    def call(self, fn: Callable[[], Any]) -> Any:
        fut: Future = Future()
        self._cmds.put((fn, fut))
        return fut.result(timeout=5)

    def release(self) -> None:
        """Send every parked reply and stop parking."""
        def go() -> None:
            self.hold = False
            for node, ident, frame in self._held:
                self._send(node, ident, frame)
            self._held.clear()
        self.call(go)

    def complete(self, task_id: str, status: str = p.COMPLETED) -> None:
        """Finish a task and answer the waits parked on it."""
        def go() -> None:
            self.tasks[task_id]["status"] = status
            for w in [w for w in self._waits if w[3] == task_id]:
                self._waits.remove(w)
                self._send(w[0], w[1], p.reply(p.TASK, w[2], task=self.tasks[task_id],
                                               done=True))
        self.call(go)

    def kill(self, node: int) -> None:
        def go() -> None:
            sock = self.socks[node]
            self.socks[node] = None
            sock.close(0)
        self.call(go)

    def messages(self, msg_type: str | None = None, node: int | None = None) -> list[dict]:
        return [m for n, m in list(self.received)
                if (msg_type is None or m.get("t") == msg_type) and (node is None or n == node)]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for s in self.socks:
            if s is not None:
                s.close(0)
        self.ctx.term()

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            poller = zmq.Poller()
            live = [(i, s) for i, s in enumerate(self.socks) if s is not None]
            for _, s in live:
                poller.register(s, zmq.POLLIN)
            events = dict(poller.poll(5))
            for i, s in live:
                if s in events:
                    while True:
                        try:
                            parts = s.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(i, parts[0], parts[1:])
            while not self._cmds.empty():
                fn, fut = self._cmds.get()
                try:
                    fut.set_result(fn())
                except Exception as exc:
                    fut.set_exception(exc)
            now = time.monotonic()
            for w in [w for w in self._waits if w[4] <= now]:
                self._waits.remove(w)
                self._send(w[0], w[1], p.reply(p.TASK, w[2], task=self.tasks[w[3]],
                                               done=False))

    def _send(self, node: int, ident: bytes, frame: bytes) -> None:
        sock = self.socks[node]
        if sock is not None:
            sock.send_multipart([ident, frame])

    def _handle(self, node: int, ident: bytes, frames: list[bytes]) -> None:
        if len(frames) != 1:  # our framing: exactly one frame after the identity
            self.frames.append((node, b"".join(frames)))
            self._send(node, ident, p.error(None, p.BAD_REQUEST, "one frame per message"))
            return
        frame = frames[0]
        self.frames.append((node, frame))
        try:
            msg = p.unpack(frame)
        except p.ProtocolError as exc:
            self._send(node, ident, p.error(None, exc.code, exc.message))
            return
        self.received.append((node, msg))
        if node in self.silent:
            return
        out: Any = self.hook(node, msg) if self.hook else None
        if out is DROP:
            return
        if out is None:
            out = self._default(node, ident, msg)
        elif isinstance(out, dict):
            out = p.pack(out)
        if out is None:
            return  # parked (wait)
        if self.drop_replies > 0:
            self.drop_replies -= 1
            return
        if self.hold:
            self._held.append((node, ident, out))
            self.max_held = max(self.max_held, len(self._held))
            return
        self._send(node, ident, out)

    def _default(self, node: int, ident: bytes, msg: dict) -> bytes | None:
        t, rid = msg["t"], msg.get("id")
        any_node = t == p.CLUSTER or (t == p.STATUS and msg.get("stale") is True)
        if not any_node and node != self.leader:
            hint = "" if self.leader is None else self.advertised[self.leader]
            return p.error(rid, p.NOT_LEADER, "not the leader", leader=hint)
        handler = getattr(self, f"_on_{t}", None)
        if handler is None:
            return p.error(rid, p.BAD_REQUEST, f"unknown message type {t!r}")
        try:
            return handler(node, ident, rid, msg)
        except p.ProtocolError as exc:
            return p.error(rid, exc.code, exc.message)

    def _get(self, msg: dict) -> dict:
        task = self.tasks.get(p.task_id_of(msg))
        if task is None:
            raise p.ProtocolError(p.NOT_FOUND, f"no task {msg['task_id']}")
        return task

    # -- handlers -------------------------------------------------------------------------

    def _on_submit(self, node: int, ident: bytes, rid: object, msg: dict) -> bytes:
        ids, existing = [], []
        now_us = int(time.time() * 1e6)
        for spec in p.parse_submit(msg):
            found = self.by_key.get(spec.idempotency_key) if spec.idempotency_key else None
            if found is None and spec.task_id in self.tasks:
                found = spec.task_id
            if found is not None:
                ids.append(found)
                existing.append(True)
                continue
            task_id = spec.task_id or f"t{len(self.tasks) + 1:06d}"
            run_at = spec.at_us or (now_us + int(spec.delay * 1e6) if spec.delay else 0)
            self.tasks[task_id] = {
                "id": task_id, "name": spec.name, "type": spec.type, "payload": spec.payload,
                "content_type": spec.content_type, "priority": spec.priority,
                "queue": spec.queue, "labels": list(spec.labels),
                "idempotency_key": spec.idempotency_key, "created_us": now_us,
                "status": p.SCHEDULED if run_at > now_us else p.PENDING,
                "run_at_us": run_at, "attempts": []}
            self.specs[task_id] = spec
            if spec.idempotency_key:
                self.by_key[spec.idempotency_key] = task_id
            ids.append(task_id)
            existing.append(False)
        return p.reply(p.SUBMITTED, rid, task_ids=ids, existing=existing)

    def _on_status(self, node: int, ident: bytes, rid: object, msg: dict) -> bytes:
        return p.reply(p.TASK, rid, task=self._get(msg))

    def _on_cancel(self, node: int, ident: bytes, rid: object, msg: dict) -> bytes:
        task = self._get(msg)
        if task["status"] in (p.COMPLETED, p.FAILED):
            raise p.ProtocolError(p.CONFLICT, f"task {task['id']} is already {task['status']}")
        task["status"] = p.CANCELLED
        return p.reply(p.CANCELLED_REPLY, rid, task=task)

    def _on_wait(self, node: int, ident: bytes, rid: object, msg: dict) -> bytes | None:
        task = self._get(msg)
        timeout = p.get_num(msg, "timeout")
        if task["status"] in p.TERMINAL:
            return p.reply(p.TASK, rid, task=task, done=True)
        self._waits.append((node, ident, rid, task["id"], time.monotonic() + timeout))
        return None

    def _on_list(self, node: int, ident: bytes, rid: object, msg: dict) -> bytes:
        states = set(msg.get("status") or p.STATES)
        ttype = msg.get("type")
        since = msg.get("since_us", 0)
        limit = min(p.get_int(msg, "limit", 100, lo=0), self.page)
        after = msg.get("after", "")
        rows = [t for t in self.tasks.values() if t["status"] in states
                and (ttype is None or t["type"] == ttype) and t["created_us"] >= since]
        if after:
            ids = [t["id"] for t in rows]
            rows = rows[ids.index(after) + 1:] if after in ids else []
        page = rows[:limit]
        more = len(rows) > len(page)
        return p.reply(p.TASKS, rid, tasks=[{k: v for k, v in t.items() if k != "payload"}
                                            for t in page],
                       next=page[-1]["id"] if more and page else "")

    def _on_logs(self, node: int, ident: bytes, rid: object, msg: dict) -> bytes:
        task = self._get(msg)
        data = self.logs.get(task["id"], b"")
        offset = p.get_int(msg, "offset", 0, lo=0)
        chunk = data[offset:offset + self.log_chunk]
        done = offset + len(chunk) >= len(data) and task["status"] in p.TERMINAL
        return p.reply(p.LOG_CHUNKS, rid, attempt=msg.get("attempt") or 1, data=chunk,
                       offset=offset, done=done)

    def _on_cluster(self, node: int, ident: bytes, rid: object, msg: dict) -> bytes:
        role = "leader" if node == self.leader else "follower"
        leader = "" if self.leader is None else self.advertised[self.leader]
        return p.reply(p.CLUSTER_INFO, rid, node={"id": node + 1, "role": role,
                                                  "endpoint": self.advertised[node]},
                       leader=leader)
