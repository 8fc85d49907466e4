"""Dramatiq with the Redis broker (db 5): one process, one thread (`-p 1 -t 1`).

Dramatiq acknowledges a message after the actor ran; a dead worker's messages are
requeued once its heartbeat times out.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.suite import redisdb
from bench.suite.drain import drain_rates, timed_rate
from bench.suite.mark import write_mark
from bench.suite.model import Config

broker = RedisBroker(url=redisdb.URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", max_retries=0)
def noop() -> None:
    return None


@dramatiq.actor(queue_name="bench", max_retries=0)
def mark(path: str) -> None:
    write_mark(path)


def _enqueue(n: int) -> None:
    for _ in range(n):
        noop.send()


def _e2e(n: int, runs: int) -> list[float]:
    redisdb.flush()
    try:
        return drain_rates(["dramatiq", "bench.suite.peer_dramatiq", "-p", "1", "-t", "1",
                            "-Q", "bench"], _enqueue, mark.send, n, runs)
    finally:
        redisdb.flush()


def _submit_one(seconds: float) -> float:
    redisdb.flush()
    try:
        return timed_rate(seconds, lambda: (noop.send(), 1)[1])
    finally:
        redisdb.flush()


def configs() -> list[Config]:
    return [Config("dramatiq", "dramatiq", "Redis broker, 1 process x 1 thread",
                   f"1 node, {redisdb.persistence()}, ack-late",
                   e2e=_e2e, submit_one=_submit_one)]
