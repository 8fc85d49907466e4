"""The scheduler's replicated state machine: every task and its attempts.

`apply(index, command)` is deterministic: it depends only on the command and the
state. Time, ids, the retry delay's jitter and every other choice are made by the
leader before proposing and travel inside the command (see `commands`), so each
replica reaches the same state. Commands are batched: one log entry carries every
submission (or lease, or result) of one leader loop turn.

After each apply, `changed` lists the task ids whose state moved, so the leader's
dispatcher can update its queues without rescanning.

`dirty` is the write-behind persister's to-do list, and it is replicated state too:
every task (and cron job) whose row differs from the database, in the order of the
Raft index of its last change. The leader's persister writes a prefix of it, then
proposes PERSISTED with the index that prefix reached; applying that drops the prefix
on every replica. Because the list lives in the state (and its snapshot), a new leader
resumes exactly where the old one stopped, however long the database was down, and
purging never forgets a task the database has not got yet.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import msgpack

from .. import protocol as p
from ..protocol import RetryPolicy
from .cronstate import CRON_HANDLERS, CronTable

# Command kinds (first element of every command).
SUBMIT, LEASE, RESULT = "submit", "lease", "result"
CANCEL, EXPIRE, PURGE = "cancel", "expire", "purge"
PERSISTED, RESYNC = "persisted", "resync"
NODE_ENDPOINT = "node_endpoint"  # the client endpoint of a scheduler added later
# A SUBMIT carries tasks as wires: [task_id, name, type, payload, content_type,
# priority, queue, labels, timeout, retry, idempotency_key, run_at_us].
WIRE_ID, WIRE_KEY = 0, 10

CRON_KEY = "cron "  # prefix of cron jobs' keys in `dirty` (a space never starts a task id)
SNAPSHOT_VERSION = 2
# Attempts a worker refused without starting them (REJECTED) do not use up retries;
# past this many, the task fails anyway (no worker will take it).
MAX_REJECTIONS = 100


@dataclass(slots=True)
class Attempt:
    number: int
    worker: str
    started_us: int  # when the lease was granted
    deadline_us: int  # lease deadline (timeout + grace); 0 when the task has no timeout
    finished_us: int = 0
    outcome: str = ""
    exit_code: int | None = None
    error: str = ""
    result: bytes = b""  # msgpack of the executor's return value, bounded
    log: bytes = b""  # the attempt's output, bounded

    def to_wire(self) -> list:
        return [self.number, self.worker, self.started_us, self.deadline_us, self.finished_us,
                self.outcome, self.exit_code, self.error, self.result, self.log]

    def to_dict(self) -> dict:
        return {"attempt": self.number, "worker": self.worker, "started_us": self.started_us,
                "deadline_us": self.deadline_us, "finished_us": self.finished_us,
                "outcome": self.outcome, "exit_code": self.exit_code, "error": self.error,
                "result": self.result, "log_bytes": len(self.log)}


@dataclass(slots=True)
class Task:
    id: str
    name: str
    type: str
    payload: bytes
    content_type: str
    priority: int
    queue: str
    labels: tuple[str, ...]
    timeout: float
    retry: RetryPolicy
    idempotency_key: str
    created_us: int
    seq: int  # submission order: FIFO within a priority
    status: str
    run_at_us: int  # SCHEDULED: eta; RETRYING: end of backoff
    # A shared empty tuple until the first attempt: a million pending tasks would
    # otherwise carry a million empty lists (56 bytes each).
    attempts: list[Attempt] | tuple = ()
    finished_us: int = 0
    cancel_requested: bool = False
    cron_job: str = ""  # the cron job that created it

    @property
    def attempt(self) -> int:
        return len(self.attempts)

    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def to_wire(self) -> list:
        return [self.id, self.name, self.type, self.payload, self.content_type, self.priority,
                self.queue, list(self.labels), self.timeout, self.retry.to_wire(),
                self.idempotency_key, self.created_us, self.seq, self.status, self.run_at_us,
                [a.to_wire() for a in self.attempts], self.finished_us, self.cancel_requested,
                self.cron_job]

    @classmethod
    def from_wire(cls, w: list) -> Task:
        return cls(w[0], w[1], w[2], w[3], w[4], w[5], w[6], tuple(w[7]), w[8],
                   _policy(w[9]), w[10], w[11], w[12], w[13], w[14],
                   [Attempt(*a) for a in w[15]] if w[15] else (), w[16], w[17],
                   w[18] if len(w) > 18 else "")

    def to_dict(self, with_payload: bool = True) -> dict:
        out = {"id": self.id, "name": self.name, "type": self.type,
               "content_type": self.content_type, "priority": self.priority,
               "queue": self.queue, "labels": list(self.labels), "timeout": self.timeout,
               "max_retries": self.retry.max_retries, "idempotency_key": self.idempotency_key,
               "created_us": self.created_us, "seq": self.seq, "status": self.status,
               "run_at_us": self.run_at_us, "finished_us": self.finished_us,
               "cancel_requested": self.cancel_requested, "cron_job": self.cron_job,
               "attempts": [a.to_dict() for a in self.attempts]}
        if with_payload:
            out["payload"] = self.payload
        return out


class TaskState:
    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.by_key: dict[str, str] = {}  # idempotency key -> task id
        self.by_status: dict[str, dict[str, None]] = {s: {} for s in p.STATES}
        self.seq = 0
        self.changed: list[str] = []
        self.cron = CronTable(self)
        # key -> (index, now_us) of its last change, oldest first; one shared tuple per
        # applied entry, so a million dirty tasks cost a pointer each, not a tuple each.
        self.dirty: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.persisted_index = 0  # everything changed at or before it is in the database
        self.kills: list[str] = []  # running tasks the leader must kill (cron `replace`)
        # Client endpoints of schedulers added after the founding (founders' come from
        # the configuration): how NOT_LEADER replies point clients at them.
        self.endpoints: dict[int, str] = {}
        self.now_us = 0  # the applying command's time, for handlers' helpers

    # ------------------------------------------------------------------ state machine

    def apply(self, index: int, command: bytes) -> object:
        kind, now_us, body = msgpack.unpackb(command, raw=False)
        handler = _HANDLERS.get(kind)
        if handler is None:
            raise ValueError(f"unknown command {kind!r}")
        self.now_us = now_us
        tasks_before, cron_before = len(self.changed), len(self.cron.changed)
        result = handler(self, now_us, body)
        if len(self.changed) > tasks_before or len(self.cron.changed) > cron_before:
            self._mark_dirty((index, now_us), self.changed[tasks_before:],
                             [CRON_KEY + n for n in self.cron.changed[cron_before:]])
        return result

    def snapshot(self) -> bytes:
        return msgpack.packb(
            [SNAPSHOT_VERSION, self.seq, [t.to_wire() for t in self.tasks.values()],
             self.cron.to_wire(), self.persisted_index,
             [[key, index, us] for key, (index, us) in self.dirty.items()],
             list(self.endpoints.items())],
            use_bin_type=True)

    def restore(self, data: bytes) -> None:
        self.__init__()
        if not data:
            return
        fields = msgpack.unpackb(data, raw=False)
        if len(fields) == 2:  # before version 2: tasks only, none persisted
            self.seq, wires = fields
            cron_wire, persisted, dirty, endpoints = [], 0, None, []
        else:
            _, self.seq, wires, cron_wire, persisted, dirty, endpoints = fields
        self.endpoints = dict(endpoints)
        for w in wires:
            self._add(Task.from_wire(w))
        self.cron.restore(cron_wire)
        self.changed, self.cron.changed = [], []
        self.persisted_index = persisted
        if dirty is None:
            self.dirty = OrderedDict((tid, (0, 0)) for tid in self.tasks)
            return
        shared: dict[int, tuple[int, int]] = {}
        for key, index, us in dirty:
            self.dirty[key] = shared.setdefault(index, (index, us))

    # ------------------------------------------------------------------ queries

    def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    def ids_with_status(self, status: str) -> dict[str, None]:
        return self.by_status[status]

    def persist_lag(self, now_us: int) -> dict:
        """How far the database is behind: rows to write and the age of the oldest."""
        oldest = next(iter(self.dirty.values()), None)
        return {"pending_rows": len(self.dirty), "persisted_index": self.persisted_index,
                "lag_s": round(max(0, now_us - oldest[1]) / 1e6, 3) if oldest else 0.0}

    # ------------------------------------------------------------------ commands

    def _submit(self, now_us: int, requests: list) -> list:
        """Each request is a list of task wires; returns, per request, [[id, existed]]."""
        out = []
        for wires in requests:
            results = []
            for w in wires:
                (task_id, name, ttype, payload, ctype, prio, queue, labels, timeout, retry,
                 key, run_at) = w
                existing = self._existing(task_id, key)
                if existing is not None:
                    results.append([existing, True])
                    continue
                self.create(task_id, name, ttype, payload, ctype, prio, queue, labels,
                            timeout, retry, key, run_at)
                results.append([task_id, False])
            out.append(results)
        return out

    def create(self, task_id: str, name: str, ttype: str, payload: bytes, ctype: str,
               prio: int, queue: str, labels: list, timeout: float, retry: list, key: str,
               run_at: int, cron_job: str = "") -> Task:
        self.seq += 1
        status = p.SCHEDULED if run_at > self.now_us else p.PENDING
        task = Task(task_id, name, ttype, payload, ctype, prio, queue, tuple(sorted(labels)),
                    timeout, _policy(retry), key, self.now_us, self.seq, status, run_at,
                    cron_job=cron_job)
        self._add(task)
        return task

    def new_pending(self, wire: list, now_us: int) -> Task | None:
        """The PENDING task applying this SUBMIT wire next would create, built without
        touching the state (no seq yet); None for a duplicate or a task due later.
        For the leader's early dispatch."""
        (task_id, name, ttype, payload, ctype, prio, queue, labels, timeout, retry,
         key, run_at) = wire
        if run_at or self._existing(task_id, key) is not None:
            return None
        return Task(task_id, name, ttype, payload, ctype, prio, queue, tuple(sorted(labels)),
                    timeout, _policy(retry), key, now_us, 0, p.PENDING, 0)

    def _existing(self, task_id: str, key: str) -> str | None:
        """The task a submission with this id and idempotency key names already."""
        existing = self.by_key.get(key) if key else None
        if existing is None and task_id in self.tasks:
            existing = task_id  # a client-chosen id submitted twice
        return existing

    def _lease(self, now_us: int, leases: list) -> list[bool]:
        granted = []
        for task_id, number, worker, deadline_us in leases:
            task = self.tasks.get(task_id)
            ok = (task is not None and task.status in (p.PENDING, p.SCHEDULED, p.RETRYING)
                  and number == task.attempt + 1 and not task.cancel_requested)
            if ok:
                if not task.attempts:
                    task.attempts = []
                task.attempts.append(Attempt(number, worker, now_us, deadline_us))
                self._set_status(task, p.RUNNING)
            granted.append(ok)
        return granted

    def _result(self, now_us: int, results: list) -> list[str]:
        """Results reported by workers; one for any but the current attempt is stale."""
        out = []
        for (task_id, number, outcome, exit_code, error, result, log, started_us, finished_us,
             retry_at_us, worker) in results:
            task = self.tasks.get(task_id)
            current = task.current() if task else None
            # Fenced by attempt number and worker: a leader that died before a lease
            # committed may have pushed the same attempt number to another worker.
            if task is None or task.status != p.RUNNING or current is None \
                    or current.number != number or current.worker != worker:
                out.append("stale")
                continue
            current.exit_code, current.error, current.result, current.log = (
                exit_code, error, result, log)
            if started_us:
                current.started_us = started_us
            self._end_attempt(task, current, outcome, finished_us or now_us, retry_at_us)
            out.append(task.status)
        return out

    def _expire(self, now_us: int, expired: list) -> list[str]:
        """Attempts the leader gave up on: the worker died or the lease ran out."""
        out = []
        for task_id, number, outcome, reason, retry_at_us in expired:
            task = self.tasks.get(task_id)
            current = task.current() if task else None
            if task is None or task.status != p.RUNNING or current is None \
                    or current.number != number:
                out.append("stale")
                continue
            current.error = reason
            self._end_attempt(task, current, outcome, now_us, retry_at_us)
            out.append(task.status)
        return out

    def _cancel(self, now_us: int, task_ids: list) -> list[str]:
        """Per task: its status after the request, or 'not_found'."""
        out = []
        for task_id in task_ids:
            task = self.tasks.get(task_id)
            out.append("not_found" if task is None else self.cancel_task(task))
        return out

    def cancel_task(self, task: Task) -> str:
        """Cancel one task; its status afterwards (RUNNING: the leader must kill it)."""
        if task.status in p.TERMINAL:
            return task.status
        task.cancel_requested = True
        if task.status == p.RUNNING:
            self.changed.append(task.id)  # the leader tells the worker to kill it
        else:
            task.finished_us = self.now_us
            self._set_status(task, p.CANCELLED)
        return task.status

    def _purge(self, now_us: int, body: list) -> int:
        """Forget terminal tasks that finished before the cutoff (retention window)."""
        cutoff_us, limit = body
        doomed = []
        for status in p.TERMINAL:
            for task_id in self.by_status[status]:
                if self.tasks[task_id].finished_us < cutoff_us and task_id not in self.dirty:
                    doomed.append(task_id)
                    if len(doomed) >= limit:
                        break
        for task_id in doomed[:limit]:
            task = self.tasks.pop(task_id)
            del self.by_status[task.status][task_id]
            if task.idempotency_key and self.by_key.get(task.idempotency_key) == task_id:
                del self.by_key[task.idempotency_key]
        return len(doomed[:limit])

    def _persisted(self, now_us: int, body: list) -> int:
        """The database holds every change up to `index`: drop that prefix of `dirty`."""
        index = body[0]
        self.persisted_index = max(self.persisted_index, index)
        dropped = 0
        while self.dirty:
            key, (changed_at, _) = next(iter(self.dirty.items()))
            if changed_at > self.persisted_index:
                break
            self.dirty.popitem(last=False)
            dropped += 1
        return dropped

    def _resync(self, now_us: int, body: list) -> int:
        """The database lost what we thought it had (wiped, restored from a backup,
        another database): mark these tasks (and maybe every cron job) as changed, so
        they are written again. The leader sends every live task id, in slices."""
        task_ids, with_cron = body
        self.changed.extend(t for t in task_ids if t in self.tasks)
        if with_cron:
            self.cron.changed.extend(self.cron.jobs)
        return len(task_ids) + (len(self.cron.jobs) if with_cron else 0)

    def _node_endpoint(self, now_us: int, body: list) -> None:
        node_id, endpoint = body
        self.endpoints[node_id] = endpoint

    # ------------------------------------------------------------------ helpers

    def _mark_dirty(self, stamp: tuple[int, int], task_ids: list[str],
                    cron_keys: list[str]) -> None:
        dirty = self.dirty
        for key in task_ids:
            if key in self.tasks:  # a purged task has no row to write
                dirty[key] = stamp
                dirty.move_to_end(key)
        for key in cron_keys:
            dirty[key] = stamp
            dirty.move_to_end(key)

    def _end_attempt(self, task: Task, attempt: Attempt, outcome: str, finished_us: int,
                     retry_at_us: int) -> None:
        attempt.outcome = outcome
        attempt.finished_us = finished_us
        if outcome == p.SUCCEEDED:
            final = p.COMPLETED
        elif task.cancel_requested or outcome == p.KILLED:
            final = p.CANCELLED
        else:
            rejected = sum(1 for a in task.attempts if a.outcome == p.REJECTED)
            if (rejected <= MAX_REJECTIONS if outcome == p.REJECTED
                    else len(task.attempts) - rejected <= task.retry.max_retries):
                task.run_at_us = retry_at_us
                self._set_status(task, p.RETRYING)
                return
            final = p.FAILED
        task.finished_us = finished_us
        self._set_status(task, final)

    def _add(self, task: Task) -> None:
        self.tasks[task.id] = task
        self.by_status[task.status][task.id] = None
        if task.idempotency_key:
            self.by_key[task.idempotency_key] = task.id
        self.changed.append(task.id)

    def _set_status(self, task: Task, status: str) -> None:
        del self.by_status[task.status][task.id]
        task.status = status
        self.by_status[status][task.id] = None
        self.changed.append(task.id)
        if task.cron_job and status in p.TERMINAL:
            self.cron.task_ended(task)  # its job may have a queued tick to start


_HANDLERS = {
    SUBMIT: TaskState._submit,
    LEASE: TaskState._lease,
    RESULT: TaskState._result,
    EXPIRE: TaskState._expire,
    CANCEL: TaskState._cancel,
    PURGE: TaskState._purge,
    PERSISTED: TaskState._persisted,
    RESYNC: TaskState._resync,
    NODE_ENDPOINT: TaskState._node_endpoint,
    **CRON_HANDLERS,
}


_policies: dict[tuple, RetryPolicy] = {}


def _policy(wire: list) -> RetryPolicy:
    """Tasks mostly share a few retry policies: share the (immutable) objects too."""
    key = tuple(wire)
    policy = _policies.get(key)
    if policy is None:
        if len(_policies) > 10_000:
            _policies.clear()
        policy = _policies[key] = RetryPolicy.from_wire(wire)
    return policy


def command(kind: str, now_us: int, body: object) -> bytes:
    return msgpack.packb([kind, now_us, body], use_bin_type=True)
