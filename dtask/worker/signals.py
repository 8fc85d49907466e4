"""SIGTERM/SIGINT as poll-loop events: a flag set by the handler, plus a wakeup pipe
in the poller so the loop notices at once instead of at its next timer."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

from .reactor import Reactor

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install(reactor: Reactor, on_signal: Callable[[], None]) -> Callable[[], None]:
    """Route stop signals to `on_signal` (keep it tiny: it runs in a signal handler);
    returns a function that puts everything back. Off the main thread this does
    nothing: whoever embeds the worker there handles signals."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)

    def read_wakeup(_ev: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(r, 512)

    try:
        old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        old = {s: signal.signal(s, lambda _s, _f: on_signal()) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread
        os.close(r)
        os.close(w)
        return lambda: None
    reactor.add(r, read_wakeup)

    def restore() -> None:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(old_fd)
        reactor.remove(r)
        os.close(r)
        os.close(w)

    return restore
