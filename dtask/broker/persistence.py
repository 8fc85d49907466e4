"""The leader's side of write-behind persistence: from the state's `dirty` list to batches.

The persister thread (`dtask.persist.writer`) writes; this module decides what. Every
loop turn on the leader it:

1. collects the batches the thread finished and proposes PERSISTED with the index the
   last one reached, so every replica drops that prefix of `dirty`;
2. if the thread is idle, builds the next batch from the front of `dirty` (the oldest
   changes first), at most `max_rows` rows, never splitting the changes of one Raft
   entry across batches, so "the database holds everything up to index N" stays true
   for the index stored with each batch.

When it becomes leader it first reconciles with the database: the database's own index
says what it holds. If the database is ahead of the replicated watermark (the previous
leader died between its commit and PERSISTED), PERSISTED catches the state up. If it is
behind (wiped, restored from a backup, or a different database), RESYNC marks every
live task dirty again, in slices, so all of it is written.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from ..persist.rows import Batch, attempt_rows, task_row
from . import state as sm

if TYPE_CHECKING:
    from ..persist.writer import Persister
    from .server import SchedulerServer

log = logging.getLogger("dtask.broker.persistence")

RESYNC_SLICE = 5_000  # task ids per RESYNC entry
# A batch at most this often (unless a full one is waiting): each is a database commit
# with an fsync, on the same disks as the Raft log, and the GIL is shared with the loop.
FLUSH_INTERVAL = 0.1
WORKER_ROWS_EVERY = 5.0  # seconds between refreshes of the workers table


class PersistFeed:
    def __init__(self, server: SchedulerServer, persister: Persister,
                 max_rows: int = 10_000) -> None:
        self.server = server
        self.state = server.state
        self.persister = persister
        self.max_rows = max_rows
        self.cursor: int | None = None  # every change at or before it was handed over
        self._proposed = 0  # highest PERSISTED proposed this term
        self._workers_due = 0.0
        self._next_flush = 0.0
        self._worker_rows_sent: dict[str, tuple] = {}  # id -> its last row
        self._resync: list[str] | None = None  # task ids still to mark, when resyncing
        self._refresh = False
        self.leading = False

    def on_leader(self) -> None:
        self.leading = True
        self.cursor = None  # unknown until reconciled with the database
        self._proposed = 0
        self._resync = None
        self._refresh = True  # what the database holds now, not when we connected

    def on_follower(self) -> None:
        self.leading = False

    def step(self, now_us: int, woken: bool = True) -> None:
        """`woken`: the loop saw the persister's wake socket readable."""
        finished = self.persister.poll(woken)
        # Our own flag, not the node's: the node can be leader a moment before
        # on_leader() has run, and reconciling then would use a stale database index.
        if not (self.leading and self.server.node.is_leader):
            return
        if finished and finished[-1] > max(self._proposed, self.state.persisted_index):
            self._propose_persisted(finished[-1], now_us)
        if self._refresh:
            if self.persister.busy():
                return  # a batch of an earlier term still in flight
            self.persister.refresh_index()
            self._refresh = False
        if self.cursor is None and not self._reconcile(now_us):
            return
        if self._resync:
            ids, self._resync = self._resync[:RESYNC_SLICE], self._resync[RESYNC_SLICE:]
            self.server.propose(sm.RESYNC, now_us, [ids, False], _ignore)
        now = time.monotonic()
        if not self.persister.busy() and (now >= self._next_flush
                                          or len(self.state.dirty) >= self.max_rows):
            batch = self.next_batch()
            if batch is not None:
                self.persister.submit(batch)
                self.cursor = batch.last_index
                self._next_flush = now + FLUSH_INTERVAL

    def _reconcile(self, now_us: int) -> bool:
        db_index = self.persister.db_index
        if db_index is None:
            return False  # not connected yet: dirty keeps growing, nothing is lost
        watermark = self.state.persisted_index
        if db_index < watermark:
            log.warning("event=persist_resync db_index=%d persisted_index=%d tasks=%d "
                        "reason=database_behind", db_index, watermark, len(self.state.tasks))
            self._resync = list(self.state.tasks)
            self.server.propose(sm.RESYNC, now_us, [[], True], _ignore)  # the cron jobs
        elif db_index > watermark:
            self._propose_persisted(db_index, now_us)
        self.cursor = db_index
        return True

    def _propose_persisted(self, index: int, now_us: int) -> None:
        self._proposed = index
        self.server.propose(sm.PERSISTED, now_us, [index], _ignore)

    def next_batch(self) -> Batch | None:
        """The oldest changes not yet handed over, as one batch (None: nothing to do)."""
        tasks, cron = self.state.tasks, self.state.cron.jobs
        batch = Batch()
        taken, last = 0, 0
        for key, (index, _) in self.state.dirty.items():
            if index <= self.cursor:
                continue  # handed over already; dropped when its PERSISTED applies
            if taken >= self.max_rows and index != last:
                break  # a batch ends on an entry boundary
            taken += 1
            last = index
            if key.startswith(sm.CRON_KEY):
                name = key[len(sm.CRON_KEY):]
                job = cron.get(name)
                if job is None:
                    batch.cron_deleted.append(name)
                else:
                    batch.cron_jobs.append(self.server.crondesk.row(job, index))
                continue
            task = tasks.get(key)
            if task is not None:
                batch.tasks.append(task_row(task, index))
                if task.attempts:
                    batch.attempts.extend(attempt_rows(task, index))
        now = time.monotonic()
        if now >= self._workers_due:
            self._workers_due = now + WORKER_ROWS_EVERY
            batch.workers = self._worker_rows()
        if not taken and not batch.workers:
            return None
        batch.last_index = last or self.cursor
        return batch

    def _worker_rows(self) -> list[tuple]:
        """Every known worker, and a last row marked "gone" for those that left."""
        dispatcher = self.server.dispatcher
        workers = dispatcher.workers.values() if dispatcher is not None else ()
        now_us = time.time_ns() // 1000
        now = time.monotonic()
        sent, self._worker_rows_sent = self._worker_rows_sent, {}
        for w in workers:
            state = "draining" if w.drain_requested else (
                "registered" if w.registered else "missing")
            previous = sent.get(w.id)
            registered_us = previous[8] if previous else now_us
            last_seen_us = now_us - int((now - w.last_seen) * 1e6)
            self._worker_rows_sent[w.id] = (
                w.id, w.host, w.pid, w.concurrency, _json(w.queues), _json(w.labels),
                _json(w.executors), state, registered_us, last_seen_us)
        rows = list(self._worker_rows_sent.values())
        rows += [row[:7] + ("gone",) + row[8:] for wid, row in sent.items()
                 if wid not in self._worker_rows_sent]
        return rows

    def stats(self) -> dict:
        out = self.state.persist_lag(time.time_ns() // 1000)
        out.update(self.persister.stats())
        return out


def _json(items) -> str:
    return json.dumps(sorted(items), separators=(",", ":"))


def _ignore(_: object, __: Exception | None) -> None:
    """PERSISTED and RESYNC are retried by the next leader if this one loses them."""
