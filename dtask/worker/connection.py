"""The worker's link to the scheduler cluster: find the leader, register, heartbeat.

One DEALER per scheduler endpoint, all connected from the start so a failover does not
wait for a TCP handshake. The worker registers with one endpoint at a time: a
`registered` reply makes it the leader; NOT_LEADER moves on to the hinted leader (or the
next endpoint when there is no hint); so do silence for `register_timeout`, and an
endpoint a register cannot even be queued for (not connected) within CONNECT_GRACE.
After a round over every endpoint without success it backs off before the next round
(the connections keep trying in the background, so a slow handshake only costs a round).

While registered, only the leader's socket is in the poll set: every poll of a ZeroMQ
socket costs two system calls before and two after the wait, per socket, and the
others carry nothing but late answers to an abandoned search. Those are read (and
dropped as stale) with each heartbeat instead; during a search every socket is polled.

Liveness: any message from the leader counts. Heartbeats get no reply, so when the
leader has been silent for a few heartbeat intervals, or a heartbeat cannot even be
queued because the connection is down, the worker probes it with a fresh `register`
(idempotent: it carries the running attempts); no answer to the probe means the leader
is gone, and the search starts over at the next endpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from .. import protocol as p
from .config import WorkerConfig
from .reactor import Reactor

log = logging.getLogger("dtask.worker.connection")

PROBE_AFTER = 3  # heartbeat intervals of silence before the leader is probed
CONNECT_GRACE = 0.25  # a register that cannot even be queued this long: endpoint is down
MAX_BACKOFF = 0.5  # between search rounds; a new leader should be found soon after election
MAX_HOPS = 3  # hints followed without waiting; then the round backoff applies
MAX_HINTS = 16  # endpoints learned from NOT_LEADER hints that get a socket of their own
RECV_BATCH = 1000  # messages taken from one socket per loop turn


class Connection:
    def __init__(self, zctx: zmq.Context, config: WorkerConfig, reactor: Reactor, *,
                 on_message: Callable[[str, dict], None],
                 on_error: Callable[[str, dict], None],
                 registration: Callable[[], dict], heartbeat: Callable[[], dict],
                 on_registered: Callable[[bool], None]) -> None:
        self.zctx = zctx
        self.config = config
        self.reactor = reactor
        self.on_message = on_message
        self.on_error = on_error
        self.registration = registration
        self.heartbeat = heartbeat
        self.on_registered = on_registered
        self.endpoints = list(dict.fromkeys(config.endpoints))
        self.sockets: dict[str, zmq.Socket] = {}
        self.polled: set[str] = set()  # endpoints whose socket is in the reactor
        self.heartbeat_interval = config.heartbeat_interval
        self.leader: str | None = None
        self.batch_results = False  # the leader takes `results` (its `registered` said so)
        self.candidate: str | None = None  # where a register is outstanding
        self.reg_id = 0
        self.reg_sent = False
        self.reg_deadline = 0.0
        self.reg_started = 0.0
        self.wait_until = 0.0  # backoff between search rounds
        self.next_index = 0
        self.hint: str | None = None  # a NOT_LEADER leader hint to try next
        self.fails = 0
        self.hops = 0  # NOT_LEADER hints followed since the last registration
        self.last_heard = 0.0
        self.next_heartbeat = 0.0
        self.request_id = 0
        self.bad_messages = 0
        for ep in self.endpoints:
            self._socket(ep)

    # -- sending ------------------------------------------------------------------

    def next_id(self) -> int:
        self.request_id += 1
        return self.request_id

    def send(self, msg: dict) -> bool:
        """Send to the leader; False when there is none or it is not connected."""
        return self.leader is not None and self._send_to(self.leader, msg)

    def _send_to(self, ep: str, msg: dict) -> bool:
        try:
            self.sockets[ep].send(p.pack(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:  # IMMEDIATE: not connected (yet), or the queue is full
            return False

    def _socket(self, ep: str) -> zmq.Socket:
        sock = self.sockets.get(ep)
        if sock is None:
            sock = self.zctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue heartbeats for a dead peer
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.setsockopt(zmq.RCVHWM, 10_000)
            sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME)
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # notice dead TCP connections
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
            sock.connect(ep)
            self.sockets[ep] = sock
            self._poll_sockets()
        return sock

    def _poll_sockets(self) -> None:
        """Put exactly the sockets that matter now in the reactor (see the docstring)."""
        if self.leader is not None and self.candidate in (None, self.leader):
            wanted = {self.leader}
        else:
            wanted = set(self.sockets)
        if wanted == self.polled:
            return
        for ep in self.polled - wanted:
            self.reactor.remove(self.sockets[ep])
        for ep in wanted - self.polled:
            self.reactor.add(self.sockets[ep], lambda _ev, ep=ep: self._recv(ep))
        self.polled = wanted

    def _read_unpolled(self) -> None:
        for ep in [ep for ep in self.sockets if ep not in self.polled]:
            self._recv(ep)

    # -- receiving ----------------------------------------------------------------

    def _recv(self, ep: str) -> None:
        sock = self.sockets[ep]
        now = time.monotonic()
        for _ in range(RECV_BATCH):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if sock.getsockopt(zmq.RCVMORE):
                while sock.getsockopt(zmq.RCVMORE):
                    sock.recv()
                self._bad(ep, "a message must be one frame")
                continue
            try:
                msg = p.unpack(frame)
            except p.ProtocolError as exc:
                self._bad(ep, exc.message)
                continue
            if ep == self.leader:
                self.last_heard = now
            t = msg["t"]
            if t == p.REGISTERED:
                self._registered(ep, msg, now)
            elif t == p.ERROR:
                self._error(ep, msg, now)
            else:
                self.on_message(ep, msg)
        self._poll_sockets()  # the leader may have changed

    def _bad(self, ep: str, why: str) -> None:
        self.bad_messages += 1
        log.warning("event=bad_message endpoint=%s error=%r", ep, why)

    def _registered(self, ep: str, msg: dict, now: float) -> None:
        if ep != self.candidate or msg.get("id") != self.reg_id:
            return  # an answer to an attempt we gave up on
        hb, timeout = msg.get("heartbeat_interval"), msg.get("worker_timeout")
        if type(hb) in (int, float) and 0.001 <= hb <= 3600:
            self.heartbeat_interval = float(hb)
        if type(timeout) in (int, float) and 0.003 <= timeout < 3 * self.heartbeat_interval:
            # one late heartbeat must not get us declared dead (and our tasks re-run)
            self.heartbeat_interval = timeout / 3
        changed = ep != self.leader
        self.leader, self.candidate = ep, None
        self.batch_results = msg.get("batch_results") is True
        self.last_heard = now
        self.next_heartbeat = now
        self.fails = self.hops = 0
        if changed:
            log.info("event=registered leader=%s heartbeat_interval=%g worker_timeout=%r",
                     ep, self.heartbeat_interval, msg.get("worker_timeout"))
        self.on_registered(changed)

    def _error(self, ep: str, msg: dict, now: float) -> None:
        code = msg.get("code")
        ours = ep in (self.leader, self.candidate)
        if code == p.NOT_LEADER and ours:
            hint = msg.get("leader")
            log.info("event=not_leader endpoint=%s leader_hint=%r", ep, hint)
            self._give_up(ep, now)
            if isinstance(hint, str) and hint.startswith("tcp://") and hint != ep and (
                    hint in self.sockets or len(self.sockets) < len(self.endpoints) + MAX_HINTS):
                self._socket(hint)
                self.hint = hint
                self.hops += 1
                if self.hops <= MAX_HOPS or now >= self.wait_until:  # a hint is worth
                    self._attempt_next(now)  # following at once, unless they go in circles
        elif code == p.UNKNOWN_WORKER and ep == self.leader:
            log.info("event=unknown_worker endpoint=%s action=register", ep)
            self.leader = None
            self._attempt(ep, now)
        elif ep == self.candidate and msg.get("id") == self.reg_id:
            log.error("event=register_refused endpoint=%s code=%s message=%r", ep, code,
                      msg.get("message"))
            self._give_up(ep, now)
        else:
            self.on_error(ep, msg)

    # -- the search ---------------------------------------------------------------

    def _attempt(self, ep: str, now: float) -> None:
        self.candidate = ep
        self.reg_id = self.next_id()
        self.reg_started = now
        self.reg_deadline = now + self.config.register_timeout
        self._poll_sockets()
        self.reg_sent = self._send_to(ep, self._register_msg())

    def _attempt_next(self, now: float) -> None:
        hint, self.hint = self.hint, None
        self._attempt(hint or self.endpoints[self.next_index], now)

    def _register_msg(self) -> dict:
        return {"v": p.VERSION, "t": p.REGISTER, "id": self.reg_id, **self.registration()}

    def _give_up(self, ep: str, now: float) -> None:
        """`ep` is not (or no longer) the leader: continue with the next endpoint."""
        if self.leader == ep:
            self.leader = None
        if self.candidate == ep:
            self.candidate = None
        self._poll_sockets()
        if ep in self.endpoints:
            self.next_index = (self.endpoints.index(ep) + 1) % len(self.endpoints)
        self.fails += 1
        if self.fails % len(self.endpoints) == 0:  # a whole round failed: back off
            rounds = self.fails // len(self.endpoints)
            self.wait_until = now + min(MAX_BACKOFF, 0.05 * 2 ** min(rounds, 5))

    def tick(self, now: float) -> float:
        """Timers of the search, the heartbeat and the probe; returns the next due time."""
        if self.candidate is not None:
            if not self.reg_sent:
                self.reg_sent = self._send_to(self.candidate, self._register_msg())
            if not self.reg_sent and now - self.reg_started >= CONNECT_GRACE:
                log.info("event=endpoint_unreachable endpoint=%s", self.candidate)
                self._give_up(self.candidate, now)
            elif now >= self.reg_deadline:
                log.warning("event=register_timeout endpoint=%s", self.candidate)
                self._give_up(self.candidate, now)
        if self.leader is None and self.candidate is None and now >= self.wait_until:
            self._attempt_next(now)
        due = now + 1.0
        if self.candidate is not None:
            due = min(due, self.reg_deadline if self.reg_sent else now + 0.01)  # retry queueing
        elif self.leader is None:
            due = min(due, self.wait_until)
        if self.leader is not None:
            probe_at = self.last_heard + PROBE_AFTER * self.heartbeat_interval
            if now >= self.next_heartbeat:
                if not self.send({"v": p.VERSION, "t": p.HEARTBEAT, **self.heartbeat()}):
                    probe_at = now  # not even connected (IMMEDIATE): check at once
                self.next_heartbeat = now + self.heartbeat_interval
                self._read_unpolled()
            if self.candidate is None and now >= probe_at:
                log.debug("event=probe leader=%s", self.leader)
                self._attempt(self.leader, now)
                probe_at = self.reg_deadline
            due = min(due, self.next_heartbeat, probe_at)
        return due

    def heartbeat_now(self) -> None:
        self.next_heartbeat = 0.0

    def close(self, linger: float = 0.0) -> None:
        for sock in self.sockets.values():
            self.reactor.remove(sock)  # a no-op for the ones not polled
            sock.setsockopt(zmq.LINGER, int(linger * 1000))
            sock.close()
        self.sockets.clear()
