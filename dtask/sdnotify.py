"""A tiny sd_notify(3) client: readiness, stopping, status and watchdog pings for systemd.

No dependency: one AF_UNIX SOCK_DGRAM datagram per call to the socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name when it starts with '@').
Without ``$NOTIFY_SOCKET`` (not under systemd, or not ``Type=notify``) every call is
a no-op returning False, so daemons can call these helpers unconditionally.

Typical use in a daemon::

    ready()                      # once the daemon serves
    wd = Watchdog()              # reads $WATCHDOG_USEC / $WATCHDOG_PID
    while running:
        ...
        wd.maybe_ping(time.monotonic())
    stopping()                   # on SIGTERM, before draining

Notification failures never raise: systemd being gone must not kill a daemon.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Watchdog", "notify", "ready", "status", "stopping"]


def _address(env: Mapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]  # Linux abstract namespace
    return path


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", or several "K=V" lines) to $NOTIFY_SOCKET.

    Returns True if the datagram was sent; False when $NOTIFY_SOCKET is unset or empty
    (nothing is done) or when sending failed (the error is swallowed).
    """
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready() -> bool:
    """Tell systemd the daemon is serving (READY=1); `systemctl start` returns then."""
    return notify("READY=1")


def stopping() -> bool:
    """Tell systemd the daemon is shutting down (STOPPING=1)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """A one-line human status shown by `systemctl status` (STATUS=...)."""
    return notify("STATUS=" + " ".join(text.splitlines()))


class Watchdog:
    """Watchdog keep-alives (WATCHDOG=1) at half of ``$WATCHDOG_USEC``.

    Disabled (every method a no-op, `due` always False) when ``$WATCHDOG_USEC`` is
    absent, not a positive integer, or ``$WATCHDOG_PID`` is set to another process's
    pid (the variables were inherited, they are not meant for us). `now` is any
    monotonic clock in seconds (use the poll loop's `time.monotonic()`); the first
    call to `maybe_ping` pings at once.
    """

    __slots__ = ("interval", "_next")

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.interval: float | None = None  # seconds between pings; None = disabled
        self._next = float("-inf")
        usec = env.get("WATCHDOG_USEC", "").strip()
        pid = env.get("WATCHDOG_PID", "").strip()
        if not usec.isdigit() or int(usec) <= 0:
            return
        if pid and (not pid.isdigit() or int(pid) != os.getpid()):
            return
        self.interval = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def due(self, now: float) -> bool:
        """True when a ping should be sent at time `now`."""
        return self.interval is not None and now >= self._next

    def ping(self, now: float | None = None) -> bool:
        """Send WATCHDOG=1 now; the next one is due half an interval after `now`."""
        if self.interval is None:
            return False
        self._next = (time.monotonic() if now is None else now) + self.interval
        return notify("WATCHDOG=1")

    def maybe_ping(self, now: float) -> None:
        """Ping if due: call this from the poll loop every turn, it is cheap."""
        if self.interval is not None and now >= self._next:
            self.ping(now)
