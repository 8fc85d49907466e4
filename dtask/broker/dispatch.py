"""The leader's dispatch state: ready queues, timers, workers and their free slots.

None of this is replicated. A new leader builds it from the state machine alone
(`rebuild`), then keeps it in step with `sync(task_id)` after every apply. Ready
tasks wait in one Cython `ReadyQueue` per route (queue, labels, type): a worker
serves a route when it listens on the queue, has all the labels and offers the
executor. Timers (eta, retry backoff, lease deadlines) live in one `TimerQueue`.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .. import protocol as p
from .._fastqueue import ReadyQueue, TimerQueue
from ..protocol import RetryPolicy
from .state import WIRE_ID, WIRE_KEY, Task, TaskState

Route = tuple[str, tuple[str, ...], str]  # (queue, sorted labels, task type)
LEASE_PREFIX = "lease:"


@dataclass(slots=True)
class WorkerInfo:
    id: str
    ident: bytes  # the worker's ROUTER identity: where RUN and KILL go
    host: str = ""
    pid: int = 0
    concurrency: int = 0
    prefetch: int = 0  # tasks it takes beyond its slots right now (it says so in each report)
    queues: frozenset[str] = frozenset()
    labels: frozenset[str] = frozenset()
    executors: frozenset[str] = frozenset()
    last_seen: float = 0.0  # time.monotonic()
    registered: bool = True  # False: known only from the state (a RUNNING lease)
    running: set[str] = field(default_factory=set)  # leases the state gives it
    # Tasks pushed to it whose result has not arrived yet (-> when, time.monotonic()):
    # what occupies its slots. Counted here rather than trusted from its heartbeats,
    # whose "free slots" can be stale by the time they arrive (overtaken by a push).
    assigned: dict[str, float] = field(default_factory=dict)
    draining: bool = False  # it reported no free slot while we counted some: stop
    drain_requested: bool = False  # an operator asked it to drain: never again
    missing: set[str] = field(default_factory=set)  # leased here, absent from a heartbeat

    def capacity(self) -> int:
        return self.concurrency + self.prefetch

    def free(self) -> int:
        if self.draining or self.drain_requested:
            return 0
        return self.capacity() - len(self.assigned)

    def free_slots(self) -> int:
        """For operators: slots not holding a task (a prefetched one holds a slot here)."""
        if self.draining or self.drain_requested:
            return 0
        return max(0, self.concurrency - len(self.assigned))

    def report_credits(self, credits: int, prefetch: int | None = None) -> None:
        """The worker's own count of free slots: only ever used to stop sending.
        `prefetch` (absent from older workers) is how many tasks it now takes beyond
        its slots: it asks for none while its tasks are long."""
        if prefetch is not None:
            self.prefetch = prefetch
        self.draining = credits == 0 and len(self.assigned) < self.capacity()

    def serves(self, route: Route) -> bool:
        queue, labels, ttype = route
        return (queue in self.queues and ttype in self.executors
                and all(label in self.labels for label in labels))


def backoff_us(retry: RetryPolicy, attempt: int, rng: random.Random) -> int:
    """Delay before retry number `attempt` (1-based): exponential, capped, jittered."""
    delay = min(retry.initial * retry.multiplier ** (attempt - 1), retry.max_delay)
    if retry.jitter:
        delay *= 1 + rng.uniform(-retry.jitter, retry.jitter)
    return int(max(delay, 0) * 1e6)


class Dispatcher:
    def __init__(self, state: TaskState, worker_timeout: float, lease_grace: float,
                 clock_us: Callable[[], int] | None = None) -> None:
        self.state = state
        self.clock_us = clock_us or _now_us  # wall clock in µs; tests pass a fake one
        self.worker_timeout = worker_timeout
        self.lease_grace = lease_grace
        self.ready: dict[Route, ReadyQueue] = {}
        self.timers = TimerQueue()
        self.workers: dict[str, WorkerInfo] = {}
        self.leasing: set[str] = set()  # lease proposed, not applied yet
        # Tasks leased early (assign_early): their SUBMIT is not applied yet, so the
        # state does not hold them.
        self.early: dict[str, Task] = {}
        self.early_leases = 0  # how many, for operators
        self.worker_of: dict[str, str] = {}  # running task id -> worker id
        self.rebuilding = False
        self._todo: Iterator[str] = iter(())
        self.rng = random.Random()

    # ------------------------------------------------------------------ state sync

    def rebuild(self) -> None:
        """Take over as leader: index every live task at once (tests, small states)."""
        self.start_rebuild()
        while not self.rebuild_step(1 << 30):
            pass

    def start_rebuild(self) -> None:
        """Index every live task, in steps: a million tasks take seconds, and a loop
        blocked that long would miss its heartbeats and lose the leadership it is
        taking up. Nothing is dispatched until the index is complete."""
        ids = []
        for status in (p.PENDING, p.SCHEDULED, p.RETRYING, p.RUNNING):
            ids.extend(self.state.ids_with_status(status))
        self._todo = iter(ids)
        self.rebuilding = True

    def rebuild_step(self, budget: int = 10_000) -> bool:
        """Index up to `budget` more tasks; True once every task is indexed."""
        now = time.monotonic()
        done = 0
        for task_id in itertools.islice(self._todo, budget):
            self.sync(task_id, now)  # idempotent: a task synced since is synced again
            done += 1
        if done < budget:  # the iterator ran out
            self.rebuilding = False
        return not self.rebuilding

    def sync(self, task_id: str, now: float | None = None) -> None:
        """Bring the queues in line with the task's replicated state."""
        self.early.pop(task_id, None)  # its SUBMIT applied (or its lease was refused)
        task = self.state.get(task_id)
        if task is not None:
            self._unqueue(task)
        self.timers.remove(task_id)
        self.timers.remove(LEASE_PREFIX + task_id)
        self._forget_running(task_id)
        if task is None or task.status in p.TERMINAL:
            return
        if task.status == p.RUNNING:
            self._track_running(task, now or time.monotonic())
        elif task.status == p.PENDING or task.run_at_us <= self.clock_us():
            self._enqueue(task)
        else:
            self.timers.push(task_id, task.run_at_us)

    def _enqueue(self, task: Task) -> None:
        if task.id in self.leasing or task.cancel_requested:
            return
        route = _route(task)
        q = self.ready.get(route)
        if q is None:
            q = self.ready[route] = ReadyQueue()
        q.push(task.id, task.priority, task.seq)

    def _unqueue(self, task: Task) -> None:
        # A task's route never changes, so it is recomputed rather than remembered
        # (a dict of a million routes would cost ~100 bytes per pending task).
        q = self.ready.get(_route(task))
        if q is not None:
            q.remove(task.id)

    def _track_running(self, task: Task, now: float) -> None:
        attempt = task.current()
        assert attempt is not None
        worker = self.workers.get(attempt.worker)
        if worker is None:
            # Known only from the log (we just became leader): it has worker_timeout
            # to register again before its leases are revoked.
            worker = self.workers[attempt.worker] = WorkerInfo(
                attempt.worker, b"", last_seen=now, registered=False)
        worker.running.add(task.id)
        self.worker_of[task.id] = worker.id
        if attempt.deadline_us:
            self.timers.push(LEASE_PREFIX + task.id, attempt.deadline_us)

    def _forget_running(self, task_id: str) -> None:
        worker_id = self.worker_of.pop(task_id, None)
        if worker_id is not None and worker_id in self.workers:
            self.workers[worker_id].running.discard(task_id)

    # ------------------------------------------------------------------ time

    def next_due_us(self) -> int | None:
        return self.timers.next_due()

    def fire_timers(self, now_us: int) -> list[tuple[str, int, str, str]]:
        """Due etas and backoffs make tasks ready; due leases become expirations."""
        expired = []
        for key in self.timers.pop_due(now_us):
            if key.startswith(LEASE_PREFIX):
                task = self.state.get(key[len(LEASE_PREFIX):])
                if task is not None and task.status == p.RUNNING:
                    expired.append((task.id, task.attempt, p.TIMED_OUT,
                                    "lease deadline passed (timeout + grace)"))
            else:
                task = self.state.get(key)
                if task is not None and task.status in (p.SCHEDULED, p.RETRYING):
                    self._enqueue(task)
        return expired

    def dead_workers(self, now: float) -> list[WorkerInfo]:
        """Workers silent for longer than worker_timeout: forget them."""
        dead = [w for w in self.workers.values() if now - w.last_seen > self.worker_timeout]
        for w in dead:
            del self.workers[w.id]
        return dead

    # ------------------------------------------------------------------ workers

    def register(self, info: WorkerInfo, running: set[str] | None = None) -> WorkerInfo:
        """`running`: the task ids the worker says occupy its slots right now."""
        old = self.workers.get(info.id)
        if old is not None:
            info.running = old.running  # leases survive a re-registration
        now = time.monotonic()
        info.assigned = dict.fromkeys(running or (), now)
        if old is not None:
            info.assigned.update((t, at) for t, at in old.assigned.items() if t in self.leasing)
        self.workers[info.id] = info
        return info

    def retry_at_us(self, task: Task, now_us: int, attempt: int) -> int:
        """When to retry after `attempt` failed: the leader's choice, carried in the entry."""
        return now_us + backoff_us(task.retry, max(attempt, 1), self.rng)

    # ------------------------------------------------------------------ dispatch

    def task(self, task_id: str) -> Task | None:
        """The task from the state, or one leased early whose SUBMIT has not applied."""
        return self.state.tasks.get(task_id) or self.early.get(task_id)

    def assign_early(self, wires: Iterable[list], now_us: int, in_flight: Iterable[list] = ()
                     ) -> list[tuple[str, int, str, int]]:
        """Lease newly proposed tasks to idle workers before their SUBMIT commits.

        A task submitted while a worker that serves it sits idle would otherwise wait
        a whole quorum round (its SUBMIT's commit) before its lease is even proposed.
        Its lease is proposed right behind its SUBMIT instead (the log keeps that
        order, so every replica applies the lease to the task the SUBMIT created) and
        it is pushed at once. Only to a worker with free room and no queued task it
        could run, so nothing queued is overtaken; higher priorities first. If this
        leader dies before the SUBMIT commits, the task may have run although no
        replica holds it: the client, not acknowledged, submits it again with the
        same idempotency key (at-least-once). Returns leases as `assign` does.

        `in_flight`: the wires of SUBMITs this leader proposed earlier that have not
        applied yet. A task that shares an id or key with one of them is a duplicate
        the state does not show yet (a client resending before its first try
        committed): it must not run, so it is left to the SUBMIT to settle. The
        caller must not call this before the state has applied every entry of
        earlier terms, whose SUBMITs it does not track.
        """
        if self.rebuilding:
            return []
        idle = [w for w in self.workers.values()
                if w.registered and w.free() > 0 and self._best_for(w) is None]
        if not idle:
            return []
        served: dict[Route, bool] = {}
        wanted = []
        # One task per id and per key, counting those leased early before (few) and
        # those still being submitted (few while a worker is idle).
        ids = set(self.early)
        keys = {t.idempotency_key for t in self.early.values()}
        for wire in in_flight:
            ids.add(wire[WIRE_ID])
            keys.add(wire[WIRE_KEY])
        for wire in wires:
            task = self.state.new_pending(wire, now_us)
            if task is None or task.id in ids:
                continue
            ids.add(task.id)
            if task.idempotency_key:
                if task.idempotency_key in keys:
                    continue
                keys.add(task.idempotency_key)
            route = _route(task)
            if route not in served:
                served[route] = any(w.serves(route) for w in idle)
            if served[route]:
                wanted.append(task)
        # Higher priorities first, FIFO within one (nsmallest is stable).
        room = sum(w.free() for w in idle)
        now = time.monotonic()
        leases = []
        for task in heapq.nsmallest(room, wanted, key=lambda t: -t.priority):
            route = _route(task)
            worker = max((w for w in idle if w.free() > 0 and w.serves(route)),
                         key=WorkerInfo.free, default=None)
            if worker is None:
                continue
            self.early[task.id] = task
            leases.append(self._lease(task, worker, now, now_us))
        self.early_leases += len(leases)
        return leases

    def assign(self, now_us: int) -> list[tuple[str, int, str, int]]:
        """Match ready tasks to free worker slots: most free slots first, best task first.

        Returns leases to propose: (task id, attempt, worker id, deadline_us). The
        tasks leave the ready queues now and come back if the lease is refused.
        """
        if self.rebuilding or not any(self.ready.values()):
            return []
        heap = [(-w.free(), w.id) for w in self.workers.values() if w.registered and w.free() > 0]
        now = time.monotonic()
        heapq.heapify(heap)
        leases = []
        while heap:
            neg_free, worker_id = heapq.heappop(heap)
            worker = self.workers[worker_id]
            task = self._best_for(worker)
            if task is None:
                continue  # nothing this worker can run; others may still find work
            self._unqueue(task)
            leases.append(self._lease(task, worker, now, now_us))
            if worker.free() > 0:
                heapq.heappush(heap, (neg_free + 1, worker_id))
        return leases

    def _lease(self, task: Task, worker: WorkerInfo, now: float,
               now_us: int) -> tuple[str, int, str, int]:
        self.leasing.add(task.id)
        worker.assigned[task.id] = now
        deadline = now_us + int((task.timeout + self.lease_grace) * 1e6) if task.timeout else 0
        return (task.id, task.attempt + 1, worker.id, deadline)

    def _best_for(self, worker: WorkerInfo) -> Task | None:
        best: Task | None = None
        for route, q in self.ready.items():
            if not q or not worker.serves(route):
                continue
            task = self.state.tasks[q.peek()]
            if best is None or (task.priority, -task.seq) > (best.priority, -best.seq):
                best = task
        return best

    def lease_settled(self, task_id: str, worker_id: str, granted: bool) -> None:
        """The LEASE entry applied; a refused lease gives the slot back.

        A granted lease made the task RUNNING, so the state lists it as changed and the
        caller syncs it after this apply (its queues do not depend on `leasing` any
        more); a refused one may have changed nothing, and leaving `leasing` can make
        it queueable again, so it is synced here."""
        self.leasing.discard(task_id)
        if granted:
            return
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.assigned.pop(task_id, None)
        self.sync(task_id)

    def stats(self) -> dict:
        return {"ready": sum(len(q) for q in self.ready.values()), "timers": len(self.timers),
                "workers": len(self.workers), "leasing": len(self.leasing),
                "early_leases": self.early_leases}


def _route(task: Task) -> Route:
    return (task.queue, task.labels, task.type)  # labels are stored sorted


def _now_us() -> int:
    return time.time_ns() // 1000
