"""Python task functions that the real-process tests submit (workers import them)."""

import time


def noop() -> None:
    return None


def stamp() -> float:
    """When the task's first line ran, for latency checks."""
    return time.time()


def add(a: int, b: int) -> int:
    return a + b
