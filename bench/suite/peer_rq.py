"""RQ (Redis db 5): its default Worker (forks a work horse per job) and SimpleWorker
(runs jobs in the worker process itself). RQ moves a job to a started registry while
it runs, so a killed worker's job is found again only after its timeout.
"""

from __future__ import annotations

from bench.suite import redisdb
from bench.suite.drain import drain_rates, timed_rate
from bench.suite.mark import write_mark
from bench.suite.model import Config

QUEUE = "bench"
BULK = 1000


def noop() -> None:
    return None


def mark(path: str) -> None:
    write_mark(path)


def _queue():  # noqa: ANN202 - rq.Queue
    from redis import Redis
    from rq import Queue

    return Queue(QUEUE, connection=Redis.from_url(redisdb.URL))


def _enqueue_many(q, n: int) -> int:  # noqa: ANN001 - rq.Queue
    from rq import Queue

    for i in range(0, n, BULK):
        q.enqueue_many([Queue.prepare_data(noop) for _ in range(min(BULK, n - i))])
    return n


def _e2e(worker_class: str):  # noqa: ANN202
    def run(n: int, runs: int) -> list[float]:
        redisdb.flush()
        q = _queue()
        try:
            return drain_rates(["rq", "worker", "-u", redisdb.URL, "-w", worker_class, "-q",
                                QUEUE], lambda k: _enqueue_many(q, k),
                               lambda path: q.enqueue(mark, path), n, runs)
        finally:
            redisdb.flush()
    return run


def _submit_one(seconds: float) -> float:
    redisdb.flush()
    q = _queue()
    try:
        return timed_rate(seconds, lambda: (q.enqueue(noop), 1)[1])
    finally:
        redisdb.flush()


def _submit_bulk(seconds: float) -> float:
    redisdb.flush()
    q = _queue()
    try:
        return timed_rate(seconds, lambda: _enqueue_many(q, BULK))
    finally:
        redisdb.flush()


def configs() -> list[Config]:
    store = f"1 node, {redisdb.persistence()}, job in started registry"
    return [
        Config("rq", "rq Worker", "forking Worker (fork per job)", store,
               e2e=_e2e("rq.worker.Worker"), submit_one=_submit_one,
               submit_bulk=_submit_bulk),
        Config("rq", "rq SimpleWorker", "SimpleWorker (no fork)", store,
               e2e=_e2e("rq.worker.SimpleWorker")),
    ]
