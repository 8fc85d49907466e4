"""A child process in its own process group, watched from the poll loop.

Its stdout and stderr share one pipe (so they stay interleaved as written) which the
loop reads without blocking; a pidfd tells the loop when it exits. The group is
SIGKILLed when its leader exits: nothing an attempt started outlives it, and doing it
before reaping the leader means the group id cannot have been reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable

from .reactor import Reactor

READ_SIZE = 64 << 10
READS_PER_TURN = 4  # then let the loop serve others; the rest is read next turn


_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL me if the worker dies (even by SIGKILL, when
    it cannot clean up). Covers the attempt's first process — with `sh -c` running one
    command, the command itself; what that process forks is orphaned, as with any
    supervisor that is killed outright."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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
            bufsize=0, preexec_fn=die_with_parent)
        self.pid = self.proc.pid
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

    def _close_out(self) -> None:
        if self.out is not None:
            self.reactor.remove(self.out)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.out = None

    def _exited(self, _ev: int) -> None:
        kill_group(self.pid, signal.SIGKILL)  # leftovers; the zombie leader pins the pgid
        self.drain()  # what is already in the pipe; no waiting for EOF
        self._close_out()
        self.reactor.remove(self.pidfd)
        os.close(self.pidfd)
        self.returncode = self.proc.wait()
        self.on_exit(self.returncode)
