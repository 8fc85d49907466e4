"""`python -m dtask.worker.groupguard`: kill a vanished worker's task process groups.

Every task runs in its own process group. When the worker is SIGKILLed (or dies
any other way) it cannot kill them, and they would run on beside the retry of the
same attempt elsewhere. This small process, started by the worker in a session of
its own, reads on stdin which groups are live (5-byte records: b"+" or b"-" and the
group id, 4 bytes little-endian). When the worker is gone its end of the pipe
closes; the guard then SIGKILLs every group still live and exits.

It replaces PR_SET_PDEATHSIG in each task, which needed a `preexec_fn` (a full fork
of the worker plus Python in the child: ~2.4 ms per spawn against ~0.7 ms) and only
covered a task's first process, not what it forked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

RECORD = 5
WATCH, FORGET = b"+", b"-"
POLL = 0.05  # read at most this often: a burst of spawns wakes the guard once


def encode(op: bytes, pgid: int) -> bytes:
    return op + pgid.to_bytes(4, "little")


def main() -> int:
    # Outlive a graceful stop of the worker (SIGTERM/SIGINT to everyone): the guard
    # leaves when the pipe closes, after the worker has finished its own cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    live: set[int] = set()
    pending = b""
    while True:
        data = os.read(0, 1 << 16)
        if not data:
            break
        pending += data
        whole = len(pending) - len(pending) % RECORD
        for i in range(0, whole, RECORD):
            pgid = int.from_bytes(pending[i + 1:i + RECORD], "little")
            if pending[i:i + 1] == WATCH:
                live.add(pgid)
            else:
                live.discard(pgid)
        pending = pending[whole:]
        time.sleep(POLL)
    for pgid in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
