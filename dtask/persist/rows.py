"""Scheduler objects as database rows, and the batch the persister writes in one go.

`task_row` and `attempt_rows` run on the leader's event-loop thread for every state
change (tens of thousands a second), so they build plain tuples and nothing else: the
JSON of labels and retry policies comes from small caches, since tasks share a handful
of each. Column order here is the order of the tables in `schema`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

TASK_COLUMNS = (
    "id", "name", "task_type", "payload", "content_type", "priority", "queue", "labels",
    "timeout_s", "max_retries", "retry_policy", "idempotency_key", "cron_job", "status",
    "created_us", "next_run_us", "finished_us", "current_retry", "cancel_requested", "seq",
    "raft_index",
)
# execution_logs without its autoincrement id; (task_id, attempt) is the key.
ATTEMPT_COLUMNS = (
    "task_id", "attempt", "worker_id", "started_us", "deadline_us", "finished_us", "status",
    "exit_code", "result", "output", "error_message", "raft_index",
)
# Built by the scheduler; JSON columns (queues, labels, executors) arrive as JSON text.
CRON_COLUMNS = (
    "name", "expr", "timezone", "template", "misfire", "overlap", "paused", "last_tick_us",
    "next_tick_us", "last_task_id", "last_outcome", "created_us", "updated_us", "raft_index",
)
WORKER_COLUMNS = (
    "id", "host", "pid", "concurrency", "queues", "labels", "executors", "state",
    "registered_us", "last_seen_us",
)

# The key of each table: rows with the same key in one batch collapse to the last one.
TASK_KEY, ATTEMPT_KEY, CRON_KEY, WORKER_KEY = ("id",), ("task_id", "attempt"), ("name",), ("id",)


@dataclass(slots=True)
class Batch:
    """Every row change of a run of Raft entries, ending at `last_index`."""

    tasks: list[tuple] = field(default_factory=list)
    attempts: list[tuple] = field(default_factory=list)
    cron_jobs: list[tuple] = field(default_factory=list)
    cron_deleted: list[str] = field(default_factory=list)
    workers: list[tuple] = field(default_factory=list)
    last_index: int = 0

    def rows(self) -> int:
        return (len(self.tasks) + len(self.attempts) + len(self.cron_jobs)
                + len(self.cron_deleted) + len(self.workers))


_labels_json: dict[tuple, str] = {}
_policy_json: dict[object, str] = {}


def labels_json(labels: tuple[str, ...]) -> str:
    text = _labels_json.get(labels)
    if text is None:
        if len(_labels_json) > 10_000:  # bounded: label sets are few, but not trusted
            _labels_json.clear()
        text = _labels_json[labels] = json.dumps(list(labels), separators=(",", ":"))
    return text


def policy_json(retry) -> str:
    """The backoff part of a RetryPolicy (max_retries has its own column)."""
    text = _policy_json.get(retry)
    if text is None:
        if len(_policy_json) > 10_000:
            _policy_json.clear()
        text = _policy_json[retry] = json.dumps(
            {"initial": retry.initial, "multiplier": retry.multiplier,
             "max_delay": retry.max_delay, "jitter": retry.jitter}, separators=(",", ":"))
    return text


def task_row(task, raft_index: int) -> tuple:
    """A `dtask.broker.state.Task` as a row of `tasks` (TASK_COLUMNS order).

    cron_job is NULL, not "", for tasks no cron job created (most rows; see schema).
    """
    retry = task.retry
    return (task.id, task.name, task.type, task.payload, task.content_type, task.priority,
            task.queue, labels_json(task.labels), float(task.timeout), retry.max_retries,
            policy_json(retry), task.idempotency_key, task.cron_job or None,
            task.status, task.created_us, task.run_at_us, task.finished_us,
            len(task.attempts), task.cancel_requested, task.seq, raft_index)


def attempt_rows(task, raft_index: int = 0) -> list[tuple]:
    """Every attempt of the task as rows of `execution_logs` (ATTEMPT_COLUMNS order)."""
    tid = task.id
    return [(tid, a.number, a.worker, a.started_us, a.deadline_us, a.finished_us, a.outcome,
             a.exit_code, a.result, a.log, a.error, raft_index) for a in task.attempts]
