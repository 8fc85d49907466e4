"""Garbage-collector settings for daemons that hold millions of long-lived objects.

CPython's cyclic collector scans every tracked object on a full collection. With a
million tasks in the state machine that is a pause of a second or more — longer
than a Raft election timeout, so the leader loses its lease and the cluster churns
through elections. Long-lived objects are moved out of the collector's sight with
`gc.freeze()` (refcounting still frees them when they are dropped; only reference
cycles among them would leak, and the task state has none), and young collections
run less often.
"""

from __future__ import annotations

import gc
import time


class GCPolicy:
    def __init__(self, freeze_every: float = 1.0) -> None:
        gc.set_threshold(50_000, 20, 100)
        self.freeze_every = freeze_every
        self._next = time.monotonic() + freeze_every

    def maybe_freeze(self, now: float) -> None:
        """Call from the loop: every `freeze_every` seconds, freeze what has survived."""
        if now >= self._next:
            self._next = now + self.freeze_every
            gc.collect(1)  # young garbage first, so it is not frozen alive
            gc.freeze()
