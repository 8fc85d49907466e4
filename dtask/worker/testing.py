"""Test and benchmark doubles: a fake scheduler and a worker subprocess.

`FakeScheduler` is one ROUTER speaking just enough of the protocol to drive a real
worker: it answers `register`, records heartbeats, logs and results (each result of a
`results` batch as if it came alone, with the batch's `id` and `batch` true), acks results,
pushes `run`/`kill`, and can play a follower (NOT_LEADER with a hint), forget the
worker (UNKNOWN_WORKER), drop results, or go silent. It is not a scheduler: it has no
queues, leases or Raft. Tests run it on a thread (`start()`); benchmarks drive it
from their own loop (`step()`, `send_now()`) to keep thread hand-offs out of timings.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from .. import protocol as p


def task(task_id: str, type_: str, payload: Any, *, attempt: int = 1, timeout: float = 0,
         content_type: str = p.JSON, name: str = "") -> dict:
    """A `run` entry; a non-bytes payload is JSON-encoded."""
    if not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    return {"task_id": task_id, "attempt": attempt, "type": type_, "payload": payload,
            "content_type": content_type, "timeout": timeout, "name": name or task_id}


class FakeScheduler:
    def __init__(self, endpoint: str = "tcp://127.0.0.1:*", *,
                 heartbeat_interval: float | None = None, worker_timeout: float = 10.0,
                 batch_results: bool = True) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.heartbeat_interval = heartbeat_interval
        self.worker_timeout = worker_timeout
        self.batch_results = batch_results  # say so in `registered`, as the real leader does
        # behaviour, changeable at any time
        self.mode = "leader"  # "leader" | "not_leader" | "silent"
        self.leader_hint = ""
        self.drop_results = 0  # ignore this many results before acking
        self.refuse_results = 0  # ack this many results with accepted=False (stale)
        self.unknown_worker = 0  # answer this many heartbeats with UNKNOWN_WORKER
        self.refuse_batches = 0  # answer this many `results` with an error (TOO_LARGE)
        self.hold_acks = False  # keep acks (of both kinds) until release_acks()
        self.held: list[tuple[bytes, bytes]] = []
        # what happened
        self.cond = threading.Condition()
        self.received: list[tuple[float, dict]] = []  # (wall time, message)
        self.by_task: dict[str, list[dict]] = {}  # results by task id
        self.batches: list[list[str]] = []  # task ids of each `results` message, in order
        self.bad = 0
        self.routes: dict[str, bytes] = {}  # worker_id -> routing id
        self.outq: queue.Queue[tuple[str | bytes | None, bytes]] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.stopping = False

    # -- driving ------------------------------------------------------------------

    def start(self) -> FakeScheduler:
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stopping = True
        if self.thread is not None:
            self.thread.join(5)
        self.sock.close()
        self.ctx.term()

    def _loop(self) -> None:
        while not self.stopping:
            self.step(0.002)
            while True:
                try:
                    worker, frame = self.outq.get_nowait()
                except queue.Empty:
                    break
                self.send_now(frame, worker)

    def step(self, timeout: float) -> int:
        """Handle what arrives within `timeout` seconds; returns how many messages."""
        n = 0
        if self.sock.poll(int(timeout * 1000)):
            while True:
                try:
                    ident, *frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                n += 1
                self._handle(ident, frames)
        return n

    def send_now(self, frame: bytes | dict, worker: str | bytes | None = None) -> None:
        if isinstance(frame, dict):
            frame = p.pack(frame)
        if isinstance(worker, bytes):  # a routing id already
            ident: bytes | None = worker
        else:
            ident = self.routes.get(worker) if worker else next(
                reversed(self.routes.values()), None)
        if ident is not None:
            self.sock.send_multipart([ident, frame])

    def send(self, frame: bytes | dict, worker: str | bytes | None = None) -> None:
        """Thread-safe: queued for the scheduler's thread."""
        if isinstance(frame, dict):
            frame = p.pack(frame)
        if self.thread is None:
            self.send_now(frame, worker)
        else:
            self.outq.put((worker, frame))

    def run(self, *tasks: dict, worker: str | None = None) -> None:
        self.send({"v": p.VERSION, "t": p.RUN, "tasks": list(tasks)}, worker)

    def kill(self, task_id: str, attempt: int = 1, worker: str | None = None,
             reason: str | None = None) -> None:
        msg = {"v": p.VERSION, "t": p.KILL, "task_id": task_id, "attempt": attempt}
        if reason is not None:
            msg["reason"] = reason
        self.send(msg, worker)

    # -- the protocol, as little as needed -------------------------------------------

    def _handle(self, ident: bytes, frames: list[bytes]) -> None:
        try:
            if len(frames) != 1:
                raise p.ProtocolError(p.BAD_REQUEST, "one frame per message")
            msg = p.unpack(frames[0])
        except p.ProtocolError:
            self.bad += 1
            return
        t, rid = msg["t"], msg.get("id")
        with self.cond:
            if isinstance(msg.get("worker_id"), str):
                self.routes[msg["worker_id"]] = ident
            if t == p.RESULTS:
                items = [{**item, "t": p.RESULT, "worker_id": msg.get("worker_id"), "id": rid,
                          "batch": True}
                         for item in msg.get("results", ())]
                self.batches.append([item.get("task_id") for item in items])
            else:
                items = [msg]
            for item in items:
                self.received.append((time.time(), item))
                if item["t"] == p.RESULT:
                    self.by_task.setdefault(item.get("task_id"), []).append(item)
            self.cond.notify_all()
        reply = None
        if self.mode == "silent":
            return
        if self.mode == "not_leader":
            if t in (p.REGISTER, p.HEARTBEAT, p.RESULT, p.RESULTS):
                reply = p.error(rid, p.NOT_LEADER, "not the leader", leader=self.leader_hint)
        elif t == p.REGISTER:
            fields: dict[str, Any] = {"worker_timeout": self.worker_timeout}
            if self.heartbeat_interval:
                fields["heartbeat_interval"] = self.heartbeat_interval
            if self.batch_results:
                fields["batch_results"] = True
            reply = p.reply(p.REGISTERED, rid, **fields)
        elif t == p.HEARTBEAT and self.unknown_worker > 0:
            self.unknown_worker -= 1
            reply = p.error(rid, p.UNKNOWN_WORKER, "register again")
        elif t == p.RESULTS and self.refuse_batches > 0:
            self.refuse_batches -= 1
            reply = p.error(rid, p.TOO_LARGE, "refused by the test")
        elif t == p.RESULT:
            accepted = self._take_result()
            if accepted is not None:
                reply = p.reply(p.RESULT_ACK, rid, task_id=msg["task_id"],
                                attempt=msg["attempt"], accepted=accepted)
        elif t == p.RESULTS:
            acks = [[item["task_id"], item["attempt"], accepted] for item in items
                    if (accepted := self._take_result()) is not None]
            if acks:  # all dropped: no answer at all, as from a leader that died
                reply = p.reply(p.RESULTS_ACK, rid, acks=acks)
        if reply is not None:
            if self.hold_acks and t in (p.RESULT, p.RESULTS):
                self.held.append((ident, reply))
            else:
                self.sock.send_multipart([ident, reply])

    def _take_result(self) -> bool | None:
        """How to ack the next result: None (drop it), True, or False (stale)."""
        if self.drop_results > 0:
            self.drop_results -= 1
            return None
        self.refuse_results -= 1
        return self.refuse_results < 0

    def release_acks(self) -> None:
        """Send the held acks (thread-safe) and stop holding them."""
        with self.cond:
            self.hold_acks = False
            held, self.held = self.held, []
        for ident, reply in held:
            self.send(reply, ident)

    # -- looking at what happened ------------------------------------------------------

    def messages(self, t: str | None = None, **match: Any) -> list[dict]:
        with self.cond:
            return [m for _, m in self.received if (t is None or m["t"] == t)
                    and all(m.get(k) == v for k, v in match.items())]

    def results(self, task_id: str | None = None) -> list[dict]:
        if task_id is None:
            return self.messages(p.RESULT)
        with self.cond:
            return list(self.by_task.get(task_id, ()))

    def result(self, task_id: str) -> dict | None:
        with self.cond:
            found = self.by_task.get(task_id)
            return found[0] if found else None

    def log_chunks(self, task_id: str) -> list[dict]:
        return self.messages(p.LOG, task_id=task_id)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0,
                 what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                self.cond.release()
                try:
                    value = predicate()
                finally:
                    self.cond.acquire()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self.cond.wait(min(left, 0.05))

    def wait_result(self, task_id: str, timeout: float = 10.0) -> dict:
        return self.wait_for(lambda: self.result(task_id), timeout, f"result of {task_id}")


class WorkerProcess:
    """`python -m dtask.worker` as a subprocess, its stderr kept in a file."""

    def __init__(self, endpoints: list[str], *args: str, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix="dtask-worker-", suffix=".log")
        argv = [sys.executable, "-m", "dtask.worker"]
        for ep in endpoints:
            argv += ["--endpoint", ep]
        try:
            self.proc = subprocess.Popen([*argv, *args], stdin=subprocess.DEVNULL, stdout=fd,
                                         stderr=fd, env={**os.environ, **(env or {})}, cwd=cwd)
        finally:
            os.close(fd)

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        os.unlink(self.log_path)
