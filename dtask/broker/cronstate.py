"""Cron jobs in the replicated state machine: definitions and firings are log entries.

Exactly once per tick: the leader computes which ticks are due (`dtask.cron.schedule`)
and proposes a CRON_FIRE entry for them; applying it creates the task, with an id
derived from the job and the tick (`nightly@2026-11-27T02:00:00Z`), and moves the
job's `last_tick_us` forward. A tick at or before `last_tick_us` is refused, so a
firing proposed twice (a leader that died after proposing, a new leader that
recomputed the same tick) creates one task; and because `last_tick_us` is replicated,
a new leader starts from the first tick after it, so nothing is skipped either.

Nothing here reads a clock or parses an expression: the time of every command travels
inside it (`TaskState.now_us`), and the leader validated the expression before
proposing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .. import protocol as p

if TYPE_CHECKING:
    from .state import Task, TaskState

CRON_DEFINE, CRON_PAUSE, CRON_RESUME = "cron_define", "cron_pause", "cron_resume"
CRON_DELETE, CRON_FIRE, CRON_TRIGGER = "cron_delete", "cron_fire", "cron_trigger"

_RETRY_FIELDS = ("max_retries", "initial", "multiplier", "max_delay", "jitter")

# Kinds of CRON_FIRE entries.
ON_TIME, CATCH_UP, SKIP = "tick", "catchup", "skip"
# How a tick ended when it did not start a task of its own.
SKIPPED_OVERLAP, QUEUED, SKIPPED_MISFIRE = "skipped_overlap", "queued", "skipped_misfire"


@dataclass(slots=True)
class CronJob:
    # The definition (what `cron_define` sets).
    name: str
    expr: str
    tz: str
    template: list  # [name, type, payload, content_type, priority, queue, labels,
    #                  timeout, retry policy wire]: what each firing submits
    misfire: str  # skip | once | all
    overlap: str  # allow | skip | queue_one | replace
    grace_s: float  # a tick later than this is a misfire
    catchup_window_s: float  # ticks older than this are never run (0: no limit)
    max_catchup: int  # `all`: at most this many missed ticks
    paused: bool
    # What firing did (replicated so a new leader carries on).
    created_us: int
    updated_us: int
    version: int = 1  # bumped by every redefinition; a firing planned before is refused
    last_tick_us: int = 0  # every tick at or before this was handled (fired or skipped)
    last_task_id: str = ""
    last_outcome: str = ""  # the last task's final status, or how the last tick ended
    last_fire_us: int = 0  # the tick of the last task created
    queued_tick_us: int = 0  # queue_one: the tick waiting for the running one to end
    fired: int = 0
    skipped: int = 0

    DEFINITION = ("name", "expr", "tz", "template", "misfire", "overlap", "grace_s",
                  "catchup_window_s", "max_catchup", "paused")

    def to_wire(self) -> list:
        return [getattr(self, f) for f in self.__slots__]

    @classmethod
    def from_wire(cls, w: list) -> CronJob:
        return cls(*w)

    def to_dict(self) -> dict:
        out = {f: getattr(self, f) for f in self.__slots__ if f != "template"}
        (name, ttype, payload, ctype, prio, queue, labels, timeout, retry) = self.template
        out["task"] = {"name": name, "type": ttype, "payload": payload, "content_type": ctype,
                       "priority": prio, "queue": queue, "labels": labels, "timeout": timeout,
                       "retry": dict(zip(_RETRY_FIELDS, retry, strict=True))}
        return out


def task_id_for(name: str, tick_us: int) -> str:
    """The id of the task a tick creates: the same on every replica and every leader."""
    moment = datetime.fromtimestamp(tick_us // 1_000_000, UTC)
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S")
    frac = tick_us % 1_000_000
    return f"{name}@{stamp}{f'.{frac:06d}' if frac else ''}Z"


class CronTable:
    """The cron jobs of a TaskState, and the handlers of the cron commands."""

    def __init__(self, state: TaskState) -> None:
        self.state = state
        self.jobs: dict[str, CronJob] = {}
        self.changed: list[str] = []  # job names whose row moved (persister, firer)

    def to_wire(self) -> list:
        return [j.to_wire() for j in self.jobs.values()]

    def restore(self, wire: list) -> None:
        self.jobs = {w[0]: CronJob.from_wire(w) for w in wire}

    # ------------------------------------------------------------------ definitions

    def define(self, now_us: int, body: list) -> str:
        """[definition wire, create_only] -> created | updated | unchanged | exists."""
        definition, create_only = body
        fields = dict(zip(CronJob.DEFINITION, definition, strict=True))
        job = self.jobs.get(fields["name"])
        if job is not None and all(getattr(job, f) == v for f, v in fields.items()):
            return "unchanged"  # e.g. a client's retry of a definition that committed
        if job is not None and create_only:
            return "exists"
        if job is None:
            self.jobs[fields["name"]] = CronJob(**fields, created_us=now_us,
                                                updated_us=now_us, last_tick_us=now_us)
            self.changed.append(fields["name"])
            return "created"
        if (fields["expr"], fields["tz"]) != (job.expr, job.tz):
            # A new schedule starts now: ticks of the new expression that fell before
            # the change are not misfires of it.
            job.last_tick_us = max(job.last_tick_us, now_us)
        for f, value in fields.items():
            setattr(job, f, value)
        job.version += 1
        job.updated_us = now_us
        self.changed.append(job.name)
        return "updated"

    def pause(self, now_us: int, body: list) -> str:
        job = self.jobs.get(body[0])
        if job is None:
            return "not_found"
        job.paused, job.updated_us = True, now_us
        self.changed.append(job.name)
        return "paused"

    def resume(self, now_us: int, body: list) -> str:
        """[name, catch_up]: without catch_up the paused interval's ticks never run;
        with it they are misfires, handled by the job's misfire policy."""
        name, catch_up = body
        job = self.jobs.get(name)
        if job is None:
            return "not_found"
        if job.paused and not catch_up:
            job.last_tick_us = max(job.last_tick_us, now_us)
        job.paused, job.updated_us = False, now_us
        self.changed.append(job.name)
        return "resumed"

    def delete(self, now_us: int, body: list) -> str:
        if self.jobs.pop(body[0], None) is None:
            return "not_found"
        self.changed.append(body[0])  # the persister deletes its row
        return "deleted"

    # ------------------------------------------------------------------ firing

    def fire(self, now_us: int, entries: list) -> list[str]:
        """[[name, version, tick_us, kind, skipped]] in tick order -> per entry the task
        id created, or why none was: stale | skipped_overlap | queued | skipped_misfire.
        `skipped` counts misfired ticks before this one that will never run; a SKIP
        entry only records them (its tick is the last of them)."""
        out = []
        for name, version, tick_us, kind, skipped in entries:
            job = self.jobs.get(name)
            if job is None or job.version != version or job.paused \
                    or tick_us <= job.last_tick_us:
                out.append("stale")  # already handled, or planned under another definition
                continue
            job.last_tick_us = tick_us
            job.skipped += skipped
            self.changed.append(name)
            if kind == SKIP:
                job.last_outcome = SKIPPED_MISFIRE
                out.append(SKIPPED_MISFIRE)
                continue
            out.append(self._start(job, tick_us))
        return out

    def trigger(self, now_us: int, body: list) -> str:
        """Run a job now, on request: its overlap policy does not apply (an operator
        asked for this run); its schedule is untouched. -> task id | not_found."""
        name, task_id = body
        job = self.jobs.get(name)
        if job is None:
            return "not_found"
        if task_id in self.state.tasks:
            return task_id  # a client's retry: that run exists already
        self._create_task(job, task_id, now_us)
        self.changed.append(name)
        return task_id

    def task_ended(self, task: Task) -> None:
        """A task of a job reached a final state: record it, start a queued tick."""
        job = self.jobs.get(task.cron_job)
        if job is None or job.last_task_id != task.id:
            return
        job.last_outcome = task.status
        self.changed.append(job.name)
        if job.queued_tick_us:
            tick, job.queued_tick_us = job.queued_tick_us, 0
            self._create_task(job, task_id_for(job.name, tick), tick)

    def _start(self, job: CronJob, tick_us: int) -> str:
        previous = self.state.tasks.get(job.last_task_id)
        if previous is not None and previous.status not in p.TERMINAL:
            if job.overlap == "skip":
                job.skipped += 1
                return SKIPPED_OVERLAP
            if job.overlap == "queue_one":
                if job.queued_tick_us:
                    job.skipped += 1  # the waiting tick stands for this one too
                    return SKIPPED_OVERLAP
                job.queued_tick_us = tick_us
                return QUEUED
            if job.overlap == "replace" and self.state.cancel_task(previous) == p.RUNNING:
                self.state.kills.append(previous.id)
        return self._create_task(job, task_id_for(job.name, tick_us), tick_us)

    def _create_task(self, job: CronJob, task_id: str, tick_us: int) -> str:
        if task_id in self.state.tasks:
            return "stale"  # a client took this id; the tick is handled either way
        name, ttype, payload, ctype, prio, queue, labels, timeout, retry = job.template
        self.state.create(task_id, name or job.name, ttype, payload, ctype, prio, queue,
                          labels, timeout, retry, "", 0, cron_job=job.name)
        job.last_task_id, job.last_fire_us, job.last_outcome = task_id, tick_us, ""
        job.fired += 1
        return task_id


CRON_HANDLERS = {
    CRON_DEFINE: lambda state, now_us, body: state.cron.define(now_us, body),
    CRON_PAUSE: lambda state, now_us, body: state.cron.pause(now_us, body),
    CRON_RESUME: lambda state, now_us, body: state.cron.resume(now_us, body),
    CRON_DELETE: lambda state, now_us, body: state.cron.delete(now_us, body),
    CRON_FIRE: lambda state, now_us, body: state.cron.fire(now_us, body),
    CRON_TRIGGER: lambda state, now_us, body: state.cron.trigger(now_us, body),
}
