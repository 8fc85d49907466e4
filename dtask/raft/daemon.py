"""The loop every daemon built on a Raft node shares: one `zmq.Poller` over the Raft
transport, the node's writer wake-up socket and the daemon's own request socket; and
a graceful stop in which a leader hands over leadership before exiting."""

from __future__ import annotations

import logging
import signal
import time

import zmq

from .. import sdnotify
from .node import RaftNode

log = logging.getLogger("dtask.raft.daemon")


class NodeDaemon:
    stop_transfer_wait = 3.0  # seconds a stopping leader waits for the transfer

    def __init__(self, node: RaftNode, sock: zmq.Socket) -> None:
        self.node = node
        self.sock = sock  # the daemon's clients (and workers) talk to this ROUTER
        self.running = True
        self.stopping_since = 0.0
        self.readable: dict = {}  # this loop turn's poll events, for `turn`

    # -- what a daemon provides -------------------------------------------------

    def on_requests(self) -> None:
        """Read and handle what arrived on `self.sock` (without blocking)."""
        raise NotImplementedError

    def turn(self) -> None:
        """End of a loop turn: by default, let Raft make progress."""
        self.node.process()

    def poll_timeout_ms(self) -> int:
        return self.node.next_timeout_ms()

    def wake_fds(self) -> list[int]:
        """Wake-up fds (`dtask.wakeup`) helper threads signal; `turn` drains them."""
        return []

    def on_close(self) -> None:
        """The loop ended: stop helper threads."""

    # -- the loop -----------------------------------------------------------------

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.node.socket, zmq.POLLIN)
        poller.register(self.node.wake_fd, zmq.POLLIN)
        poller.register(self.sock, zmq.POLLIN)
        for fd in self.wake_fds():
            poller.register(fd, zmq.POLLIN)
        watchdog = sdnotify.Watchdog()
        sdnotify.ready()  # systemd Type=notify: serving from here on
        try:
            while self.running:
                watchdog.maybe_ping(time.monotonic())
                events = self.readable = dict(poller.poll(self.poll_timeout_ms()))
                if self.node.socket in events:
                    self.node.on_readable()
                if self.node.wake_fd in events:
                    self.node.on_wake()
                if self.sock in events:
                    self.on_requests()
                self.node.on_timer()
                self.turn()
                if self.stopping_since:
                    self._continue_stop()
        finally:
            self.on_close()
            self.node.close()
            self.sock.close(0)

    def stop(self) -> None:
        """Graceful stop: a leader hands leadership over first (bounded wait)."""
        if self.stopping_since:
            return
        sdnotify.stopping()
        self.stopping_since = time.monotonic()
        if self.node.is_leader:
            target = self.node.transfer_leadership()
            log.info("event=stop_transfer node=%d to=%d", self.node.cfg.node_id, target)

    def _continue_stop(self) -> None:
        waited = time.monotonic() - self.stopping_since
        if not self.node.is_leader or waited > self.stop_transfer_wait:
            self.running = False


def run_daemon(daemon: NodeDaemon, description: str) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    log.info("event=serving %s", description)
    daemon.serve_forever()
