"""A node's disk writes on one dedicated thread, so its poll loop never blocks in fsync.

DESIGN.md principle 5: blocking work runs on its own thread and talks to the loop
through a queue and an eventfd that wakes it (`dtask.wakeup`). Jobs run strictly in
order; the loop hands over the next write only after the previous one finished, and
everything appended meanwhile joins that next write (group commit).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from dtask.wakeup import Wakeup


class StorageWriter:
    def __init__(self, name: str = "raft-writer") -> None:
        self.wake = Wakeup()  # the loop polls wake.fd
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def finished(self) -> int:
        """How many jobs finished since the last call; raises a job's error in the loop."""
        n = self.wake.take()
        if self.error is not None:
            raise self.error  # a failed fsync: the node must stop, not carry on
        return n

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():  # else it may still notify: leave the fd open
            self.wake.close()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException as exc:  # handed to the loop thread by finished()
                self.error = exc
            self.wake.notify()
