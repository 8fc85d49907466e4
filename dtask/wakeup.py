"""A helper thread's wake-up call to its poll loop: an eventfd the loop polls.

DESIGN.md principle 5: blocking work (fsync, database writes and reads) runs on its
own thread, which hands results over through a queue and then wakes the loop. The
wake-up used to be an inproc PAIR socket; but zmq_poll costs every ZeroMQ socket in its
set a getpid (libzmq's fork check) and a zero-timeout poll of its mailbox before the
wait and again after it, on every loop turn, while a plain file descriptor in the same
set costs nothing beyond the one poll. A scheduler polls three such wake-ups.

An eventfd counts: `take()` returns how many `notify()` calls came since the last
`take()`, so a loop can tell how many jobs finished. Linux only, like the rest of the
daemons (pidfds in the worker, systemd units).
"""

from __future__ import annotations

import os


class Wakeup:
    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # poll it for POLLIN

    def notify(self) -> None:
        """From any thread: wake the loop (never blocks)."""
        os.eventfd_write(self.fd, 1)

    def take(self) -> int:
        """From the loop: how many notify() calls since the last take (0: none)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        """Once the notifying thread is done (a notify() after close is an error)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
