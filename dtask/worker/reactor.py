"""The worker's one poll loop: ZeroMQ sockets and plain fds (pipes, pidfds) together."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

log = logging.getLogger("dtask.worker.reactor")

Handler = Callable[[int], None]


class Reactor:
    """A `zmq.Poller` with a callback per socket or fd.

    Callbacks may add or remove other entries while events are dispatched; an entry
    removed during a round is not called for that round.
    """

    def __init__(self) -> None:
        self.poller = zmq.Poller()
        self.handlers: dict[Any, Handler] = {}

    def add(self, key: zmq.Socket | int, handler: Handler, flags: int = zmq.POLLIN) -> None:
        self.handlers[key] = handler
        self.poller.register(key, flags)

    def remove(self, key: zmq.Socket | int) -> None:
        if self.handlers.pop(key, None) is not None:
            self.poller.unregister(key)

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` seconds and dispatch what became ready."""
        events = self.poller.poll(max(0, int(timeout * 1000 + 0.999)))
        handlers = self.handlers
        for key, ev in events:
            handler = handlers.get(key)
            if handler is not None:
                try:
                    handler(ev)
                except Exception:  # a bug in one handler must not stop every task
                    log.exception("event=handler_failed key=%r", key)
