"""A child process in its own process group, watched from the poll loop.

Its stdout and stderr share one pipe (so they stay interleaved as written) which the
loop reads without blocking; a pidfd tells the loop when it exits. The group is
SIGKILLed when its leader exits: nothing an attempt started outlives it, and doing it
before reaping the leader means the group id cannot have been reused. Should the
worker itself die first, the group guard (`groupguard`) kills the group.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from . import groupguard
from .reactor import Reactor

log = logging.getLogger("dtask.worker.process")

READ_SIZE = 64 << 10
READS_PER_TURN = 4  # then let the loop serve others; the rest is read next turn


F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class GroupGuard:
    """The worker's side of the group guard: started on first use, told of every task
    process group while it is live. One per worker process (`GUARD`)."""

    def __init__(self) -> None:
        self.fd = -1
        self.proc: subprocess.Popen | None = None
        self.live: set[int] = set()

    def watch(self, pgid: int) -> None:
        self.live.add(pgid)
        self._send(groupguard.WATCH, pgid)

    def forget(self, pgid: int) -> None:
        """Call before reaping the group's leader, while the id cannot be reused."""
        self.live.discard(pgid)
        self._send(groupguard.FORGET, pgid)

    def close(self) -> None:
        """The worker is leaving: the guard kills what is still live, then exits."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2 * groupguard.POLL + 1.0)
            self.proc = None

    def _send(self, op: bytes, pgid: int) -> None:
        if self.fd < 0 and not self._start():
            return
        try:
            os.write(self.fd, groupguard.encode(op, pgid))
        except OSError as exc:  # the guard was killed: start another, tell it everything
            log.error("event=group_guard_lost error=%r action=restart", str(exc))
            os.close(self.fd)
            self.fd = -1
            if self._start():
                records = b"".join(groupguard.encode(groupguard.WATCH, g) for g in self.live)
                with contextlib.suppress(OSError):  # gone again: the next call retries
                    os.write(self.fd, records)

    def _start(self) -> bool:
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):  # a smaller pipe is fine: the guard reads often
            fcntl.fcntl(write_end, F_SETPIPE_SZ, 1 << 20)
        try:
            # Its own session: a signal to the worker's process group does not reach it.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dtask.worker.groupguard"], stdin=read_end,
                start_new_session=True, close_fds=True)
        except OSError as exc:
            os.close(write_end)
            log.error("event=group_guard_failed error=%r", str(exc))
            return False
        finally:
            os.close(read_end)
        self.fd = write_end
        return True


GUARD = GroupGuard()


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def describe_status(returncode: int) -> tuple[int, str]:
    """(exit code as a shell shows it, error text) for a Popen returncode."""
    if returncode >= 0:
        return returncode, "" if returncode == 0 else f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return 128 - returncode, f"killed by {name}"


class Process:
    """Spawns `argv`; calls `on_output(bytes)` as output arrives and `on_exit(returncode)`
    once, after the last output."""

    def __init__(self, reactor: Reactor, argv: list[str], *, env: dict[str, str] | None,
                 cwd: str | None, on_output: Callable[[bytes], None],
                 on_exit: Callable[[int], None], pass_fds: tuple[int, ...] = ()) -> None:
        self.reactor = reactor
        self.on_output = on_output
        self.on_exit = on_exit
        self.proc = subprocess.Popen(  # raises OSError if it cannot start
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True, close_fds=True, pass_fds=pass_fds,
            bufsize=0)
        self.pid = self.proc.pid
        GUARD.watch(self.pid)  # its session id = process group id = its pid
        assert self.proc.stdout is not None
        self.out: int | None = self.proc.stdout.fileno()
        set_nonblocking(self.out)
        self.pidfd = os.pidfd_open(self.pid)
        reactor.add(self.out, self._readable)
        reactor.add(self.pidfd, self._exited)
        self.returncode: int | None = None

    def signal(self, sig: int) -> None:
        if self.returncode is None:
            kill_group(self.pid, sig)

    def _readable(self, _ev: int) -> None:
        self.drain(READS_PER_TURN)

    def drain(self, max_reads: int = 64) -> None:
        """Read what the pipe holds now (up to max_reads chunks)."""
        fd = self.out
        for _ in range(max_reads):
            if fd is None:
                return
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_out()
                return
            self.on_output(data)
            if len(data) < READ_SIZE:
                return  # the pipe is empty now; poll says when there is more

    def _close_out(self) -> None:
        if self.out is not None:
            self.reactor.remove(self.out)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.out = None

    def _exited(self, _ev: int) -> None:
        kill_group(self.pid, signal.SIGKILL)  # leftovers; the zombie leader pins the pgid
        GUARD.forget(self.pid)
        self.drain()  # what is already in the pipe; no waiting for EOF
        self._close_out()
        self.reactor.remove(self.pidfd)
        os.close(self.pidfd)
        self.returncode = self.proc.wait()
        self.on_exit(self.returncode)
