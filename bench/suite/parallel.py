"""Submit throughput from several client processes at once.

Each client is a fresh (spawned) process, so no broker connection is shared across a
fork; all of them import and connect first, then start together at a barrier and submit
one by one for the same number of seconds. The figure is the sum of their rates.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable


def _client(one_client: Callable[[float], float], seconds: float, barrier, out) -> None:  # noqa: ANN001
    one_client(0.05)  # connect and warm up before the start line
    barrier.wait()
    out.put(one_client(seconds))


def summed_rate(one_client: Callable[[float], float], seconds: float, clients: int) -> float:
    """one_client(seconds) -> tasks/s must be picklable (a module-level function or a
    functools.partial of one)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    ps = [ctx.Process(target=_client, args=(one_client, seconds, barrier, out), daemon=True)
          for _ in range(clients)]
    for p in ps:
        p.start()
    try:
        return sum(out.get(timeout=120 + seconds) for _ in ps)
    finally:
        for p in ps:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
