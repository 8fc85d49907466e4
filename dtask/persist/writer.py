"""The persister thread: writes the leader's batches to the database, off the loop.

DESIGN.md principle 5: the loop hands over one batch at a time (`submit` only when
not `busy`, so memory stays bounded by one batch) and learns what was committed from
`poll`, woken through an eventfd (`dtask.wakeup`) as in `dtask.raft.writer`. A
database that goes away is a state, not an error: the thread reconnects and retries
the same batch with capped exponential backoff until it is written or the persister
is closed, logging one line when the database goes down and one when it is back.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque

from ..wakeup import Wakeup
from .rows import Batch
from .store import Store, StoreUnavailable, open_store, redact

log = logging.getLogger("dtask.persist")

CONNECTING, OK, DOWN = "connecting", "ok", "down"
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0

_REFRESH = object()  # a job: read the database's last index again


class Persister:
    def __init__(self, dsn: str, name: str = "persister",
                 timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.timeout = timeout  # connecting; SQLite's wait for the write lock
        self.name = redact(dsn)
        self.wake = Wakeup()  # the loop polls wake.fd
        self._jobs: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._done: deque[int] = deque()  # last_index of committed batches, for poll()
        self._busy = False
        self._stop = threading.Event()
        self._store: Store | None = None
        self.state = CONNECTING
        self.last_error = ""
        self.db_index: int | None = None
        self._down_since = 0.0
        self._rows = self._batches = 0
        self._last_batch_s = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ------------------------------------------------------------------ loop side

    def start(self) -> None:
        self._thread.start()

    def busy(self) -> bool:
        return self._busy

    def submit(self, batch: Batch) -> None:
        """Hand over the next batch; only when not busy (one batch in flight)."""
        if self._busy:
            raise RuntimeError("persister busy: submit only when busy() is False")
        self._busy = True
        self._jobs.put(batch)

    def refresh_index(self) -> None:
        """Read the database's last index again (a new leader must not trust the value
        read when this node started: another leader has written since). `db_index` is
        None until it is read; only when not busy."""
        if self._busy:
            raise RuntimeError("persister busy: refresh only when busy() is False")
        self._busy = True
        self.db_index = None
        self._jobs.put(_REFRESH)

    def poll(self, woken: bool = True) -> list[int]:
        """The last_index of each batch committed since the last call. `woken`: the
        loop saw `wake.fd` readable, so drain it (a drain that finds nothing costs a
        system call and an exception, on every loop turn otherwise)."""
        if woken:
            self.wake.take()
        done = self._done
        return [done.popleft() for _ in range(len(done))]

    def stats(self) -> dict:
        return {"state": self.state, "db_index": self.db_index, "rows": self._rows,
                "batches": self._batches, "last_batch_s": self._last_batch_s,
                "last_error": self.last_error, "busy": self._busy}

    def close(self, timeout: float = 10) -> None:
        """Stop the thread; a batch not yet written is dropped (Raft still has it)."""
        self._stop.set()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():  # it may still notify: leave the fd open
                log.warning("event=persist_close_timeout dsn=%s timeout_s=%.1f",
                            self.name, timeout)
                return
        self.wake.close()

    # ------------------------------------------------------------------ thread side

    def _run(self) -> None:
        delay = BACKOFF_MIN
        batch: Batch | None = None
        try:
            while not self._stop.is_set():
                if self._store is None and not self._connect(pending=batch is not None):
                    delay = self._backoff(delay)
                    continue
                if batch is None:
                    batch = self._jobs.get()
                    if batch is None:
                        return
                if batch is _REFRESH:
                    if self._read_index():
                        batch, delay = None, BACKOFF_MIN
                    else:
                        delay = self._backoff(delay)
                    continue
                if self._write(batch):
                    batch, delay = None, BACKOFF_MIN
                else:
                    delay = self._backoff(delay)
        finally:
            if self._store is not None:
                self._store.close()

    def _connect(self, pending: bool) -> bool:
        try:
            store = open_store(self.dsn, timeout=self.timeout)
            index = store.last_index()
        except StoreUnavailable as exc:
            self._set_down(str(exc))
            return False
        except Exception as exc:  # a bad DSN or schema: keep trying, loudly, once
            self._set_down(f"{type(exc).__name__}: {exc}", unexpected=True)
            return False
        self._store = store
        # Re-read on every connect: the database may have been restored meanwhile.
        self.db_index = index
        if self.state == CONNECTING or not pending:
            self._set_up()
        # else: "up" once the batch that failed is written, so an outage that lets us
        # connect but not write (a full disk) logs one line, not one per retry.
        return True

    def _read_index(self) -> bool:
        try:
            index = self._store.last_index()
        except StoreUnavailable as exc:
            self._store.close()
            self._store = None
            self._set_down(str(exc))
            return False
        self.db_index = index
        self._busy = False
        if self.state != OK:
            self._set_up()
        self._notify()
        return True

    def _write(self, batch: Batch) -> bool:
        started = time.perf_counter()
        try:
            self._store.write(batch)
        except StoreUnavailable as exc:
            self._store.close()
            self._store = None  # a fresh connection for the retry
            self._set_down(str(exc))
            return False
        except Exception as exc:  # bad data or a bug: the transaction rolled back
            self._set_down(f"{type(exc).__name__}: {exc}", unexpected=True)
            return False
        self._last_batch_s = time.perf_counter() - started
        self._rows += batch.rows()
        self._batches += 1
        self.db_index = max(self.db_index or 0, batch.last_index)
        self._done.append(batch.last_index)
        self._busy = False
        if self.state != OK:
            self._set_up()
        self._notify()
        return True

    def _set_down(self, error: str, unexpected: bool = False) -> None:
        self.last_error = error.splitlines()[0] if error else "unknown error"
        if self.state == DOWN:
            return
        self.state, self._down_since = DOWN, time.monotonic()
        if unexpected:  # not an outage: a bug or bad data, worth a traceback-free error
            log.error("event=persist_down dsn=%s error=%r", self.name, self.last_error)
        else:
            log.warning("event=persist_down dsn=%s error=%r", self.name, self.last_error)
        self._notify()

    def _set_up(self) -> None:
        if self.state == DOWN:
            log.info("event=persist_up dsn=%s down_s=%.1f db_index=%d", self.name,
                     time.monotonic() - self._down_since, self.db_index)
        else:
            log.info("event=persist_connected dsn=%s db_index=%d", self.name, self.db_index)
        self.state, self.last_error = OK, ""
        self._notify()

    def _backoff(self, delay: float) -> float:
        self._stop.wait(delay * random.uniform(0.8, 1.2))
        return min(delay * 2, BACKOFF_MAX)

    def _notify(self) -> None:
        self.wake.notify()
