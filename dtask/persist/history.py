"""History reads (tasks the live state has purged) on a thread of their own.

The scheduler's loop must never wait for the database, so it queues a read with a
reply callback and carries on; this thread runs it on its own connection and wakes
the loop (an eventfd, `dtask.wakeup`, as in `dtask.raft.writer`), whose `poll` calls
the replies. Every request is answered within `timeout`: if the database is down or
slow, with `StoreUnavailable`, never by hanging. While the database is down,
requests fail at once until the next reconnect attempt (capped exponential backoff).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from ..wakeup import Wakeup
from .store import Store, StoreUnavailable, open_store, redact

log = logging.getLogger("dtask.persist")

KINDS = ("get_task", "list_tasks", "list_purged", "get_log")
Reply = Callable[[object, Exception | None], None]



class _Request:
    __slots__ = ("kind", "args", "reply", "deadline", "done")

    def __init__(self, kind: str, args: tuple, reply: Reply, deadline: float) -> None:
        self.kind, self.args, self.reply, self.deadline = kind, args, reply, deadline
        self.done = False  # replied (set on the loop thread only)


class HistoryReader:
    def __init__(self, dsn: str, name: str = "history",
                 timeout: float = 2.0, max_waiting: int = 1000) -> None:
        self.dsn = dsn
        self.name = redact(dsn)
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.wake = Wakeup()  # the loop polls wake.fd
        self._jobs: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._completed: deque[tuple[_Request, object, Exception | None]] = deque()
        self._waiting: deque[_Request] = deque()  # loop side, in deadline order
        self._store: Store | None = None
        self._retry_at = 0.0  # while down: no reconnect before this (monotonic)
        self._delay = 0.1
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ------------------------------------------------------------------ loop side

    def start(self) -> None:
        self._thread.start()

    def request(self, kind: str, args: tuple, reply: Reply) -> None:
        """Queue a read: `reply(result, None)` or `reply(None, error)` comes from `poll`.

        Raises StoreUnavailable at once when `max_waiting` reads are waiting already.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown history read {kind!r}")
        self._expire(time.monotonic())
        if len(self._waiting) >= self.max_waiting:
            raise StoreUnavailable("history reader busy")
        req = _Request(kind, args, reply, time.monotonic() + self.timeout)
        self._waiting.append(req)
        self._jobs.put(req)

    def poll(self, woken: bool = True) -> int:
        """Call the replies of finished reads, and fail those past their deadline.

        Called when `wake.fd` is readable (`woken`: drain it), and also from the loop's
        regular tick: a read stuck behind an unreachable server is failed here, on time.
        """
        if woken:
            self.wake.take()
        n = 0
        completed = self._completed
        while completed:
            req, result, error = completed.popleft()
            if not req.done:
                n += 1
                self._answer(req, result, error)
        return n + self._expire(time.monotonic())

    def next_deadline(self) -> float | None:
        """time.monotonic() by which `poll` should run again (None: nothing waiting)."""
        for req in self._waiting:
            if not req.done:
                return req.deadline
        return None

    def close(self, timeout: float = 5) -> None:
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():  # it may still notify: leave the fd open
                return
        self.wake.close()

    def _expire(self, now: float) -> int:
        # Every request has the same timeout, so deadlines grow front to back.
        n = 0
        waiting = self._waiting
        while waiting and (waiting[0].done or waiting[0].deadline <= now):
            req = waiting.popleft()
            if not req.done:
                n += 1
                self._answer(req, None, StoreUnavailable(
                    f"history database {self.name} did not answer within {self.timeout:g}s"
                    + (f" ({self.last_error})" if self.last_error else "")))
        return n

    def _answer(self, req: _Request, result: object, error: Exception | None) -> None:
        req.done = True
        try:
            req.reply(result, error)
        except Exception:  # one broken callback must not lose the others' replies
            log.exception("event=history_reply_failed kind=%s", req.kind)

    # ------------------------------------------------------------------ thread side

    def _run(self) -> None:
        try:
            while True:
                req = self._jobs.get()
                if req is None:
                    return
                if req.done or time.monotonic() >= req.deadline:
                    continue  # the loop has failed it already, or will on its next poll
                result, error = None, None
                try:
                    result = self._read(req)
                except Exception as exc:  # handed to the reply, on the loop thread
                    error = exc
                self._completed.append((req, result, error))
                self.wake.notify()
        finally:
            if self._store is not None:
                self._store.close()

    def _read(self, req: _Request) -> object:
        store = self._connected()
        try:
            return getattr(store, req.kind)(*req.args)
        except StoreUnavailable as exc:
            self._down(exc)
            raise

    def _connected(self) -> Store:
        if self._store is not None:
            return self._store
        if time.monotonic() < self._retry_at:
            raise StoreUnavailable(self.last_error)
        try:
            self._store = open_store(self.dsn, timeout=self.timeout,
                                     statement_timeout=self.timeout)
        except StoreUnavailable as exc:
            self._down(exc)
            raise
        if self.last_error:
            log.info("event=history_up dsn=%s", self.name)
        self._delay, self.last_error = 0.1, ""
        return self._store

    def _down(self, exc: StoreUnavailable) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if not self.last_error:
            log.warning("event=history_down dsn=%s error=%r", self.name, str(exc))
        self.last_error = str(exc)
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, 5.0)
