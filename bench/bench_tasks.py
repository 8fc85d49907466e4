"""Task functions the benchmarks' workers import (`--import bench_tasks`)."""

import time


def stamp() -> float:
    """When the task's first line ran: the end of a submit-to-start measurement."""
    return time.time()


def noop() -> None:
    return None
