"""Cron jobs in the replicated state machine: exactly one task per tick, overlap policies."""

from __future__ import annotations

import pytest

from dtask import protocol as p
from dtask.broker import cronstate as cs
from dtask.broker import state as sm

T0 = 1_800_000_000_000_000
S = 1_000_000


def definition(name="job", *, overlap="skip", misfire="once", paused=False, expr="* * * * *"):
    template = ["", "noop", b"{}", p.JSON, 0, "default", [], 0.0,
                p.RetryPolicy(max_retries=0).to_wire()]
    return [name, expr, "UTC", template, misfire, overlap, 10.0, 0.0, 100, paused]


class Harness:
    def __init__(self):
        self.s = sm.TaskState()
        self.index = 0

    def do(self, kind, body, now=T0):
        self.index += 1
        return self.s.apply(self.index, sm.command(kind, now, body))

    def define(self, *args, create_only=True, now=T0, **kw):
        return self.do(cs.CRON_DEFINE, [definition(*args, **kw), create_only], now)

    def fire(self, tick, name="job", kind=cs.ON_TIME, skipped=0, version=None):
        version = version or self.s.cron.jobs[name].version
        return self.do(cs.CRON_FIRE, [[name, version, tick, kind, skipped]], now=tick)[0]

    def finish(self, task_id, outcome=p.SUCCEEDED):
        self.do(sm.LEASE, [[task_id, 1, "w", 0]])
        self.do(sm.RESULT, [[task_id, 1, outcome, 0, "", b"", b"", 0, 0, 0, "w"]])


@pytest.fixture
def h():
    return Harness()


def test_a_tick_creates_one_task_with_an_id_derived_from_job_and_instant(h):
    assert h.define() == "created"
    tick = T0 + 60 * S
    task_id = h.fire(tick)
    assert task_id == cs.task_id_for("job", tick) == "job@2027-01-15T08:01:00Z"
    task = h.s.tasks[task_id]
    assert task.cron_job == "job" and task.status == p.PENDING and task.type == "noop"
    # The same tick proposed again (by a new leader) is refused: no second task.
    assert h.fire(tick) == "stale"
    assert h.fire(tick - S) == "stale"  # and so is anything before it
    assert [t.id for t in h.s.tasks.values()] == [task_id]
    assert h.s.cron.jobs["job"].last_tick_us == tick


def test_sub_second_ticks_get_distinct_ids():
    assert cs.task_id_for("j", T0 + 1) != cs.task_id_for("j", T0)
    assert cs.task_id_for("j", T0 + 1).endswith(".000001Z")


def test_duplicate_name_is_refused_and_changes_nothing(h):
    h.define()
    assert h.define(expr="0 * * * *") == "exists"
    assert h.s.cron.jobs["job"].expr == "* * * * *"


def test_redefinition_refuses_firings_planned_under_the_old_version(h):
    h.define()
    old = h.s.cron.jobs["job"].version
    assert h.define(expr="*/5 * * * *", create_only=False, now=T0 + S) == "updated"
    assert h.fire(T0 + 60 * S, version=old) == "stale"
    # a changed schedule starts at the change, not at the old last tick
    assert h.s.cron.jobs["job"].last_tick_us == T0 + S


def test_paused_jobs_do_not_fire_and_resume_skips_the_pause_unless_asked(h):
    h.define()
    h.do(cs.CRON_PAUSE, ["job"], now=T0 + S)
    assert h.fire(T0 + 60 * S) == "stale"
    h.do(cs.CRON_RESUME, ["job", False], now=T0 + 300 * S)
    assert h.s.cron.jobs["job"].last_tick_us == T0 + 300 * S
    h.do(cs.CRON_PAUSE, ["job"], now=T0 + 301 * S)
    h.do(cs.CRON_RESUME, ["job", True], now=T0 + 900 * S)
    assert h.s.cron.jobs["job"].last_tick_us == T0 + 300 * S  # catch-up left to misfire


def test_overlap_skip_skips_while_the_previous_run_is_active(h):
    h.define(overlap="skip")
    first = h.fire(T0 + 60 * S)
    assert h.fire(T0 + 120 * S) == cs.SKIPPED_OVERLAP
    h.finish(first)
    assert h.s.cron.jobs["job"].last_outcome == p.COMPLETED
    assert h.fire(T0 + 180 * S).startswith("job@")
    assert h.s.cron.jobs["job"].skipped == 1


def test_overlap_allow_runs_alongside(h):
    h.define(overlap="allow")
    assert h.fire(T0 + 60 * S) != h.fire(T0 + 120 * S)
    assert len(h.s.tasks) == 2


def test_overlap_queue_one_keeps_one_waiting_tick_and_starts_it_when_the_run_ends(h):
    h.define(overlap="queue_one")
    first = h.fire(T0 + 60 * S)
    assert h.fire(T0 + 120 * S) == cs.QUEUED
    assert h.fire(T0 + 180 * S) == cs.SKIPPED_OVERLAP  # at most one waiting
    assert len(h.s.tasks) == 1
    h.finish(first, p.ERRORED)
    queued = cs.task_id_for("job", T0 + 120 * S)
    assert queued in h.s.tasks and h.s.tasks[queued].status == p.PENDING
    assert h.s.cron.jobs["job"].queued_tick_us == 0


def test_overlap_replace_cancels_the_running_one(h):
    h.define(overlap="replace")
    first = h.fire(T0 + 60 * S)
    h.do(sm.LEASE, [[first, 1, "w", 0]])
    second = h.fire(T0 + 120 * S)
    assert h.s.tasks[first].cancel_requested and h.s.kills == [first]
    assert h.s.tasks[second].status == p.PENDING
    third = h.fire(T0 + 180 * S)  # second was pending: cancelled outright
    assert h.s.tasks[second].status == p.CANCELLED and h.s.tasks[third].status == p.PENDING


def test_misfire_skip_entries_advance_without_a_task(h):
    h.define()
    assert h.do(cs.CRON_FIRE, [["job", 1, T0 + 600 * S, cs.SKIP, 10]]) == [cs.SKIPPED_MISFIRE]
    job = h.s.cron.jobs["job"]
    assert job.last_tick_us == T0 + 600 * S and job.skipped == 10 and not h.s.tasks


def test_a_retried_definition_is_unchanged_not_a_conflict(h):
    h.define()
    assert h.define() == "unchanged"
    assert h.s.cron.jobs["job"].version == 1


def test_trigger_runs_now_without_touching_the_schedule(h):
    h.define()
    assert h.do(cs.CRON_TRIGGER, ["job", "job@manual.1"]) == "job@manual.1"
    assert h.do(cs.CRON_TRIGGER, ["job", "job@manual.1"]) == "job@manual.1"  # a retry
    assert len(h.s.tasks) == 1
    assert h.s.tasks["job@manual.1"].cron_job == "job"
    assert h.s.cron.jobs["job"].last_tick_us == T0
    assert h.do(cs.CRON_TRIGGER, ["nope", "x"]) == "not_found"


def test_delete_keeps_created_tasks_and_marks_the_row_for_deletion(h):
    h.define()
    task_id = h.fire(T0 + 60 * S)
    assert h.do(cs.CRON_DELETE, ["job"]) == "deleted"
    assert "job" not in h.s.cron.jobs and task_id in h.s.tasks
    assert sm.CRON_KEY + "job" in h.s.dirty  # the persister must delete its row
    assert h.do(cs.CRON_DELETE, ["job"]) == "not_found"


def test_cron_jobs_survive_a_snapshot(h):
    h.define(overlap="queue_one")
    h.fire(T0 + 60 * S)
    h.fire(T0 + 120 * S)
    s2 = sm.TaskState()
    s2.restore(h.s.snapshot())
    assert s2.cron.jobs == h.s.cron.jobs
    assert s2.snapshot() == h.s.snapshot()


def test_job_to_dict_shows_the_template_as_a_task(h):
    h.define()
    d = h.s.cron.jobs["job"].to_dict()
    assert d["task"]["type"] == "noop" and d["task"]["retry"]["max_retries"] == 0
    assert d["expr"] == "* * * * *" and d["paused"] is False
