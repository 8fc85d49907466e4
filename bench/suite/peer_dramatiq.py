"""Dramatiq with the Redis broker (db 5): one process, one thread (`-p 1 -t 1`).

Dramatiq acknowledges a message after the actor ran; a dead worker's messages are
requeued once its heartbeat times out.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.suite import latency, redisdb
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


@dramatiq.actor(queue_name="bench", max_retries=0)
def stamp(path: str, i: int) -> None:
    latency.record(path, i)


def _enqueue(n: int) -> None:
    for _ in range(n):
        noop.send()


def _argv(workers: int) -> list[str]:
    return ["dramatiq", "bench.suite.peer_dramatiq", "-p", str(workers), "-t", "1",
            "-Q", "bench"]


@redisdb.flushed
def _e2e(n: int, runs: int, workers: int = 1) -> list[float]:
    return drain_rates(_argv(workers), _enqueue, mark.send, n, runs)


@redisdb.flushed
def _latency(rate: float, count: int, runs: int) -> list[list[float]]:
    return latency.delays(_argv(1), stamp.send, mark.send, rate, count, runs)


def _one_client(seconds: float) -> float:
    return timed_rate(seconds, lambda: (noop.send(), 1)[1])


def configs() -> list[Config]:
    return [Config("dramatiq", "dramatiq", "Redis broker, W processes x 1 thread",
                   f"1 node, {redisdb.persistence()}, ack-late",
                   e2e=_e2e, latency=_latency,
                   **redisdb.submitters(_one_client))]
