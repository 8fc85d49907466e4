"""A pool of warm Python child processes (see `pychild`), driven from the poll loop.

Children are started ahead of time and reused, so a Python task costs a pipe round
trip instead of an interpreter start. A child that is killed (timeout, cancel) or dies
is replaced at once; one that dies before it is ready is replaced with a backoff, so a
broken environment does not turn into a fork storm.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Any

import msgpack

from .. import protocol as p
from .executors.base import Finished, Handle, OnExit, OnOutput
from .process import GUARD, Process, describe_status, kill_group
from .reactor import Reactor

log = logging.getLogger("dtask.worker.pool")

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
REQUEST_PIPE_SIZE = 1 << 20  # most requests then fit without waiting for POLLOUT
ANSWER_READ = 1 << 20


class Call(Handle):
    """One function call: queued until a child is free, then running in that child."""

    __slots__ = ("pool", "request", "on_output", "on_exit", "child", "done")

    def __init__(self, pool: PythonPool, request: bytes, on_output: OnOutput,
                 on_exit: OnExit) -> None:
        self.pool = pool
        self.request = request
        self.on_output = on_output
        self.on_exit = on_exit
        self.child: Child | None = None
        self.done = False

    def signal(self, sig: int) -> None:
        if self.child is not None:
            self.child.proc.signal(sig)
        elif not self.done:
            self.pool.queue.remove(self)
            self.finish(Finished(p.ERRORED, None, "stopped before it started"))

    def finish(self, result: Finished) -> None:
        if not self.done:
            self.done = True
            self.on_exit(result)


class Child:
    """The parent's side of one pool child: request pipe, answer pipe, output pipe."""

    def __init__(self, pool: PythonPool) -> None:
        self.pool = pool
        self.reactor = pool.reactor
        self.call: Call | None = None
        self.ready = False
        self.started = time.monotonic()
        self.pending = b""  # request bytes the pipe had no room for yet
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=256 << 20)
        req_r, self.req_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        with contextlib.suppress(OSError):  # a smaller pipe only means more POLLOUT rounds
            fcntl.fcntl(self.req_w, F_SETPIPE_SZ, REQUEST_PIPE_SIZE)
        argv = [sys.executable, "-m", "dtask.worker.pychild", str(req_r), str(resp_w),
                *pool.imports]
        try:
            self.proc = Process(self.reactor, argv, env=None, cwd=None,
                                on_output=self._output, on_exit=self._exited,
                                pass_fds=(req_r, resp_w))
        except BaseException:
            for fd in (req_r, resp_w, self.req_w, self.resp_r):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(resp_w)
        os.set_blocking(self.req_w, False)
        os.set_blocking(self.resp_r, False)
        self.reactor.add(self.resp_r, self._answers)

    def run(self, call: Call) -> None:
        self.call = call
        call.child = self
        self._send(call.request)

    def _send(self, data: bytes) -> None:
        try:
            n = os.write(self.req_w, data)
        except BlockingIOError:
            n = 0
        except OSError:
            return  # the child is gone; its pidfd will report it
        self.pending = data[n:]
        if self.pending:
            log.debug("event=pool_write_pending pid=%d bytes=%d", self.proc.pid, len(self.pending))
            self.reactor.add(self.req_w, self._writable, 2)  # zmq.POLLOUT

    def _writable(self, _ev: int) -> None:
        self.reactor.remove(self.req_w)
        self._send(self.pending)

    def _output(self, data: bytes) -> None:
        if self.call is not None:
            self.call.on_output(data)
        else:
            log.debug("event=pool_child_output pid=%d data=%r", self.proc.pid, data[:200])

    def _answers(self, _ev: int) -> None:
        buf = self.pool.read_buffer
        while True:
            try:
                n = os.readv(self.resp_r, [buf])
            except BlockingIOError:
                break
            except OSError:
                n = 0
            if not n:
                self.reactor.remove(self.resp_r)  # EOF: the child exited; pidfd tells the rest
                break
            self.unpacker.feed(self.pool.read_view[:n])
            if n < ANSWER_READ:
                break  # the pipe is empty: no need for a read that says so
        try:
            for msg in self.unpacker:
                self._answer(msg)
        except (ValueError, msgpack.UnpackException):  # a task scribbled on our pipe
            log.error("event=pool_child_garbled pid=%d action=kill", self.proc.pid)
            self.proc.signal(signal.SIGKILL)

    def _answer(self, msg: Any) -> None:
        if not isinstance(msg, dict):
            return
        if msg.get("ready"):
            self.ready = True
            self.pool.early_deaths = 0
            for err in msg.get("errors") or ():
                log.error("event=import_failed pid=%d error=%r", self.proc.pid, err)
            return
        call, self.call = self.call, None
        if call is None:
            return
        call.child = None
        self.proc.drain()  # the child flushed its output before answering
        outcome = msg.get("outcome")
        call.finish(Finished(outcome if outcome in (p.SUCCEEDED, p.ERRORED) else p.ERRORED,
                             None, str(msg.get("error", "")), msg.get("result", b""),
                             msg.get("started_us", 0)))
        self.pool.idle(self)

    def _exited(self, returncode: int) -> None:
        self._answers(0)  # an answer written just before dying still counts
        self._close_fd("req_w")
        self._close_fd("resp_r")
        call, self.call = self.call, None
        if call is not None:
            code, why = describe_status(returncode)
            call.finish(Finished(p.ERRORED, code, f"the Python process died ({why})"))
        self.pool.died(self)

    def _close_fd(self, attr: str) -> None:
        fd = getattr(self, attr)
        if fd >= 0:
            self.reactor.remove(fd)
            os.close(fd)
            setattr(self, attr, -1)

    def close(self) -> None:
        """Ask the child to exit (EOF on its request pipe)."""
        self._close_fd("req_w")


class PythonPool:
    def __init__(self, reactor: Reactor, size: int, imports: list[str]) -> None:
        self.reactor = reactor
        self.size = size
        self.imports = list(imports)
        self.children: list[Child] = []
        self.free: deque[Child] = deque()
        self.queue: deque[Call] = deque()
        # Answers are read into one reused buffer (the unpacker copies what it keeps):
        # os.read(fd, 1 MiB) would cost an mmap, mremap and munmap per answer.
        self.read_buffer = bytearray(ANSWER_READ)
        self.read_view = memoryview(self.read_buffer)
        self.closing = False
        self.early_deaths = 0
        self.respawn_at = 0.0
        for _ in range(size):
            self._spawn()

    def submit(self, request: dict, on_output: OnOutput, on_exit: OnExit) -> Call:
        call = Call(self, msgpack.packb(request, use_bin_type=True), on_output, on_exit)
        if self.free:
            self.free.pop().run(call)  # the most recently used child: warmest caches
        else:
            self.queue.append(call)
        return call

    def idle(self, child: Child) -> None:
        if self.queue and not self.closing:
            child.run(self.queue.popleft())
        else:
            self.free.append(child)

    def died(self, child: Child) -> None:
        self.children.remove(child)
        if child in self.free:
            self.free.remove(child)
        if self.closing:
            return
        if not child.ready:
            self.early_deaths += 1
            delay = min(10.0, 0.1 * 2 ** min(self.early_deaths, 7))
            log.error("event=pool_child_failed_to_start pid=%d retry_in=%.1fs", child.proc.pid,
                      delay)
            self.respawn_at = time.monotonic() + delay
            return
        self._spawn()

    def tick(self, now: float) -> float | None:
        """Respawn children that are due; returns when to call again (or None)."""
        if self.closing or len(self.children) >= self.size:
            return None
        if now < self.respawn_at:
            return self.respawn_at
        while len(self.children) < self.size:
            self._spawn()
        return None

    def _spawn(self) -> None:
        try:
            child = Child(self)
        except OSError as exc:
            log.error("event=pool_spawn_failed error=%r", str(exc))
            self.respawn_at = time.monotonic() + 1.0
            return
        self.children.append(child)
        self.idle(child)

    def close(self, timeout: float = 1.0) -> None:
        """Stop every child: EOF first, SIGKILL for the ones that do not leave in time."""
        self.closing = True
        for call in list(self.queue):
            call.signal(signal.SIGKILL)
        for child in self.children:
            child.close()
        deadline = time.monotonic() + timeout
        for child in list(self.children):
            GUARD.forget(child.proc.pid)  # reaped here, not through the loop
            try:
                child.proc.proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                kill_group(child.proc.pid, signal.SIGKILL)
                child.proc.proc.wait()
