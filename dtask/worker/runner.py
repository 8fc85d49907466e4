"""The worker daemon: one poll loop that takes tasks, runs them and reports them.

Everything happens on the loop's thread (DESIGN.md principle 5): scheduler messages,
child output (pipes), child exits (pidfds), signals (a wakeup pipe) and timers. The
loop never blocks on a task; blocking work lives in child processes.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import zmq

from .. import protocol as p
from .. import sdnotify
from . import signals
from .config import WorkerConfig
from .connection import Connection
from .executors import NEEDS_POOL, Context, Finished, Handle, TaskError, build
from .logbuf import LogBuffer
from .outbox import BATCH_RESULTS, Key, Outbox, batches
from .pool import PythonPool
from .process import GUARD
from .reactor import Reactor

log = logging.getLogger("dtask.worker.runner")

MAX_ERROR = 4096  # characters of an error message sent with a result
RECENT = 10_000  # finished attempts remembered, so a repeated `run` does not run them again
SHUTTING_DOWN = "worker shutting down"
# Prefetch pays where a slot would otherwise wait for the leader's round trip (~1 ms):
# short tasks. A worker asks for about as many tasks as its slots finish in
# PREFETCH_HORIZON (from the median of its last PREFETCH_SAMPLES tasks' durations: the
# first call into a cold pool must not hold it back for long), so a prefetched task
# waits about that long; none while one of its running tasks is older than
# PREFETCH_WHILE_UNDER. A task that waited longer than PREFETCH_HAND_BACK anyway is
# handed back (as `rejected`: it goes back to the queue at once, without using a retry),
# so it does not sit behind a long one while another worker is free. Hand-back plus the
# kill grace stays well inside the leader's lease grace (10 s), so a waiting task's
# lease cannot expire before it starts.
PREFETCH_HORIZON = 0.02
PREFETCH_SAMPLES = 15
PREFETCH_WHILE_UNDER = 0.05
PREFETCH_HAND_BACK = 0.5


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class Job:
    """One running attempt."""

    key: Key
    type: str
    timeout: float
    log: LogBuffer
    started_us: int
    deadline: float = 0.0  # monotonic; 0.0: no timeout
    handle: Handle | None = None
    stop_outcome: str = ""  # set once the worker decided to stop it: the outcome to report
    stop_error: str = ""
    kill_at: float = 0.0  # SIGKILL due (SIGTERM was sent)


class Worker:
    def __init__(self, config: WorkerConfig, zctx: zmq.Context | None = None) -> None:
        self.config = config
        self.own_zctx = zctx is None
        self.zctx = zctx or zmq.Context()
        self.reactor = Reactor()
        use_pool = bool(set(config.executors) & NEEDS_POOL)
        self.pool = PythonPool(self.reactor, config.python_pool_size,
                               config.imports) if use_pool else None
        self.executors = build(config.executors, Context(config, self.reactor, self.pool))
        self.jobs: dict[Key, Job] = {}
        self.waiting: OrderedDict[Key, tuple[dict, float]] = OrderedDict()  # prefetched
        self.outbox = Outbox(config.max_outbox)
        self.recent: OrderedDict[Key, None] = OrderedDict()  # finished (and maybe acked)
        self.conn = Connection(self.zctx, config, self.reactor, on_message=self._on_message,
                               on_error=self._on_error, registration=self._registration,
                               heartbeat=self._heartbeat, on_registered=self._on_registered)
        self.host = socket.gethostname()
        self.draining = False
        self.drain_deadline = 0.0
        self.ack_deadline = 0.0
        self.done = False
        self.next_flush = 0.0
        self.next_resend = 0.0
        self.signals = 0
        self.signals_seen = 0
        self.told_prefetch = 0  # the prefetch the leader last heard from us
        self.durations: deque[float] = deque(maxlen=PREFETCH_SAMPLES)  # s a slot was held
        self.prefetch_room = 0  # what prefetch asks for while no task runs long; 0 unmeasured

    # -- what the scheduler is told -----------------------------------------------

    def prefetch(self) -> int:
        """How many tasks beyond its slots the worker takes now: what its slots finish
        in PREFETCH_HORIZON, and none while a running task is long."""
        if not self.prefetch_room or self.draining:
            return 0
        if self.jobs and self._longest_running_s() > PREFETCH_WHILE_UNDER:
            return 0
        return self.prefetch_room

    def _longest_running_s(self) -> float:
        """How long the oldest running job has run (seconds; there is at least one).
        `jobs` keeps them in the order they started: the first is the oldest."""
        return (now_us() - next(iter(self.jobs.values())).started_us) / 1e6

    def _measured(self, held_us: int) -> None:
        """A task gave its slot back after `held_us`: update what prefetch may ask for."""
        self.durations.append(max(1e-6, held_us / 1e6))
        typical = sorted(self.durations)[len(self.durations) // 2]
        c = self.config
        self.prefetch_room = min(c.prefetch, int(c.concurrency * PREFETCH_HORIZON / typical))

    def _credits(self) -> dict:
        """What the leader is told of our room, in every heartbeat and result."""
        prefetch = self.told_prefetch = self.prefetch()
        credits = (0 if self.draining or self.outbox.full() else
                   max(0, self.config.concurrency + prefetch - len(self.jobs) - len(self.waiting)))
        return {"credits": credits, "prefetch": prefetch}

    def _running(self) -> list[list]:
        """Every attempt the worker holds, prefetched ones included: its leases."""
        return [[task_id, attempt] for task_id, attempt in [*self.jobs, *self.waiting]]

    def _registration(self) -> dict:
        c = self.config
        return {"worker_id": c.worker_id, "host": self.host, "pid": os.getpid(),
                "concurrency": c.concurrency, "queues": list(c.queues),
                "labels": list(c.labels), "executors": list(self.executors),
                "running": self._running(), **self._credits()}  # credits 0 while draining

    def _heartbeat(self) -> dict:
        return {"worker_id": self.config.worker_id, "running": self._running(),
                **self._credits()}

    def _on_registered(self, changed: bool) -> None:
        self.outbox.reset_window()
        self._resend(self.outbox.pending_keys(), time.monotonic())  # what no leader has acked

    # -- messages from the scheduler ----------------------------------------------

    def _on_message(self, ep: str, msg: dict) -> None:
        t = msg["t"]
        try:
            if t == p.RUN:
                tasks = msg.get("tasks")
                if not isinstance(tasks, list):
                    raise p.ProtocolError(p.BAD_REQUEST, "run: field tasks must be a list")
                now = time.monotonic()
                for raw in tasks:  # one bad entry must not cost the others their run
                    try:
                        self._accept(raw, now)
                    except p.ProtocolError as exc:
                        log.warning("event=bad_task endpoint=%s error=%r", ep, exc.message)
            elif t == p.KILL:
                self._on_kill(msg)
            elif t == p.RESULT_ACK:
                key = (p.task_id_of(msg), p.get_int(msg, "attempt", lo=0))
                self._acked(key, msg.get("accepted") is not False)
            elif t == p.RESULTS_ACK:
                self._on_results_ack(msg)
            elif t == p.HEARTBEAT_ACK:
                pass  # its arrival already counted as the leader being alive
            elif t == p.DRAIN:
                log.info("event=drain_requested endpoint=%s", ep)
                self.request_stop()  # as on SIGTERM: finish, report, say bye, exit 0
            else:
                raise p.ProtocolError(p.BAD_REQUEST, f"unexpected message type {t!r}")
        except p.ProtocolError as exc:
            log.warning("event=bad_message endpoint=%s type=%s error=%r", ep, t, exc.message)
        except Exception:  # a bug must not take the worker (and its tasks) down
            log.exception("event=handler_failed endpoint=%s type=%s", ep, t)

    def _on_error(self, ep: str, msg: dict) -> None:
        rid = msg.get("id")
        keys = self.outbox.keys_of(rid)
        code, text = msg.get("code"), msg.get("message")
        if not keys:
            log.warning("event=scheduler_error endpoint=%s code=%s message=%r", ep, code, text)
            return
        self.outbox.answered(rid)
        for key in keys:
            log.error("event=result_refused task_id=%s attempt=%s code=%s message=%r",
                      key[0], key[1], code, text)
            if code not in (p.TOO_LARGE, p.BAD_REQUEST):
                continue  # resent on the resend timer
            entry = self.outbox.entries[key]
            if entry.batched:
                self.outbox.resend_alone(key)  # on its own, its refusal is handled below
            elif entry.msg["log"] or entry.msg["result"]:
                # keep the outcome, drop the bulky parts, say why; resent at once
                entry.msg.update(log=b"", result=b"", error=_clip(
                    f"{entry.msg.get('error', '')} [dtask: result and log dropped: the "
                    f"scheduler refused them: {code}: {text}]"))
                self.outbox.resend_alone(key)
        self._flush_results(time.monotonic())

    def _on_kill(self, msg: dict) -> None:
        key = (p.task_id_of(msg), p.get_int(msg, "attempt", lo=0))
        # A cancel ends the attempt `cancelled`. An attempt the leader's state does not
        # give us (a new leader; it may push the same attempt number again) must not:
        # it ends `lost` (retried), or `rejected` if it never started.
        cancel = p.get_str(msg, "reason", "cancel", max_len=32) != p.NOT_LEASED
        if self.waiting.pop(key, None) is not None:
            if cancel:
                return self._report(key, p.KILLED, "cancelled on request before it started")
            return self._report(key, p.REJECTED, "not leased to this worker; not started")
        job = self.jobs.get(key)
        if job is None:
            log.info("event=kill_ignored task_id=%s attempt=%d reason=not_running", *key)
            return
        if cancel:
            self._stop(job, p.KILLED, "cancelled on request", time.monotonic())
        else:
            self._stop(job, p.LOST, "stopped: the leader's state does not lease this "
                       "attempt to this worker", time.monotonic())

    def _on_results_ack(self, msg: dict) -> None:
        acks = msg.get("acks")
        if not isinstance(acks, list):
            raise p.ProtocolError(p.BAD_REQUEST, "results_ack: field acks must be a list")
        for item in acks:
            if (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and type(item[1]) is int):
                self._acked((item[0], item[1]), item[2] is not False)
        self.outbox.answered(msg.get("id"))
        self._flush_results(time.monotonic())  # what finished while that batch was out

    def _acked(self, key: Key, accepted: bool) -> None:
        if self.outbox.ack(key) and not accepted:
            log.info("event=result_stale task_id=%s attempt=%d", *key)
            # The leader did not record this run: if it pushes the same attempt again
            # (a new leader re-leasing it), that is a new run, not a duplicate.
            self.recent.pop(key, None)

    # -- running tasks ------------------------------------------------------------

    def _accept(self, raw: Any, now: float) -> None:
        """A task pushed to us: start it, keep it for the next free slot, or refuse it."""
        if not isinstance(raw, dict):
            raise p.ProtocolError(p.BAD_REQUEST, "run: each task must be a map")
        key = (p.task_id_of(raw), p.get_int(raw, "attempt", lo=0))
        if key in self.jobs or key in self.waiting or key in self.recent:
            log.info("event=duplicate_run task_id=%s attempt=%d", *key)
            if key in self.outbox.entries:
                # Ran here, its result not acknowledged yet: a new leader pushes the same
                # attempt again (the old one's lease never committed). That result is the
                # answer to this push too: send it now, or the push waits for nothing.
                self._resend([key], now)
            return
        c = self.config
        if self.draining:
            self._report(key, p.REJECTED, SHUTTING_DOWN)
        elif len(self.jobs) < c.concurrency:
            self._start(key, raw, now)
        elif len(self.waiting) < c.prefetch:
            self.waiting[key] = (raw, now)
        else:
            self._report(key, p.REJECTED, f"worker {c.worker_id} has no free slot "
                         f"(concurrency {c.concurrency}, prefetch {c.prefetch})")

    def _start_waiting(self, now: float) -> None:
        while self.waiting and len(self.jobs) < self.config.concurrency:
            key, (raw, _) = self.waiting.popitem(last=False)
            self._start(key, raw, now)

    def _hand_back(self, keys: list[Key], why: str) -> None:
        """Prefetched tasks that will not start here soon go back to the leader's queue."""
        for key in keys:
            del self.waiting[key]
            self._report(key, p.REJECTED, why)

    def _start(self, key: Key, raw: dict, now: float) -> None:
        try:
            kind = p.get_str(raw, "type", max_len=64)
            content_type = p.get_str(raw, "content_type", p.JSON, max_len=100)
            timeout = p.get_num(raw, "timeout", 0.0)
            payload = raw.get("payload", b"")
            if not isinstance(payload, bytes):
                raise p.ProtocolError(p.BAD_REQUEST, "field payload must be binary")
        except p.ProtocolError as exc:
            return self._report(key, p.ERRORED, f"bad run message: {exc.message}")
        executor = self.executors.get(kind)
        if executor is None:  # misrouted: let another worker have it
            return self._report(key, p.REJECTED, f"worker {self.config.worker_id} has no "
                                f"{kind!r} executor (it offers {', '.join(self.executors)})")
        job = Job(key, kind, timeout, LogBuffer(self.config.max_log_bytes), now_us())
        self.jobs[key] = job
        try:
            spec = executor.parse(executor.decode(payload, content_type))
            job.handle = executor.start(spec, raw, lambda data: self._output(job, data),
                                        lambda fin: self._finished(job, fin))
        except TaskError as exc:
            self.jobs.pop(key, None)
            return self._report(key, p.ERRORED, str(exc), started_us=job.started_us)
        except Exception as exc:
            log.exception("event=start_failed task_id=%s attempt=%d", *key)
            self.jobs.pop(key, None)
            return self._report(key, p.ERRORED, f"worker error starting the task: {exc!r}")
        if timeout:
            job.deadline = now + timeout
        log.debug("event=task_started task_id=%s attempt=%d type=%s", key[0], key[1], kind)

    def _output(self, job: Job, data: bytes) -> None:
        job.log.write(data)
        if job.log.pending() >= self.config.log_flush_bytes:
            self._flush_log(job)

    def _flush_log(self, job: Job) -> None:
        if self.conn.leader is None:
            return  # streaming is best effort; the result carries the whole log
        offset, data = job.log.unsent()
        self.conn.send({"v": p.VERSION, "t": p.LOG, "worker_id": self.config.worker_id,
                        "task_id": job.key[0], "attempt": job.key[1], "offset": offset,
                        "data": data})

    def _stop(self, job: Job, outcome: str, error: str, now: float) -> None:
        """SIGTERM now, SIGKILL after the grace period; report `outcome` when it ends."""
        if job.stop_outcome:
            return  # already stopping; the first reason stands
        job.stop_outcome, job.stop_error = outcome, error
        job.kill_at = now + self.config.kill_grace
        log.info("event=task_stopping task_id=%s attempt=%d outcome=%s reason=%r",
                 job.key[0], job.key[1], outcome, error)
        if job.handle is not None:
            job.handle.signal(signal.SIGTERM)

    def _finished(self, job: Job, fin: Finished) -> None:
        self.jobs.pop(job.key, None)
        ended = now_us()
        self._measured(ended - job.started_us)
        self._start_waiting(time.monotonic())  # before the report: its credits count it
        outcome, error = fin.outcome, fin.error
        if job.stop_outcome:  # the worker's decision wins over how the process ended
            outcome = job.stop_outcome
            error = f"{job.stop_error} ({fin.error})" if fin.error else job.stop_error
        self._report(job.key, outcome, error, exit_code=fin.exit_code, result=fin.result,
                     log_data=job.log.value(), started_us=fin.started_us or job.started_us,
                     finished_us=ended)

    def _report(self, key: Key, outcome: str, error: str, *, exit_code: int | None = None,
                result: bytes = b"", log_data: bytes = b"", started_us: int = 0,
                finished_us: int = 0) -> None:
        finished = finished_us or now_us()
        self.recent[key] = None
        if len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        self.outbox.add(key, {
            "task_id": key[0], "attempt": key[1], "outcome": outcome, "exit_code": exit_code,
            "error": _clip(error), "result": result, "log": log_data,
            "started_us": started_us or finished, "finished_us": finished})
        self._flush_results(time.monotonic())
        level = logging.DEBUG if outcome == p.SUCCEEDED else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "event=task_finished task_id=%s attempt=%d outcome=%s exit_code=%s "
                    "duration_ms=%.1f error=%r", key[0], key[1], outcome, exit_code,
                    (finished - (started_us or finished)) / 1000, _clip(error, 200))

    def _flush_results(self, now: float) -> None:
        """Send the results not sent yet: together in one `results` message when the
        leader takes them, unless the batch before still waits for its ack (`outbox`)."""
        box = self.outbox
        for key in list(box.unsent_alone):
            self._send_one(key, now)
        if not box.unsent:
            return
        if not self.conn.batch_results:
            for key in list(box.unsent):
                self._send_one(key, now)
        elif not box.waiting_for_ack(now):  # cut only the first batch's worth
            first = list(itertools.islice(box.unsent, BATCH_RESULTS))
            self._send_batch(batches(box, first)[0], now, window=True)

    def _resend(self, keys: list[Key], now: float) -> None:
        """Send `keys` again now, whatever is in flight."""
        box = self.outbox
        keys = [k for k in keys if k in box.entries]
        if not self.conn.batch_results:
            for key in keys:
                self._send_one(key, now)
            return
        for key in keys:
            if box.entries[key].alone:
                self._send_one(key, now)
        for chunk in batches(box, [k for k in keys if not box.entries[k].alone]):
            self._send_batch(chunk, now)

    def _send_one(self, key: Key, now: float) -> None:
        rid = self.conn.next_id()
        if self.conn.send({"v": p.VERSION, "t": p.RESULT, "id": rid,
                           "worker_id": self.config.worker_id, **self.outbox.entries[key].msg,
                           **self._credits()}):
            self.outbox.sent([key], rid, now)

    def _send_batch(self, keys: list[Key], now: float, window: bool = False) -> None:
        rid = self.conn.next_id()
        entries = self.outbox.entries
        if self.conn.send({"v": p.VERSION, "t": p.RESULTS, "id": rid,
                           "worker_id": self.config.worker_id,
                           "results": [entries[k].msg for k in keys], **self._credits()}):
            self.outbox.sent(keys, rid, now, batched=True, window=window)
        elif window:
            self.outbox.reset_window()  # nothing in flight: no reason to hold the next ones

    # -- timers ---------------------------------------------------------------------

    def _tick(self, now: float) -> float:
        """Run what is due; return when something is due next."""
        due = self.conn.tick(now)
        for job in list(self.jobs.values()):
            if job.deadline and not job.stop_outcome and now >= job.deadline:
                self._stop(job, p.TIMED_OUT, f"timed out after {job.timeout:g} s", now)
            if job.kill_at:
                if now >= job.kill_at:
                    job.kill_at = 0.0
                    if job.handle is not None:
                        job.handle.signal(signal.SIGKILL)
                else:
                    due = min(due, job.kill_at)
            elif job.deadline:
                due = min(due, job.deadline)
        due = min(due, self._prefetch_tick(now))
        if self.jobs:
            if now >= self.next_flush:
                for job in self.jobs.values():
                    if job.log.pending():
                        self._flush_log(job)
                self.next_flush = now + self.config.log_flush_interval
            due = min(due, self.next_flush)
        if self.outbox:
            box = self.outbox
            if box.unsent and box.batch_rid is not None:  # held behind a batch in flight
                if box.waiting_for_ack(now):
                    due = min(due, box.hold_until())
                else:  # no ack in time: stop holding them
                    box.reset_window()
                    self._flush_results(now)
            interval = self.config.result_resend_interval
            if now >= self.next_resend:
                self._resend(box.due(now, interval), now)
                self._flush_results(now)  # e.g. not sent for want of a leader
                self.next_resend = now + interval / 4
            due = min(due, self.next_resend)
        if self.pool is not None:
            respawn = self.pool.tick(now)
            if respawn is not None:
                due = min(due, respawn)
        if self.draining:
            due = min(due, self._drain_tick(now))
        return due

    def _prefetch_tick(self, now: float) -> float:
        """Tell the leader at once when a task turns long, so new tasks wait at the leader
        for whichever worker frees up first; hand back held tasks that waited too long.
        Returns when to look again."""
        due = math.inf
        if self.told_prefetch and self.jobs:
            if not self.prefetch():
                self.told_prefetch = 0  # what the heartbeat will say
                self.conn.heartbeat_now()
                due = now
            else:  # prefetch() just checked it is under PREFETCH_WHILE_UNDER
                due = now - self._longest_running_s() + PREFETCH_WHILE_UNDER
        while self.waiting:  # in arrival order: the ones waited too long come first
            key, (_, arrived) = next(iter(self.waiting.items()))
            if now - arrived < PREFETCH_HAND_BACK:
                return min(due, arrived + PREFETCH_HAND_BACK)
            self._hand_back([key], f"handed back: waited {PREFETCH_HAND_BACK:g} s for a "
                            "free slot")
        return due

    def _drain_tick(self, now: float) -> float:
        if self.jobs:
            if now < self.drain_deadline:
                return self.drain_deadline
            for job in list(self.jobs.values()):
                self._stop(job, p.LOST, SHUTTING_DOWN, now)
            return now + 1.0
        if not self.ack_deadline:
            self.ack_deadline = now + self.config.ack_timeout
        if not self.outbox or now >= self.ack_deadline:
            self.done = True
        return min(self.ack_deadline, now + 0.05)

    # -- life cycle -------------------------------------------------------------------

    def request_stop(self) -> None:
        """Drain: the first call stops taking tasks, a second one stops waiting for them."""
        now = time.monotonic()
        if not self.draining:
            self.draining = True
            self.drain_deadline = now + self.config.drain_timeout
            self._hand_back(list(self.waiting), SHUTTING_DOWN)  # never started: retry elsewhere
            self.conn.heartbeat_now()  # credits 0, at once
            log.info("event=draining running=%d drain_timeout=%g", len(self.jobs),
                     self.config.drain_timeout)
        else:
            self.drain_deadline = now
            log.info("event=drain_cut_short running=%d", len(self.jobs))

    def _on_signal(self) -> None:
        self.signals += 1  # a signal handler: the loop acts on it

    def run(self) -> int:
        restore = signals.install(self.reactor, self._on_signal)
        c = self.config
        log.info("event=worker_started worker_id=%s pid=%d concurrency=%d executors=%s "
                 "endpoints=%s", c.worker_id, os.getpid(), c.concurrency,
                 ",".join(self.executors), ",".join(c.endpoints))
        watchdog = sdnotify.Watchdog()
        sdnotify.ready()  # systemd Type=notify: the worker is up and looking for a leader
        try:
            while not self.done:
                if self.signals != self.signals_seen:
                    self.signals_seen += 1
                    sdnotify.stopping()
                    self.request_stop()
                    continue
                now = time.monotonic()
                watchdog.maybe_ping(now)
                due = self._tick(now)
                if self.done:
                    break
                if watchdog.enabled:
                    due = min(due, now + watchdog.interval)
                self.reactor.poll(max(0.0, due - time.monotonic()))
        finally:
            self._close()
            restore()
        return 0

    def _close(self) -> None:
        if self.outbox:
            log.warning("event=results_unacknowledged count=%d keys=%s", len(self.outbox),
                        self.outbox.pending_keys()[:20])
        if self.conn.leader is not None:
            self.conn.send({"v": p.VERSION, "t": p.BYE, "worker_id": self.config.worker_id})
        for job in self.jobs.values():  # only after an unexpected exit from the loop
            if job.handle is not None:
                job.handle.signal(signal.SIGKILL)
        if self.pool is not None:
            self.pool.close()
        GUARD.close()  # kills what is still running (only after an unexpected exit)
        self.conn.close(linger=1.0)
        if self.own_zctx:
            self.zctx.term()
        log.info("event=worker_stopped worker_id=%s", self.config.worker_id)


def _clip(text: str, limit: int = MAX_ERROR) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
