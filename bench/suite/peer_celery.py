"""Celery with the Redis broker (db 5), one prefork pool process.

The worker imports this module (`celery -A bench.suite.peer_celery worker`). The
durable configuration (BENCH_CELERY_DURABLE=1) acknowledges after the task ran
(`task_acks_late`) and prefetches one message per process; the default one
acknowledges on receipt and prefetches four. No result backend in either.
"""

from __future__ import annotations

import os

from celery import Celery

from bench.suite import latency, redisdb
from bench.suite.drain import drain_rates, timed_rate
from bench.suite.mark import write_mark
from bench.suite.model import Config

DURABLE = os.environ.get("BENCH_CELERY_DURABLE") == "1"

app = Celery("bench", broker=redisdb.URL)
app.conf.update(task_default_queue="bench", broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False)
if DURABLE:
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1)


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.mark")
def mark(path: str) -> None:
    write_mark(path)


@app.task(name="bench.stamp")
def stamp(path: str, i: int) -> None:
    latency.record(path, i)


def _enqueue(n: int) -> None:
    for _ in range(n):
        noop.apply_async()


def _argv(workers: int) -> list[str]:
    return ["celery", "-A", "bench.suite.peer_celery", "worker", "-P", "prefork",
            "-c", str(workers), "-l", "warning", "--without-gossip", "--without-mingle",
            "--without-heartbeat"]


def _env(durable: bool) -> dict[str, str]:
    return {"BENCH_CELERY_DURABLE": "1" if durable else "0"}


def _e2e(durable: bool) -> object:
    @redisdb.flushed
    def run(n: int, runs: int, workers: int = 1) -> list[float]:
        return drain_rates(_argv(workers), _enqueue, lambda path: mark.apply_async((path,)),
                           n, runs, env=_env(durable))
    return run


def _latency(durable: bool) -> object:
    @redisdb.flushed
    def run(rate: float, count: int, runs: int) -> list[list[float]]:
        return latency.delays(_argv(1), lambda path, i: stamp.apply_async((path, i)),
                              lambda path: mark.apply_async((path,)), rate, count, runs,
                              env=_env(durable))
    return run


def _one_client(seconds: float) -> float:
    return timed_rate(seconds, lambda: (noop.apply_async(), 1)[1])


def configs() -> list[Config]:
    store = redisdb.persistence()
    return [
        Config("celery", "celery default", "Redis broker, prefork -c W, prefetch 4",
               f"1 node, {store}, acked on receipt", e2e=_e2e(False),
               latency=_latency(False), **redisdb.submitters(_one_client)),
        Config("celery", "celery acks_late", "Redis broker, prefork -c W, prefetch 1",
               f"1 node, {store}, ack-late", e2e=_e2e(True), latency=_latency(True),
               # Submitting is the same as for the default row; with --durable-redis
               # this is Celery's only row, so it submits too.
               **(redisdb.submitters(_one_client) if redisdb.DURABLE else {})),
    ]
