"""The cron part of `dtask.Client`: define, list, pause, resume, delete, trigger.

A mixin so `client.py` keeps to one idea (talking to the cluster); this module only
shapes requests and replies. Job semantics are in docs/cron.md.
"""

from __future__ import annotations

import uuid
from typing import Any

from . import protocol as p
from .taskspec import bad_request, encode_task  # the same task validation as submit

_JOB_OPTIONS = frozenset({"tz", "misfire", "overlap", "grace", "catchup_window",
                          "max_catchup", "paused"})


def _job(msg: dict) -> dict:
    job = dict(msg["job"])
    for key in ("outcome", "task_id"):
        if key in msg:
            job[key] = msg[key]
    return job


class CronMixin:
    def cron_define(self, name: str, expr: str, type: str, payload: object = None, *,
                    replace: bool = False, task: dict[str, Any] | None = None,
                    **options: Any) -> dict:
        """Define a cron job; returns it (with `outcome`: created, updated or unchanged).

        expr: 5 fields, 6 with seconds (last), or a macro such as @hourly. options: tz
        (IANA name, default UTC), misfire (skip | once | all), overlap (allow | skip |
        queue_one | replace), grace (seconds a tick may be late and still count as on
        time), catchup_window (seconds; older missed ticks never run; 0: no limit),
        max_catchup (misfire=all), paused. task: options of the task each tick submits
        (name, priority, timeout, max_retries, backoff, queue, labels, content_type).
        A job of that name already existing is a Conflict unless `replace` is true.
        """
        if not options.keys() <= _JOB_OPTIONS:
            unknown = ", ".join(sorted(options.keys() - _JOB_OPTIONS))
            raise TypeError(f"unknown cron option(s): {unknown}; valid options are "
                            f"{', '.join(sorted(_JOB_OPTIONS))}")
        task_options = dict(task or {})
        if task_options.keys() & {"delay", "at", "task_id", "idempotency_key"}:
            raise bad_request("a cron job's task cannot have delay, at, task_id or "
                       "idempotency_key: each tick makes its own")
        spec = encode_task(type, payload, task_options, lambda: "")
        spec.pop("idempotency_key", None)
        job: dict[str, Any] = {"name": name, "expr": expr, "task": spec}
        renames = {"grace": "grace_s", "catchup_window": "catchup_window_s"}
        for key, value in options.items():
            job[renames.get(key, key)] = value
        reply = self._call(p.CRON_DEFINE, {"job": job, "create_only": not replace},
                           p.CRON_JOB, _job)
        return reply

    def cron_list(self, *, stale: bool = False) -> list[dict]:
        """Every cron job, with its next fire time (UTC and local), last fire, state."""
        return self._call(p.CRON_LIST, {"stale": stale}, p.CRON_JOBS,
                          lambda msg: msg["jobs"], leader_only=not stale)

    def cron_pause(self, name: str) -> dict:
        """Stop firing (ticks while paused never run unless resumed with catch_up)."""
        return self._call(p.CRON_PAUSE, {"name": name}, p.CRON_JOB, _job)

    def cron_resume(self, name: str, *, catch_up: bool = False) -> dict:
        """Fire again; with catch_up the paused interval's ticks follow the job's misfire
        policy, without it they never run."""
        return self._call(p.CRON_RESUME, {"name": name, "catch_up": catch_up}, p.CRON_JOB,
                          _job)

    def cron_delete(self, name: str) -> None:
        """Delete the job (tasks it already created are untouched)."""
        self._call(p.CRON_DELETE, {"name": name}, p.CRON_JOB, _job)

    def cron_trigger(self, name: str) -> str:
        """Run the job now, outside its schedule; returns the new task's id. Retries of
        this call (after a leader change) do not start a second run."""
        key = uuid.uuid4().hex[:20]
        return self._call(p.CRON_TRIGGER, {"name": name, "key": key}, p.CRON_JOB,
                          lambda msg: msg["task_id"])
