"""The sentinel that ends an end-to-end run, shared by every peer's worker.

Each peer's worker runs one process with one slot, and every queue here is FIFO, so a
sentinel enqueued after the N no-op tasks runs after all of them: the moment it writes
its file is the moment the N tasks are done. The file holds time.time() at that moment.
"""

from __future__ import annotations

import os
import time


def write_mark(path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(repr(time.time()))
    os.replace(tmp, path)


def wait_mark(path: str, timeout: float) -> float:
    """Wait for the sentinel's file; return the time it recorded, and delete it."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"sentinel {path} not written within {timeout:.0f} s")
        time.sleep(0.002)
    with open(path) as f:
        stamp = float(f.read())
    os.remove(path)
    return stamp
