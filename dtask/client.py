"""The Python client of DTask: submit tasks, follow them, find and follow the leader.

    from dtask.client import Client
    with Client("tcp://10.0.0.1:7300,tcp://10.0.0.2:7300,tcp://10.0.0.3:7300") as c:
        task_id = c.submit("shell", {"cmd": "echo hi"}, priority=5, delay=30)
        print(c.wait(task_id, timeout=60)["status"])

How it works (docs/protocol.md is the reference):

- One background I/O thread owns every ZeroMQ socket: a DEALER per scheduler endpoint
  (ZeroMQ sockets are not thread-safe). Caller threads pack their request, append it
  to a list and wake the I/O thread through an eventfd; replies are matched to
  futures by request id, so any number of requests share one connection.
- The I/O thread polls the believed leader's socket and connection monitor only: in
  zmq_poll every ZeroMQ socket costs four system calls per loop turn, and with every
  DEALER and monitor polled that was about half of a synchronous request's system
  calls. The other endpoints' sockets are swept every 10 ms while requests are
  outstanding (they carry late replies, and answers during a failover, which then
  waits that much longer).
- Lazy Pirate retries: a request goes to the believed leader; NOT_LEADER sends it to
  the leader named in the reply (or the next endpoint), no reply within the
  per-attempt timeout or a disconnected endpoint sends it to the next endpoint,
  UNAVAILABLE backs off and moves on. The same bytes (same request id, same
  idempotency keys) are resent every time, so a retried submit never creates a
  second task. After `timeout` seconds overall the request fails with `Unavailable`.
- `max_in_flight` bounds outstanding requests: callers block when it is reached.
- One-task submits that queue up while the I/O thread is busy (a caller with many
  `submit_async` in flight) go out as one multi-task submit: the scheduler's cost is
  mostly per message. No delay is added to wait for company. If the scheduler refuses
  such a message (BAD_REQUEST, TOO_LARGE), each task is sent again on its own, so one
  bad task fails only its own future.
"""

from __future__ import annotations

import datetime as _dt
import heapq
import itertools
import math
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import msgpack
import zmq

from . import protocol as p
from .cronclient import CronMixin
from .errors import (  # noqa: F401  (re-exported: dtask.client is where callers look)
    CLOSED,
    BadRequest,
    Conflict,
    DTaskError,
    TaskNotFound,
    TooLarge,
    Unavailable,
    error_for,
)
from .taskspec import (
    MAX_SECONDS,
    bad_request,
    check_ident,
    check_number,
    encode_task,
    epoch_us,
)
from .wakeup import Wakeup

__all__ = ["Client", "DTaskError", "TaskNotFound", "Conflict", "BadRequest", "TooLarge",
           "Unavailable"]

# -- replies -------------------------------------------------------------------------

def _whole(msg: dict) -> dict:
    return msg


def _first_id(msg: dict) -> str:
    return msg["task_ids"][0]


def _ids(msg: dict) -> list[str]:
    return msg["task_ids"]


def _task(msg: dict) -> dict:
    return msg["task"]


def normalise_endpoint(endpoint: str) -> str:
    """Canonical form for comparing endpoints: lower case, no spaces, localhost → 127.0.0.1."""
    ep = endpoint.strip().rstrip("/").lower()
    return ep.replace("://localhost:", "://127.0.0.1:", 1)


def _monitor_event(frames: list[bytes]) -> int:
    """The event number of a ZeroMQ socket-monitor message: its first frame starts
    with a 16-bit event id. (zmq.utils.monitor does the same but imports asyncio,
    a fifth of dtaskctl's start-up time.)"""
    return struct.unpack_from("=H", frames[0])[0]


def parse_endpoints(endpoints: str | Iterable[str]) -> list[str]:
    """A list of endpoints or one comma-separated string; duplicates dropped, order kept."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"an endpoint must be a string like tcp://host:port, got {item!r}")
        ep = item.strip()
        if not ep:
            continue
        if "://" not in ep:
            raise ValueError(f"endpoint {ep!r} must look like tcp://host:port")
        if normalise_endpoint(ep) not in map(normalise_endpoint, out):
            out.append(ep)
    if not out:
        raise ValueError("no scheduler endpoints given")
    return out


# -- the I/O thread's view of one request ---------------------------------------------

# awaiting a reply from `target` / sleeping before a resend / waiting for `target`
# to finish connecting (a fresh socket's handshake takes a moment; don't skip it)
_SENT, _WAITING, _PARKED = 1, 2, 3
_UP_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED
_DOWN_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_BACKOFF_MIN, _BACKOFF_MAX = 0.005, 0.5
_NOTHING_YET = "no attempt finished"
_WRITES = frozenset({p.SUBMITTED, p.CANCELLED_REPLY})  # reply types of requests with effects
_PER_TASK = 0.0001  # extra attempt time per task in a submit batch (big batches are slow)
_SWEEP = 0.01  # s between reads of the sockets not polled, while requests are outstanding
# submit_async calls queued while the I/O thread was busy go out as one submit message
# of up to this many tasks / bytes: the scheduler's cost is mostly per message.
_COALESCE_TASKS, _COALESCE_BYTES = 1000, 4 << 20


class _Request:
    __slots__ = ("rid", "frame", "future", "convert", "expect", "deadline", "attempt",
                 "target", "state", "timer", "hops", "backoffs", "last", "leader_only",
                 "slot", "spec", "members")

    def __init__(self, rid: int, frame: bytes, future: Future, convert: Callable,
                 expect: str, deadline: float, attempt: float, leader_only: bool,
                 slot: bool) -> None:
        self.rid = rid
        self.frame = frame  # packed once; every retry resends these exact bytes
        self.future = future
        self.convert = convert
        self.expect = expect  # the reply type that answers it
        self.deadline = deadline  # give up (Unavailable) at this monotonic time
        self.attempt = attempt  # per-attempt timeout, seconds
        self.leader_only = leader_only  # a success reply proves the sender is the leader
        self.slot = slot  # holds one of the max_in_flight slots
        self.target = 0
        self.state = 0
        self.timer = 0  # the live timer's sequence number; older heap entries are stale
        self.hops = 0  # immediate re-routes since the last backoff
        self.backoffs = 0
        self.last = _NOTHING_YET  # why the last attempt failed, for the error
        self.spec = b""  # a one-task submit: its packed task, to share a message with others
        self.members: list[_Request] = []  # a shared submit: the requests it answers


class Client(CronMixin):
    """A thread-safe client of a DTask cluster.

    endpoints: the schedulers' client endpoints, a list of "tcp://host:port" or one
    comma-separated string. timeout: seconds a request may take overall, across
    retries, before it fails with `Unavailable`. max_in_flight: outstanding requests
    before callers block (back-pressure). attempt_timeout: seconds to wait for one
    endpoint before trying the next (default min(1, timeout / 3)).

    Future callbacks run on the client's I/O thread: keep them short, and do not call
    the blocking methods from them.
    """

    def __init__(self, endpoints: str | list[str], timeout: float = 5.0, *,
                 max_in_flight: int = 1024, attempt_timeout: float | None = None) -> None:
        self.endpoints: tuple[str, ...] = tuple(parse_endpoints(endpoints))
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if type(max_in_flight) is not int or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
        self.timeout = float(timeout)
        self.attempt_timeout = float(attempt_timeout or min(1.0, max(self.timeout / 3, 0.05)))
        self.max_in_flight = max_in_flight
        self._norm = {normalise_endpoint(ep): i for i, ep in enumerate(self.endpoints)}
        self._ids = itertools.count(1)  # request ids; next() is atomic under the GIL
        self._keys = itertools.count(1)
        self._key_prefix = uuid.uuid4().hex + "-"  # + a counter: unique, ~20x cheaper
        self._tls = threading.local()  # a Packer per caller thread (Packer is not shared)
        # _lock guards _pending, _wake_pending, _closed and _outstanding.
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # signalled when slots free up
        self._outstanding = 0  # requests holding one of the max_in_flight slots
        self._blocked = 0  # callers waiting for a slot
        self._freed = 0  # slots freed by the I/O thread, handed back once per loop turn
        self._pending: list[_Request] = []
        self._wake_pending = False
        self._closed = False
        self._leader = 0  # index of the believed leader; written by the I/O thread only
        self._inflight: dict[int, _Request] = {}
        self._timers: list[tuple[float, int, _Request]] = []
        self._timer_seq = itertools.count(1)
        self._next_sweep = 0.0  # monotonic time of the next read of the unpolled sockets
        self.late_replies = 0  # replies to finished requests (duplicates of retries)
        self.bad_replies = 0  # frames that were not valid replies
        self._ctx = zmq.Context()
        try:
            self._open_sockets()
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self._io_ident = 0
        self._release_on_exit = False
        self._thread = threading.Thread(target=self._run, name="dtask-client-io", daemon=True)
        self._thread.start()

    def _open_sockets(self) -> None:
        # Created here, used only by the I/O thread from now on (thread start is a barrier).
        self._wake = Wakeup()  # callers notify, the I/O thread polls wake.fd
        self._socks: list[zmq.Socket] = []
        self._monitors: list[zmq.Socket] = []
        # Per endpoint: None until its first connection attempt resolves, then whether
        # it is connected. Only the I/O thread touches these after start.
        self._up: list[bool | None] = [None] * len(self.endpoints)
        self._parked: list[list[_Request]] = [[] for _ in self.endpoints]
        hwm = max(1000, 4 * self.max_in_flight)
        for ep in self.endpoints:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            # IMMEDIATE: never queue to an endpoint that is not connected, so a dead
            # scheduler is skipped at once instead of swallowing requests until timeout.
            s.setsockopt(zmq.IMMEDIATE, 1)
            s.setsockopt(zmq.SNDHWM, hwm)
            s.setsockopt(zmq.RCVHWM, hwm)
            s.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME)
            s.setsockopt(zmq.RECONNECT_IVL, 100)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            try:
                s.connect(ep)
            except zmq.ZMQError as exc:
                s.close(0)
                raise ValueError(f"bad endpoint {ep!r}: {exc}") from None
            self._socks.append(s)
            # Connection events: a disconnect means replies to requests sent there will
            # never come; a refused connection means the node is down, skip it.
            self._monitors.append(s.get_monitor_socket(_UP_EVENTS | _DOWN_EVENTS))

    # -- public API ---------------------------------------------------------------------

    @property
    def leader(self) -> str:
        """The endpoint this client currently believes is the leader."""
        return self.endpoints[self._leader]

    def submit(self, type: str, payload: object = None, **options: Any) -> str:
        """Submit one task and return its id once the cluster has committed it.

        payload: bytes are sent as-is (application/octet-stream unless content_type
        says otherwise); anything else is JSON-encoded (TypeError if it cannot be).
        options: name, priority, delay (seconds), at (datetime, naive = local time, or
        epoch seconds), timeout, max_retries, backoff ({initial, multiplier, max_delay,
        jitter} or a number = initial), queue, labels, idempotency_key, task_id,
        content_type. Invalid options raise BadRequest/TooLarge (both ValueError)
        before anything is sent. Without an idempotency_key the client makes one, so
        its own retries never duplicate the task.
        """
        return self._result(self.submit_async(type, payload, **options))

    def submit_async(self, type: str, payload: object = None,
                     **options: Any) -> Future[str]:
        """Like `submit`, but return at once with a Future of the task id.

        Many submissions can be in flight on one client; when `max_in_flight` are
        outstanding this call blocks until one completes. Submissions that queue up
        together share one message. Validation errors are raised here, not through
        the future.
        """
        packer = self._packer()
        spec = packer.pack(encode_task(type, payload, options, self._new_key))
        rid = next(self._ids)
        return self._enqueue(rid, _submit_frame(packer, rid, [spec]), p.SUBMITTED, _first_id,
                             _PER_TASK, True, spec)

    def submit_many(self, tasks: list[dict]) -> list[str]:
        """Submit many tasks in one round trip; their ids, in order.

        Each dict has "type", optionally "payload", and any submit option. Batches
        over protocol.MAX_BATCH tasks (or ~16 MiB of payload) are split into several
        messages sent concurrently. Nothing is sent if any task is invalid.
        """
        specs = []
        for i, task in enumerate(tasks):
            if not isinstance(task, dict) or "type" not in task:
                raise bad_request(f"task {i}: each task must be a dict with a 'type'")
            options = dict(task)
            ttype, payload = options.pop("type"), options.pop("payload", None)
            try:
                specs.append(encode_task(ttype, payload, options, self._new_key))
            except DTaskError as exc:  # say which task
                raise type(exc)(exc.code, f"task {i}: {exc.message}") from None
            except TypeError as exc:
                raise TypeError(f"task {i}: {exc}") from None
        futures = [(len(chunk), self._send(p.SUBMIT, {"tasks": chunk}, p.SUBMITTED, _ids,
                                           _PER_TASK * len(chunk)))
                   for chunk in _chunks(specs)]
        out: list[str] = []
        for n, fut in futures:
            ids = self._result(fut)
            if len(ids) != n:
                raise DTaskError(p.INTERNAL, f"the scheduler returned {len(ids)} ids for "
                                 f"{n} tasks")
            out.extend(ids)
        return out

    def status(self, task_id: str, *, stale: bool = False) -> dict:
        """The task as a dict (id, status, attempts, ...; see docs/protocol.md).

        By default the leader answers after confirming it is still the leader
        (linearizable: reflects every acknowledged write). stale=True lets any
        scheduler answer from its own replica: cheaper and available without a
        leader, but possibly behind.
        """
        body: dict[str, Any] = {"task_id": check_ident("task_id", task_id)}
        if stale:
            body["stale"] = True
        return self._call(p.STATUS, body, p.TASK, _task, leader_only=not stale)

    def wait(self, task_id: str, timeout: float | None = None) -> dict:
        """Block until the task is COMPLETED, FAILED or CANCELLED; return it.

        The scheduler holds the request until the task finishes (long poll, re-issued
        every 30 s). Raises TimeoutError if it is not finished after `timeout` seconds
        (None: wait forever).
        """
        check_ident("task_id", task_id)
        end = None if timeout is None else time.monotonic() + check_number(
            "timeout", timeout, 0.0, MAX_SECONDS)
        while True:
            chunk = 30.0 if end is None else max(0.0, min(30.0, end - time.monotonic()))
            reply = self._call(p.WAIT, {"task_id": task_id, "timeout": chunk}, p.TASK,
                               _whole, extra=chunk)
            task = reply["task"]
            if reply.get("done") or task.get("status") in p.TERMINAL:
                return task
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"task {task_id} is still {task.get('status')} after "
                                   f"{timeout:g} s")

    def list(self, status: str | Iterable[str] | None = None, type: str | None = None,
             since: _dt.datetime | float | None = None, limit: int | None = 100
             ) -> list[dict]:
        """Tasks (without payloads), oldest first, following the cursor up to `limit`.

        status: one state or several; type: a task type; since: only tasks created at
        or after this datetime / epoch seconds; limit: None for all.
        """
        body: dict[str, Any] = {}
        if status is not None:
            states = [status] if isinstance(status, str) else list(status)
            states = [s.upper() if isinstance(s, str) else s for s in states]
            for s in states:
                if s not in p.STATES:
                    raise bad_request(f"unknown status {s!r}; one of {', '.join(p.STATES)}")
            body["status"] = states
        if type is not None:
            body["type"] = check_ident("type", type, 64)
        if since is not None:
            body["since_us"] = epoch_us("since", since)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 0):
            raise bad_request(f"limit must be a non-negative integer or None, got {limit!r}")
        out: list[dict] = []
        cursor = ""
        while limit is None or len(out) < limit:
            page = dict(body, limit=1000 if limit is None else min(1000, limit - len(out)))
            if cursor:
                page["after"] = cursor
            reply = self._call(p.LIST, page, p.TASKS, _whole)
            out.extend(reply["tasks"])
            nxt = reply.get("next") or ""
            if not nxt or not reply["tasks"] or nxt == cursor:
                break
            cursor = nxt
        return out if limit is None else out[:limit]

    def cancel(self, task_id: str) -> dict:
        """Cancel a task; return it. Pending/scheduled/retrying tasks end CANCELLED at
        once; a running one keeps status RUNNING with cancel_requested until its worker
        has killed it. Cancelling a CANCELLED task returns it; a COMPLETED or FAILED one
        raises Conflict.
        """
        return self._call(p.CANCEL, {"task_id": check_ident("task_id", task_id)},
                          p.CANCELLED_REPLY, _task)

    def logs(self, task_id: str, attempt: int = 0) -> bytes:
        """The captured output of one attempt (0: the latest), as far as it goes now."""
        check_ident("task_id", task_id)
        if type(attempt) is not int or attempt < 0:
            raise bad_request(f"attempt must be a non-negative integer, got {attempt!r}")
        out = bytearray()
        offset = 0
        while True:
            reply = self._call(p.LOGS, {"task_id": task_id, "attempt": attempt,
                                        "offset": offset}, p.LOG_CHUNKS, _whole)
            data = reply.get("data") or b""
            out += data
            # Pin the attempt the first reply resolved, so a new attempt starting while
            # we read does not splice two outputs together.
            attempt = reply.get("attempt") or attempt
            if reply.get("done", True) or not data:  # empty + not done: caught up, running
                return bytes(out)
            offset = reply.get("offset", offset) + len(data)

    def cluster(self) -> dict:
        """What one scheduler (the believed leader, else any) says about the cluster."""
        reply = self._call(p.CLUSTER, {}, p.CLUSTER_INFO, _whole, leader_only=False)
        return {k: v for k, v in reply.items() if k not in ("v", "t", "id")}

    def drain_worker(self, worker_id: str) -> None:
        """Ask a worker (through the leader) to finish its tasks, deregister and exit."""
        self._call(p.DRAIN_WORKER, {"worker_id": check_ident("worker_id", worker_id)}, p.DRAIN_OK,
                   _whole)

    def transfer_leader(self, to: int = 0) -> int:
        """Ask the leader to hand leadership to node `to` (0: the most caught-up voter);
        returns the target. The transfer itself completes within an election timeout."""
        reply = self._call(p.TRANSFER_LEADER, {"to": int(to)}, p.TRANSFER_OK, _whole)
        return reply["to"]

    def member_change(self, op: str, node_id: int, raft: str = "", client: str = "") -> dict:
        """Change the scheduler membership, one step at a time: "add_learner" (with the
        new node's raft and client endpoints), "promote" (once it caught up), "remove".
        Returns {"voters": [...], "learners": [...]} after the change applied."""
        if op not in p.MEMBER_OPS:
            raise bad_request(f"op must be one of {', '.join(p.MEMBER_OPS)}, got {op!r}")
        body = {"op": op, "node_id": int(node_id)}
        if op == "add_learner":
            for name, value in (("raft", raft), ("client", client)):
                if not p.is_endpoint(normalise_endpoint(value)):
                    raise bad_request(f"{name} endpoint must be tcp://HOST:PORT, got {value!r}")
            body.update(raft=normalise_endpoint(raft), client=normalise_endpoint(client))
        return self._call(p.MEMBER_CHANGE, body, p.MEMBER_OK,
                          lambda msg: {"voters": msg["voters"], "learners": msg["learners"]})

    def close(self) -> None:
        """Fail outstanding requests (code CLOSED), stop the I/O thread, close sockets."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
            self._wake.notify()
        if threading.get_ident() == self._io_ident:
            self._release_on_exit = True  # can't join ourselves: clean up on the way out
            return
        self._thread.join()
        self._release()

    def _release(self) -> None:
        self._wake.close()  # the I/O thread is gone; late callers see _closed first
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- caller side ----------------------------------------------------------------------

    def _new_key(self) -> str:
        return f"{self._key_prefix}{next(self._keys):x}"

    def _call(self, msg_type: str, body: dict, expect: str, convert: Callable,
              extra: float = 0.0, leader_only: bool = True) -> Any:
        return self._result(self._send(msg_type, body, expect, convert, extra, leader_only))

    def _result(self, fut: Future) -> Any:
        if threading.get_ident() == self._io_ident:
            raise RuntimeError("blocking Client methods cannot be called from a future "
                               "callback (it runs on the client's I/O thread)")
        return fut.result()

    def _send(self, msg_type: str, body: dict, expect: str, convert: Callable,
              extra: float = 0.0, leader_only: bool = True) -> Future:
        rid = next(self._ids)
        msg = {"v": p.VERSION, "t": msg_type, "id": rid}
        msg.update(body)
        return self._enqueue(rid, self._packer().pack(msg), expect, convert, extra, leader_only)

    def _packer(self) -> msgpack.Packer:
        packer = getattr(self._tls, "packer", None)
        if packer is None:
            packer = self._tls.packer = msgpack.Packer(use_bin_type=True)
        return packer

    def _enqueue(self, rid: int, frame: bytes, expect: str, convert: Callable, extra: float,
                 leader_only: bool, spec: bytes = b"") -> Future:
        if self._closed:
            raise DTaskError(CLOSED, "the client is closed")
        if len(frame) > p.MAX_FRAME:
            raise TooLarge(p.TOO_LARGE, f"message of {len(frame)} bytes exceeds the "
                           f"{p.MAX_FRAME}-byte frame limit")
        fut: Future = Future()
        fut.set_running_or_notify_cancel()  # a sent request cannot be taken back
        # The I/O thread must never block on its own back-pressure (callbacks submit).
        slot = threading.get_ident() != self._io_ident
        req = _Request(rid, frame, fut, convert, expect, 0.0, self.attempt_timeout + extra,
                       leader_only, slot)
        req.spec = spec
        with self._lock:
            while slot and self._outstanding >= self.max_in_flight and not self._closed:
                self._blocked += 1
                self._room.wait()
                self._blocked -= 1
            if self._closed:
                raise DTaskError(CLOSED, "the client is closed")
            self._outstanding += slot
            # The clock starts once the request is admitted, not while it waited for room.
            req.deadline = time.monotonic() + self.timeout + extra
            self._pending.append(req)
            if not self._wake_pending:  # one wake-up per batch, not per request
                self._wake_pending = True
                self._wake.notify()
        return fut

    # -- the I/O thread ---------------------------------------------------------------------

    def _run(self) -> None:
        self._io_ident = threading.get_ident()
        error: DTaskError = DTaskError(CLOSED, "the client was closed")
        try:
            self._loop()
        except BaseException as exc:  # never leave a caller waiting on a dead thread
            error = DTaskError(p.INTERNAL, f"client I/O thread failed: {exc!r}")
            with self._lock:
                self._closed = True
            raise
        finally:
            with self._lock:
                pending, self._pending = self._pending, []
            for req in itertools.chain(list(self._inflight.values()), pending):
                self._fail(req, error)
            with self._lock:  # wake blocked callers: they will see the client closed
                self._room.notify_all()
            for mon, sock in zip(self._monitors, self._socks, strict=True):
                sock.disable_monitor()
                mon.close(0)
                sock.close(0)
            if self._release_on_exit:  # close() was called from a callback
                self._release()

    def _loop(self) -> None:
        wake = self._wake.fd
        poller, polled = zmq.Poller(), -1
        while True:
            if polled != self._leader:  # the leader's sockets only (module docstring)
                polled = self._leader
                poller = zmq.Poller()
                poller.register(wake, zmq.POLLIN)
                poller.register(self._socks[polled], zmq.POLLIN)
                poller.register(self._monitors[polled], zmq.POLLIN)
            due = self._timers[0][0] if self._timers else math.inf
            if self._inflight:
                due = min(due, self._next_sweep)
            timeout = None
            if due < math.inf:
                timeout = max(0, math.ceil((due - time.monotonic()) * 1000))
            for key, _ in poller.poll(timeout):
                if key == wake:
                    self._wake.take()
                elif key is self._socks[polled]:
                    self._read(polled)
                else:
                    self._connection_events(polled)
            if self._closed:
                return
            if self._inflight and time.monotonic() >= self._next_sweep:
                self._sweep(polled)
            if self._pending:
                with self._lock:
                    batch, self._pending = self._pending, []
                    self._wake_pending = False
                now = time.monotonic()
                inflight = self._inflight
                if not inflight:  # the first sweep is due a full interval from now
                    self._next_sweep = now + _SWEEP
                for req in self._coalesce(batch):
                    inflight[req.rid] = req
                    req.target = self._leader
                    self._dispatch(req, now)
            if self._timers:
                self._fire_timers()
            if self._freed:
                self._free_slots()

    def _sweep(self, polled: int) -> None:
        """Read the sockets of the endpoints that are not polled (see the docstring)."""
        for i in range(len(self._socks)):
            if i != polled:
                self._connection_events(i)
                self._read(i)
        self._next_sweep = time.monotonic() + _SWEEP

    def _coalesce(self, batch: list[_Request]) -> list[_Request]:
        """One-task submits queued together share one message (a caller with many
        submit_async in flight); everything else goes out as it came."""
        out: list[_Request] = []
        run: list[_Request] = []
        size = 0
        for req in batch:
            if run and (not req.spec or len(run) == _COALESCE_TASKS
                        or size + len(req.spec) > _COALESCE_BYTES):
                out.append(self._shared(run))
                run, size = [], 0
            if req.spec:
                run.append(req)
                size += len(req.spec)
            else:
                out.append(req)
        if run:
            out.append(self._shared(run))
        return out

    def _shared(self, members: list[_Request]) -> _Request:
        if len(members) == 1:
            return members[0]
        rid = next(self._ids)
        frame = _submit_frame(self._packer(), rid, [m.spec for m in members])
        req = _Request(rid, frame, Future(), _ids, p.SUBMITTED,
                       min(m.deadline for m in members),
                       self.attempt_timeout + _PER_TASK * len(members), True, False)
        req.future.set_running_or_notify_cancel()
        req.members = members
        return req

    def _free_slots(self) -> None:
        with self._lock:
            self._outstanding -= self._freed
            self._freed = 0
            if self._blocked:
                self._room.notify(self._blocked)

    def _dispatch(self, req: _Request, now: float) -> None:
        """Send req to its target now, or give up if its time is over."""
        while True:
            if now >= req.deadline:
                note = ("; the outcome is unknown (retry with the same idempotency key)"
                        if req.expect in _WRITES else "")
                self._fail(req, Unavailable(p.UNAVAILABLE, (
                    f"no leader answered within {self.timeout:g} s (last: {req.last}){note}")))
                return
            try:
                self._socks[req.target].send(req.frame, zmq.NOBLOCK)
            except zmq.Again:  # not connected (IMMEDIATE) or its queue is full
                if self._up[req.target] is None:  # still connecting: give it a moment
                    req.state = _PARKED
                    self._parked[req.target].append(req)
                    self._arm(req, now + min(req.attempt, req.deadline - now))
                    return
                req.last = f"{self.endpoints[req.target]} is not connected"
                if self._next(req, now):
                    continue
                return
            req.state = _SENT
            self._arm(req, now + min(req.attempt, req.deadline - now))
            return

    def _next(self, req: _Request, now: float, target: int | None = None,
              backoff: bool = False) -> bool:
        """Move req to `target` (default: the next endpoint). True: send it now; False:
        a timer will resend it after a backoff (after a full tour of the endpoints
        without an answer, or when asked)."""
        if target is not None:
            self._leader = target  # a fresh hint from the cluster
        else:
            target = (req.target + 1) % len(self._socks)
            if self._leader == req.target:  # don't send new requests where this one failed
                self._leader = target
        req.target = target
        req.hops += 1
        if not backoff and req.hops <= len(self._socks):
            return True
        delay = min(_BACKOFF_MAX, _BACKOFF_MIN * (2 ** req.backoffs))
        delay *= random.uniform(0.5, 1.0)  # clients must not retry in lockstep
        req.backoffs += 1
        req.hops = 0
        req.state = _WAITING
        self._arm(req, min(now + delay, req.deadline))
        return False

    def _arm(self, req: _Request, when: float) -> None:
        seq = next(self._timer_seq)
        req.timer = seq
        heapq.heappush(self._timers, (when, seq, req))

    def _fire_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, seq, req = heapq.heappop(timers)
            if req.timer != seq:
                continue  # answered or re-armed since
            if req.state != _WAITING:  # _SENT or _PARKED: the attempt timed out
                # ...unless the overall deadline cut it short: then the previous
                # failure (e.g. NOT_LEADER during an election) is the better explanation.
                if now < req.deadline or req.last is _NOTHING_YET:
                    req.last = (f"no reply from {self.endpoints[req.target]} within "
                                f"{min(req.attempt, self.timeout):g} s")
                req.hops = 0  # time has passed; a tour of silent nodes needs no backoff
                if not self._next(req, now):
                    continue
            self._dispatch(req, now)

    def _read(self, i: int) -> None:
        sock = self._socks[i]
        inflight = self._inflight
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = msgpack.unpackb(frame, raw=False)
                req = inflight.get(msg["id"])
                kind = msg["t"]
            except Exception:
                self.bad_replies += 1
                continue
            if req is None:
                self.late_replies += 1
            elif kind == req.expect:
                if req.leader_only:
                    self._leader = i
                self._finish(req, msg)
            elif kind == p.ERROR:
                self._error(req, i, msg)
            else:
                self._fail(req, DTaskError(p.INTERNAL, f"unexpected reply type {kind!r}"))

    def _error(self, req: _Request, i: int, msg: dict) -> None:
        code = msg.get("code")
        text = msg.get("message", "")
        if code not in (p.NOT_LEADER, p.UNAVAILABLE):
            self._fail(req, error_for(str(code), str(text)))
            return
        if i != req.target or req.state != _SENT:
            return  # about an earlier attempt; the current one will answer for itself
        req.last = f"{code} from {self.endpoints[i]}: {text}"
        now = time.monotonic()
        if code == p.UNAVAILABLE:  # no quorum or shutting down: wait, then another node
            self._next(req, now, backoff=True)
            return
        hint = msg.get("leader")
        target = self._norm.get(normalise_endpoint(hint)) if isinstance(hint, str) else None
        if hint and target is None:
            req.last += f" (leader {hint} is not among this client's endpoints)"
        if target == i:
            target = None  # a node naming itself while refusing: try the others
        if self._next(req, now, target):
            self._dispatch(req, now)

    def _connection_events(self, i: int) -> None:
        mon = self._monitors[i]
        up = self._up[i]
        while True:
            try:
                event = _monitor_event(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            up = bool(event & _UP_EVENTS)
        if up is None or up == self._up[i]:
            return
        self._up[i] = up
        now = time.monotonic()
        parked = [r for r in self._parked[i] if r.state == _PARKED and r.target == i
                  and not r.future.done()]
        self._parked[i] = []
        if up:
            for req in parked:
                self._dispatch(req, now)
            return
        # Down: requests waiting on this node, or for its reply, are lost with it.
        lost = [r for r in self._inflight.values() if r.target == i and r.state == _SENT]
        for req in parked + lost:
            req.last = f"{self.endpoints[i]} is down (connection refused or lost)"
            req.hops = 0
            if self._next(req, now):
                self._dispatch(req, now)

    def _finish(self, req: _Request, msg: dict) -> None:
        del self._inflight[req.rid]
        req.timer = 0
        self._freed += req.slot
        try:
            result = req.convert(msg)
            if req.members and len(result) != len(req.members):
                raise ValueError(f"{len(result)} ids for {len(req.members)} tasks")
        except Exception as exc:
            self._fail(req, DTaskError(p.INTERNAL, f"malformed {msg.get('t')} reply: {exc!r}"))
            return
        req.future.set_result(result)
        if req.members:
            for member, task_id in zip(req.members, result, strict=True):
                self._freed += member.slot
                member.future.set_result(task_id)

    def _fail(self, req: _Request, exc: BaseException) -> None:
        if req.future.done():
            return  # already answered (the future is the one source of truth)
        self._inflight.pop(req.rid, None)
        req.timer = 0
        self._freed += req.slot
        req.future.set_exception(exc)
        if req.members and isinstance(exc, (BadRequest, TooLarge)):
            # One task the scheduler refused (e.g. over its payload limit) must not fail
            # the others: each goes again on its own and gets its own answer.
            now = time.monotonic()
            for member in req.members:
                self._inflight[member.rid] = member
                member.target = self._leader
                self._dispatch(member, now)
            return
        for member in req.members:
            self._fail(member, exc)


def _submit_frame(packer: msgpack.Packer, rid: int, packed_specs: list[bytes]) -> bytes:
    """A submit message around tasks packed beforehand (the same bytes as packing the
    whole map), so that one-task submits can be joined without packing them again."""
    return b"".join([packer.pack_map_header(4), packer.pack("v"), packer.pack(p.VERSION),
                     packer.pack("t"), packer.pack(p.SUBMIT), packer.pack("id"),
                     packer.pack(rid), packer.pack("tasks"),
                     packer.pack_array_header(len(packed_specs)), *packed_specs])


def _chunks(specs: list[dict], max_bytes: int = 16 << 20) -> list[list[dict]]:
    """Split a batch so that no message exceeds the task or frame limits."""
    out: list[list[dict]] = []
    chunk: list[dict] = []
    size = 0
    for spec in specs:
        n = len(spec["payload"]) + 256
        if chunk and (len(chunk) >= p.MAX_BATCH or size + n > max_bytes):
            out.append(chunk)
            chunk, size = [], 0
        chunk.append(spec)
        size += n
    if chunk:
        out.append(chunk)
    return out
