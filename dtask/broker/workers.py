"""The scheduler's side of the worker protocol: registration, heartbeats, credits,
pushing tasks, results, live logs, and revoking the leases of dead workers.

Results, leases and expirations are batched per loop turn into one log entry each.
A worker's result is acknowledged only once its RESULT entry has applied, so a
worker keeps (and re-sends) it across a leader change until it is safely recorded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .. import protocol as p
from . import state as sm
from .dispatch import WorkerInfo

if TYPE_CHECKING:
    from .server import SchedulerServer

log = logging.getLogger("dtask.broker.workers")

MAX_LIVE_LOG = p.MAX_LOG
# A pushed task the worker has not listed as running for this many heartbeat intervals
# never reached it (a `run` lost on a reconnect, or ignored as a repeat): it becomes
# a suspect like any lease the worker does not report. Long enough for a result the
# worker holds to be re-sent first (every 2 s by default).
PUSH_GRACE_HEARTBEATS = 5


class WorkerDesk:
    def __init__(self, server: SchedulerServer) -> None:
        self.server = server
        # (worker ident, (ident, `results` id) or None, result wire)
        self.results: list[tuple[bytes, tuple | None, list]] = []
        self.expired: list[list] = []
        self.live_logs: dict[tuple[str, int], bytearray] = {}

    # ------------------------------------------------------------------ inbound

    def handle(self, ident: bytes, msg: dict) -> None:
        srv = self.server
        t, rid = msg["t"], msg.get("id")
        worker_id = p.get_str(msg, "worker_id", max_len=128)
        if not srv.node.is_leader or srv.dispatcher is None:
            if t in (p.REGISTER, p.HEARTBEAT, p.RESULT, p.RESULTS):
                srv.not_leader(ident, rid)
            return
        d = srv.dispatcher
        if t == p.REGISTER:
            self._register(ident, rid, worker_id, msg)
            return
        worker = d.workers.get(worker_id)
        if worker is None or not worker.registered:
            if t != p.BYE:
                srv.send(ident, p.error(rid, p.UNKNOWN_WORKER, f"worker {worker_id} is not "
                                        "registered with this leader: register again"))
            return
        worker.last_seen = time.monotonic()
        worker.ident = ident
        if t == p.HEARTBEAT:
            self._credits(worker, msg)
            self._check_running(worker, msg.get("running"))
            srv.send(ident, p.reply(p.HEARTBEAT_ACK, rid))
        elif t == p.RESULT:
            self._take_results(ident, None, worker, msg, [self._result_wire(worker, msg)])
        elif t == p.RESULTS:
            items = msg.get("results")
            if not isinstance(items, list) or not 0 < len(items) <= p.MAX_RESULTS:
                raise p.ProtocolError(p.BAD_REQUEST, "field results must be a list of 1 to "
                                      f"{p.MAX_RESULTS} results")
            # All checked before any is taken: a refused message leaves no trace.
            wires = [self._result_wire(worker, item) for item in items]
            self._take_results(ident, rid, worker, msg, wires)
        elif t == p.LOG:
            self._log(msg)
        elif t == p.BYE:
            self._expire_worker(worker, "worker deregistered", time.time_ns() // 1000)
            del d.workers[worker_id]
            log.info("event=worker_bye worker=%s", worker_id)

    def _register(self, ident: bytes, rid: object, worker_id: str, msg: dict) -> None:
        info = WorkerInfo(
            worker_id, ident, host=p.get_str(msg, "host", ""),
            pid=p.get_int(msg, "pid", 0, lo=0),
            concurrency=p.get_int(msg, "concurrency", lo=1, hi=100_000),
            queues=frozenset(p.get_str_list(msg, "queues") or ("default",)),
            labels=frozenset(p.get_str_list(msg, "labels")),
            executors=frozenset(p.get_str_list(msg, "executors")),
            last_seen=time.monotonic())
        running = msg.get("running", [])
        if not isinstance(running, list) or not all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) for r in running):
            raise p.ProtocolError(p.BAD_REQUEST, "field running must be [[task_id, attempt]]")
        known = self.server.dispatcher.workers.get(worker_id)
        info = self.server.dispatcher.register(info, {r[0] for r in running})
        if "credits" in msg:
            self._credits(info, msg)
        self.server.send(ident, p.reply(p.REGISTERED, rid,
                                        heartbeat_interval=self.server.cfg.heartbeat_interval,
                                        worker_timeout=self.server.cfg.worker_timeout,
                                        batch_results=True))
        self._reconcile(info, running)
        # A worker re-registering with the same leader (a liveness probe) is not news.
        level = logging.DEBUG if known is not None and known.registered else logging.INFO
        log.log(level, "event=worker_registered worker=%s host=%s pid=%d concurrency=%d "
                "queues=%s", worker_id, info.host, info.pid, info.concurrency,
                ",".join(sorted(info.queues)))

    @staticmethod
    def _credits(worker: WorkerInfo, msg: dict) -> None:
        prefetch = p.get_int(msg, "prefetch", 0, lo=0, hi=100_000) if "prefetch" in msg else None
        worker.report_credits(p.get_int(msg, "credits", lo=0, hi=100_000), prefetch)

    def _reconcile(self, worker: WorkerInfo, running: list) -> None:
        """Kill attempts a worker runs that the state no longer gives it, or that were
        cancelled (again: the kill may have been lost with the leader that sent it)."""
        for item in running:
            if not (isinstance(item, list) and len(item) == 2):
                continue
            task = self.server.state.get(item[0]) if isinstance(item[0], str) else None
            current = task.current() if task is not None else None
            if (task is None or task.status != p.RUNNING or current is None
                    or current.number != item[1] or current.worker != worker.id
                    or task.cancel_requested):
                self._send_kill(worker, item[0], item[1], p.NOT_LEASED)

    def _check_running(self, worker: WorkerInfo, running: object) -> None:
        """Leases the state gives this worker but that it no longer runs, with no result
        on the way, would stay RUNNING forever (e.g. its result went to a leader that
        lost office and the next one refused it as early). Seen missing in two
        heartbeats in a row, such an attempt is expired as lost and retried. So is one
        pushed to it more than PUSH_GRACE_HEARTBEATS ago that it never listed."""
        if not isinstance(running, list):
            return
        reported = {r[0] for r in running if isinstance(r, list) and r}
        grace = PUSH_GRACE_HEARTBEATS * self.server.cfg.heartbeat_interval
        pushed_before = time.monotonic() - grace
        suspects = {t for t in worker.running if t not in reported
                    and worker.assigned.get(t, -math.inf) < pushed_before}
        now_us = time.time_ns() // 1000
        for task_id in suspects & worker.missing:
            task = self.server.state.get(task_id)
            current = task.current() if task is not None else None
            if task is not None and task.status == p.RUNNING and current is not None:
                log.warning("event=attempt_lost task=%s attempt=%d worker=%s reason=not_running",
                            task_id, current.number, worker.id)
                worker.assigned.pop(task_id, None)  # its slot: no result will free it
                self.expired.append([task_id, current.number, p.LOST,
                                     "the worker no longer runs it", now_us])
        worker.missing = suspects - worker.missing

    def _result_wire(self, worker: WorkerInfo, msg: object) -> list:
        """One reported attempt, checked, as a RESULT entry's item (no side effects)."""
        if not isinstance(msg, dict):
            raise p.ProtocolError(p.BAD_REQUEST, "a result must be a map")
        task_id = p.task_id_of(msg)
        number = p.get_int(msg, "attempt", lo=1)
        outcome = p.get_str(msg, "outcome")
        if outcome not in p.OUTCOMES:
            raise p.ProtocolError(p.BAD_REQUEST, f"unknown outcome {outcome!r}")
        exit_code = msg.get("exit_code")
        if exit_code is not None and type(exit_code) is not int:
            raise p.ProtocolError(p.BAD_REQUEST, "field exit_code must be an integer or nil")
        result, output = msg.get("result", b""), msg.get("log", b"")
        if not isinstance(result, bytes) or not isinstance(output, bytes):
            raise p.ProtocolError(p.BAD_REQUEST, "fields result and log must be binary")
        d = self.server.dispatcher
        task = d.task(task_id)
        now_us = time.time_ns() // 1000
        # The backoff follows the reported attempt: with dispatch ahead of the lease's
        # commit, the state may not count that attempt yet (nor, leased early, the task).
        retry_at = d.retry_at_us(task, now_us, number) if task else 0
        if outcome == p.REJECTED:
            retry_at = now_us  # it never ran: no backoff, another worker may take it now
        return [task_id, number, outcome, exit_code, p.get_str(msg, "error", "", max_len=4096),
                result[:p.MAX_RESULT], output[-p.MAX_LOG:], p.get_int(msg, "started_us", 0, lo=0),
                p.get_int(msg, "finished_us", 0, lo=0), retry_at, worker.id]

    def _take_results(self, ident: bytes, rid: object, worker: WorkerInfo, msg: dict,
                      wires: list[list]) -> None:
        """Queue checked results for this turn's RESULT entry. rid None: a single `result`
        (acked with `result_ack`); else the `results` message's id, echoed in one
        `results_ack` for them all."""
        group = None if rid is None else (ident, rid)
        for wire in wires:
            worker.assigned.pop(wire[0], None)  # its slot is free as of now
            self.live_logs.pop((wire[0], wire[1]), None)
            self.results.append((ident, group, wire))
        if "credits" in msg:  # after the slots were freed: the two counts then agree
            self._credits(worker, msg)

    def _log(self, msg: dict) -> None:
        key = (p.task_id_of(msg), p.get_int(msg, "attempt", lo=1))
        offset = p.get_int(msg, "offset", 0, lo=0)
        data = msg.get("data", b"")
        d = self.server.dispatcher
        task = d.task(key[0])
        if not isinstance(data, bytes) or task is None or (
                task.status != p.RUNNING and task.id not in d.leasing):
            return
        buf = self.live_logs.setdefault(key, bytearray())
        if offset > len(buf):  # a chunk went missing: say so instead of splicing silently
            buf += f"\n[dtask: {offset - len(buf)} bytes of live output lost]\n".encode()
        elif offset < len(buf):
            data = data[len(buf) - offset:]  # a repeat of what we have
        buf += data[:max(0, MAX_LIVE_LOG - len(buf))]

    def live_log(self, task_id: str, attempt: int) -> bytes:
        return bytes(self.live_logs.get((task_id, attempt), b""))

    # ------------------------------------------------------------------ outbound

    def flush(self, now_us: int) -> None:
        """Turn this loop turn's results and expirations into one log entry each."""
        srv = self.server
        if self.results:
            batch, self.results = self.results, []
            srv.propose(sm.RESULT, now_us, [w for _, _, w in batch],
                        lambda res, err, b=batch: self._results_applied(b, res, err))
        if self.expired:
            batch, self.expired = self.expired, []
            srv.propose(sm.EXPIRE, now_us, batch, lambda res, err: None)

    def _results_applied(self, batch, statuses, err: Exception | None) -> None:
        if err is not None:
            return  # no ack: the worker keeps the result and re-sends it to the new leader
        acks: dict[tuple[bytes, object], list[list]] = {}
        for (ident, group, wire), status in zip(batch, statuses, strict=True):
            if group is None:
                self.server.send(ident, p.reply(p.RESULT_ACK, None, task_id=wire[0],
                                                attempt=wire[1], accepted=status != "stale"))
            else:
                acks.setdefault(group, []).append([wire[0], wire[1], status != "stale"])
        for (ident, rid), items in acks.items():
            self.server.send(ident, p.reply(p.RESULTS_ACK, rid, acks=items))

    def dispatch(self, now_us: int) -> None:
        """Lease ready tasks to free worker slots (through the log)."""
        d = self.server.dispatcher
        expired = d.fire_timers(now_us)
        for task_id, number, outcome, reason in expired:
            task = self.server.state.tasks[task_id]
            self.expired.append([task_id, number, outcome, reason,
                                 d.retry_at_us(task, now_us, number)])
            self.kill(task)
        self._lease(d.assign(now_us), now_us)
        if self.expired and self.server.node.is_leader:
            self.flush(now_us)

    def dispatch_early(self, wires: Iterable[list], now_us: int,
                       in_flight: Iterable[list]) -> None:
        """Just-proposed SUBMIT wires: lease those idle workers can start now, behind
        their SUBMIT in the log (`Dispatcher.assign_early`)."""
        self._lease(self.server.dispatcher.assign_early(wires, now_us, in_flight), now_us)

    def _lease(self, leases: list[tuple[str, int, str, int]], now_us: int) -> None:
        if leases:
            self.server.propose(sm.LEASE, now_us, [list(x) for x in leases],
                                lambda res, err, b=leases: self._leases_applied(b, res, err))
            self._push(leases)

    def _push(self, leases: list[tuple[str, int, str, int]]) -> None:
        """Send tasks to their workers now, while their leases commit in the background.

        Pushing before the lease commits saves a quorum round on every task. If this
        leader dies before the lease commits, the next one sees the task still queued
        and runs it again: a duplicate execution, which at-least-once allows; the
        first run's result is then fenced off by its attempt number and worker.
        """
        runs: dict[str, list[dict]] = {}
        task = self.server.dispatcher.task
        for task_id, number, worker_id, _ in leases:
            t = task(task_id)
            runs.setdefault(worker_id, []).append(
                {"task_id": t.id, "attempt": number, "type": t.type, "payload": t.payload,
                 "content_type": t.content_type, "timeout": t.timeout, "name": t.name})
        for worker_id, tasks in runs.items():
            self.server.send(self.server.dispatcher.workers[worker_id].ident,
                             p.pack({"v": p.VERSION, "t": p.RUN, "tasks": tasks}))

    def _leases_applied(self, leases, granted, err: Exception | None) -> None:
        d = self.server.dispatcher
        if err is not None or d is None:
            return  # leadership lost: the next leader rebuilds from the state
        for (task_id, number, worker_id, _), ok in zip(leases, granted, strict=True):
            d.lease_settled(task_id, worker_id, ok)
            worker = d.workers.get(worker_id)
            if not ok and worker is not None:  # e.g. cancelled meanwhile: stop that run
                self._send_kill(worker, task_id, number, p.NOT_LEASED)

    def kill(self, task: sm.Task) -> None:
        d = self.server.dispatcher
        current = task.current()
        if d is None or current is None:
            return
        worker = d.workers.get(current.worker)
        if worker is not None and worker.ident:
            self._send_kill(worker, task.id, current.number)

    def _send_kill(self, worker: WorkerInfo, task_id: str, attempt: int,
                   reason: str = "") -> None:
        """reason NOT_LEASED: the state does not give that attempt to this worker (a new
        leader, a refused lease), so its end must not count as a cancel: the worker
        reports it lost (or rejected, if it never started) and the task runs again."""
        msg = {"v": p.VERSION, "t": p.KILL, "task_id": task_id, "attempt": attempt}
        if reason:
            msg["reason"] = reason
        self.server.send(worker.ident, p.pack(msg))

    # ------------------------------------------------------------------ liveness

    def check_liveness(self, now: float, now_us: int) -> None:
        d = self.server.dispatcher
        if d is None:
            return
        for worker in d.dead_workers(now):
            log.warning("event=worker_lost worker=%s silent_s=%.1f running=%d", worker.id,
                        now - worker.last_seen, len(worker.running))
            self._expire_worker(worker, "worker stopped heartbeating", now_us)

    def _expire_worker(self, worker: WorkerInfo, reason: str, now_us: int) -> None:
        """Revoke every lease the worker holds: its tasks go back to the queue (at-least-once)."""
        for task_id in list(worker.running):
            task = self.server.state.get(task_id)
            current = task.current() if task else None
            if task is not None and task.status == p.RUNNING and current is not None:
                # Not the task's fault: retry at once (still one attempt of the budget).
                self.expired.append([task_id, current.number, p.LOST, reason, now_us])
