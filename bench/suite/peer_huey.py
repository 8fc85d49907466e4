"""Huey with Redis (db 5): W worker processes (`huey_consumer -w W -k process`), and
its thread worker (`-k thread`: one process, W threads).

Huey acknowledges a task when it dequeues it (a worker killed mid-task loses it) and
stores results in Redis; a no-op's None result is not stored.
"""

from __future__ import annotations

from huey import RedisHuey

from bench.suite import latency, redisdb
from bench.suite.drain import drain_rates, timed_rate
from bench.suite.mark import write_mark
from bench.suite.model import Config

huey = RedisHuey("bench", url=redisdb.URL)


@huey.task()
def noop() -> None:
    return None


@huey.task()
def mark(path: str) -> None:
    write_mark(path)


@huey.task()
def stamp(path: str, i: int) -> None:
    latency.record(path, i)


def _enqueue(n: int) -> None:
    for _ in range(n):
        noop()


def _argv(workers: int, kind: str = "process") -> list[str]:
    return ["huey_consumer", "bench.suite.peer_huey.huey", "-w", str(workers), "-k", kind,
            "-C", "-q"]


@redisdb.flushed
def _e2e(n: int, runs: int, workers: int = 1) -> list[float]:
    return drain_rates(_argv(workers), _enqueue, mark, n, runs)


@redisdb.flushed
def _e2e_threads(n: int, runs: int, workers: int = 1) -> list[float]:
    """One consumer process with W threads (Huey's thread worker)."""
    return drain_rates(_argv(workers, "thread"), _enqueue, mark, n, runs)


@redisdb.flushed
def _latency(rate: float, count: int, runs: int) -> list[list[float]]:
    return latency.delays(_argv(1), stamp, mark, rate, count, runs)


def _one_client(seconds: float) -> float:
    return timed_rate(seconds, lambda: (noop(), 1)[1])


def configs() -> list[Config]:
    return [Config("huey", "huey", "RedisHuey, W worker processes",
                   f"1 node, {redisdb.persistence()}, acked on dequeue",
                   e2e=_e2e, latency=_latency,
                   **redisdb.submitters(_one_client)),
            Config("huey", "huey threads", "RedisHuey, 1 process with W worker threads",
                   f"1 node, {redisdb.persistence()}, acked on dequeue", e2e=_e2e_threads)]
