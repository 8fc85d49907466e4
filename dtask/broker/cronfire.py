"""The leader's cron desk: fire due ticks through the log, and the cron requests.

Every cron job has one timer in a fastqueue `TimerQueue`, at its next fire instant.
When timers fall due, the desk asks `dtask.cron.schedule.misfire` what to fire (on-time
ticks, a catch-up run for misfired ones, or a skip record) and proposes one CRON_FIRE
entry for every job due in this loop turn. A job with a firing in flight gets no new
timer until that entry applies; then its next tick is computed from the replicated
`last_tick_us`, which is also what a new leader starts from. That is the whole
exactly-once argument: the state refuses a tick at or before `last_tick_us`, and
everything after it is computed again by whoever leads.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import msgpack

from .. import protocol as p
from .._fastqueue import TimerQueue
from ..cron import schedule as cron
from ..raft.core import NotLeader
from . import cronstate as cs

if TYPE_CHECKING:
    from .server import SchedulerServer

log = logging.getLogger("dtask.broker.cron")

JOB_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
RETRY_LATER_US = 1_000_000  # a firing that could not be proposed is tried again then


class CronDesk:
    def __init__(self, server: SchedulerServer) -> None:
        self.server = server
        self.state = server.state
        self.timers: TimerQueue | None = None  # None unless leading
        self.in_flight: set[str] = set()
        self._schedules: dict[tuple[str, str], cron.Schedule] = {}
        self._manual_seq = 0

    # ------------------------------------------------------------------ leadership

    def on_leader(self) -> None:
        self.timers = TimerQueue()
        self.in_flight = set()
        for job in self.state.cron.jobs.values():
            self._arm(job)
        if self.state.cron.jobs:
            log.info("event=cron_start jobs=%d", len(self.state.cron.jobs))

    def on_follower(self) -> None:
        self.timers = None
        self.in_flight = set()

    def after_apply(self) -> None:
        changed, self.state.cron.changed = self.state.cron.changed, []
        if self.timers is None:
            return
        for name in dict.fromkeys(changed):
            if name not in self.in_flight:
                job = self.state.cron.jobs.get(name)
                if job is None:
                    self.timers.remove(name)
                else:
                    self._arm(job)

    def next_due_us(self) -> int | None:
        return self.timers.next_due() if self.timers is not None else None

    # ------------------------------------------------------------------ firing

    def schedule(self, job: cs.CronJob) -> cron.Schedule:
        key = (job.expr, job.tz)
        sched = self._schedules.get(key)
        if sched is None:
            if len(self._schedules) > 100_000:
                self._schedules.clear()
            sched = self._schedules[key] = cron.parse(job.expr, job.tz)
        return sched

    def _arm(self, job: cs.CronJob) -> None:
        if job.paused:
            self.timers.remove(job.name)
        else:
            self.timers.push(job.name, self.schedule(job).next_after(job.last_tick_us))

    def fire_due(self, now_us: int) -> None:
        if self.timers is None:
            return
        due = self.timers.pop_due(now_us)
        if not due:
            return
        entries, names = [], []
        for name in due:
            job = self.state.cron.jobs.get(name)
            if job is None or job.paused:
                continue
            plan = cron.misfire(self.schedule(job), job.last_tick_us, now_us, job.misfire,
                                int(job.grace_s * 1e6), int(job.catchup_window_s * 1e6),
                                job.max_catchup)
            job_entries = self._entries(job, plan)
            if not job_entries:
                # Nothing to fire although the timer was due: should not happen, but
                # must not turn into a loop that fires the same timer every turn.
                next_us = self.schedule(job).next_after(job.last_tick_us)
                self.timers.push(name, max(next_us, now_us + RETRY_LATER_US))
                continue
            entries += job_entries
            names.append(name)
            self.in_flight.add(name)
        if entries:
            self.server.propose(cs.CRON_FIRE, now_us, entries,
                                lambda res, err, n=names, e=entries: self._fired(n, e, res,
                                                                                  err))

    @staticmethod
    def _entries(job: cs.CronJob, plan: cron.FirePlan) -> list[list]:
        """The plan as CRON_FIRE entries, in tick order: each tick to run, then a skip
        record if the plan's last handled tick is after the last one run."""
        entries = []
        skipped = plan.skipped
        for tick in plan.ticks:
            entries.append([job.name, job.version, tick.at_us,
                            cs.CATCH_UP if tick.catch_up else cs.ON_TIME, skipped])
            skipped = 0
        last_run = plan.ticks[-1].at_us if plan.ticks else job.last_tick_us
        if plan.last_handled_us > last_run:
            entries.append([job.name, job.version, plan.last_handled_us, cs.SKIP, skipped])
        return entries

    def _fired(self, names: list[str], entries: list[list], results: object,
               err: Exception | None) -> None:
        if self.timers is None:
            return  # no longer leading: the next leader recomputes from the state
        if err is None:
            for entry, outcome in zip(entries, results, strict=True):
                if outcome not in ("stale", cs.SKIPPED_MISFIRE):
                    log.debug("event=cron_fired job=%s tick_us=%d outcome=%s",
                              entry[0], entry[2], outcome)
        elif not isinstance(err, NotLeader):
            log.warning("event=cron_fire_failed jobs=%d error=%s", len(names), err)
        for name in names:
            self.in_flight.discard(name)
            job = self.state.cron.jobs.get(name)
            if job is None:
                continue
            if err is None:
                self._arm(job)
            else:
                self.timers.push(name, time.time_ns() // 1000 + RETRY_LATER_US)

    # ------------------------------------------------------------------ requests

    def define(self, ident: bytes, rid: object, msg: dict) -> None:
        raw = msg.get("job")
        if not isinstance(raw, dict):
            raise p.ProtocolError(p.BAD_REQUEST, "field job must be a map")
        definition = parse_definition(raw, self.server.cfg.max_payload)
        create_only = p.get_bool(msg, "create_only", True)
        if not self.server.require_leader(ident, rid):
            return

        def done(outcome: object, err: Exception | None) -> None:
            if err is not None:
                self.server._write_failed(ident, rid, err)
            elif outcome == "exists":
                self.server.send(ident, p.error(rid, p.CONFLICT, f"a cron job named "
                                                f"{definition[0]!r} already exists"))
            else:
                self._reply_job(ident, rid, definition[0], outcome=outcome)

        self.server.propose(cs.CRON_DEFINE, _now_us(), [definition, create_only], done)

    def change(self, ident: bytes, rid: object, msg: dict) -> None:
        """cron_pause / cron_resume / cron_delete / cron_trigger of one job by name."""
        t = msg["t"]
        name = p.get_str(msg, "name", max_len=64, pattern=JOB_NAME)
        if not self.server.require_leader(ident, rid):
            return
        if t == p.CRON_RESUME:
            kind, body = cs.CRON_RESUME, [name, p.get_bool(msg, "catch_up", False)]
        elif t == p.CRON_TRIGGER:
            # The client's key makes its retries land on the same run.
            key = p.get_str(msg, "key", "", max_len=40, pattern=JOB_NAME)
            if not key:
                self._manual_seq += 1
                key = f"{_now_us():x}.{self._manual_seq}"
            kind, body = cs.CRON_TRIGGER, [name, f"{name}@manual.{key}"]
        else:
            kind, body = {p.CRON_PAUSE: cs.CRON_PAUSE, p.CRON_DELETE: cs.CRON_DELETE}[t], [name]

        def done(outcome: object, err: Exception | None) -> None:
            if err is not None:
                self.server._write_failed(ident, rid, err)
            elif outcome == "not_found":
                self.server.send(ident, p.error(rid, p.NOT_FOUND, f"no cron job {name!r}"))
            elif t == p.CRON_DELETE:
                self.server.send(ident, p.reply(p.CRON_JOB, rid, job={"name": name},
                                                outcome=outcome))
            else:
                extra = {"task_id": outcome} if t == p.CRON_TRIGGER else {}
                self._reply_job(ident, rid, name, outcome=outcome if not extra else
                                "triggered", **extra)

        self.server.propose(kind, _now_us(), body, done)

    def list(self, ident: bytes, rid: object, msg: dict) -> None:
        def answer() -> None:
            jobs = [self.describe(j) for j in sorted(self.state.cron.jobs.values(),
                                                     key=lambda j: j.name)]
            self.server.send(ident, p.reply(p.CRON_JOBS, rid, jobs=jobs))

        self.server._read(ident, rid, p.get_bool(msg, "stale"), answer)

    def _reply_job(self, ident: bytes, rid: object, name: str, **extra) -> None:
        job = self.state.cron.jobs.get(name)
        self.server.send(ident, p.reply(p.CRON_JOB, rid,
                                        job=self.describe(job) if job else {"name": name},
                                        **extra))

    def describe(self, job: cs.CronJob) -> dict:
        """A job for humans and scripts: the definition, what it did, when it fires next
        (in its zone and in UTC)."""
        out = job.to_dict()
        out["state"] = "paused" if job.paused else "active"
        next_us = 0 if job.paused else self.schedule(job).next_after(
            max(job.last_tick_us, _now_us() - int(job.grace_s * 1e6)))
        out["next_fire_us"] = next_us
        if next_us:
            moment = datetime.fromtimestamp(next_us / 1e6, UTC)
            out["next_fire_utc"] = moment.isoformat()
            out["next_fire_local"] = moment.astimezone(ZoneInfo(job.tz)).isoformat()
        return out

    def row(self, job: cs.CronJob, index: int) -> tuple:
        """The job as a `cron_jobs` row (dtask.persist.rows.CRON_COLUMNS)."""
        next_us = 0 if job.paused else self.schedule(job).next_after(job.last_tick_us)
        return (job.name, job.expr, job.tz, msgpack.packb(job.template, use_bin_type=True),
                job.misfire, job.overlap, job.paused, job.last_tick_us, next_us,
                job.last_task_id, job.last_outcome, job.created_us, job.updated_us, index)


def parse_definition(raw: dict, max_payload: int) -> list:
    """A client's job map, validated (expression, zone, policies, task template) into
    the definition wire of `CronJob.DEFINITION`. Errors are BAD_REQUEST, one line."""
    name = p.get_str(raw, "name", max_len=64, pattern=JOB_NAME)
    expr = p.get_str(raw, "expr", max_len=200)
    tz = p.get_str(raw, "tz", "UTC", max_len=64)
    try:
        cron.parse(expr, tz)
        misfire = cron.check_misfire_policy(p.get_str(raw, "misfire", "once"))
        overlap = cron.check_overlap_policy(p.get_str(raw, "overlap", "skip"))
    except cron.CronError as exc:
        raise p.ProtocolError(p.BAD_REQUEST, str(exc)) from None
    task_raw = raw.get("task")
    try:
        spec = p.parse_task_spec(task_raw, max_payload)
    except p.ProtocolError as exc:
        raise p.ProtocolError(exc.code, f"task: {exc.message}") from None
    if spec.delay or spec.at_us or spec.task_id or spec.idempotency_key:
        raise p.ProtocolError(p.BAD_REQUEST, "task: a cron job's task cannot have delay, "
                              "at_us, task_id or idempotency_key (each tick makes its own)")
    template = [spec.name, spec.type, spec.payload, spec.content_type, spec.priority,
                spec.queue, list(spec.labels), spec.timeout, spec.retry.to_wire()]
    return [name, expr, tz, template, misfire, overlap,
            p.get_num(raw, "grace_s", 10.0, hi=86400.0),
            p.get_num(raw, "catchup_window_s", 0.0, hi=86400.0 * 366),
            p.get_int(raw, "max_catchup", 100, lo=1, hi=100_000),
            p.get_bool(raw, "paused", False)]


def _now_us() -> int:
    return time.time_ns() // 1000
