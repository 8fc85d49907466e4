"""Huey with Redis (db 5): one worker process (`huey_consumer -w 1 -k process`).

Huey acknowledges a task when it dequeues it (a worker killed mid-task loses it) and
stores results in Redis; a no-op's None result is not stored.
"""

from __future__ import annotations

from huey import RedisHuey

from bench.suite import redisdb
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


def _enqueue(n: int) -> None:
    for _ in range(n):
        noop()


def _e2e(n: int, runs: int) -> list[float]:
    redisdb.flush()
    try:
        return drain_rates(["huey_consumer", "bench.suite.peer_huey.huey", "-w", "1",
                            "-k", "process", "-C", "-q"], _enqueue, mark, n, runs)
    finally:
        redisdb.flush()


def _submit_one(seconds: float) -> float:
    redisdb.flush()
    try:
        return timed_rate(seconds, lambda: (noop(), 1)[1])
    finally:
        redisdb.flush()


def configs() -> list[Config]:
    return [Config("huey", "huey", "RedisHuey, 1 worker process",
                   f"1 node, {redisdb.persistence()}, acked on dequeue",
                   e2e=_e2e, submit_one=_submit_one)]
