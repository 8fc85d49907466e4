"""RQ (Redis db 5): its default Worker (forks a work horse per job) and SimpleWorker
(runs jobs in the worker process itself). RQ moves a job to a started registry while
it runs, so a killed worker's job is found again only after its timeout.
"""

from __future__ import annotations

from bench.suite import latency, procs, redisdb
from bench.suite.drain import drain_rates, timed_rate
from bench.suite.mark import write_mark
from bench.suite.model import Config

QUEUE = "bench"
BULK = 1000


def noop() -> None:
    return None


def mark(path: str) -> None:
    write_mark(path)


def stamp(path: str, i: int) -> None:
    latency.record(path, i)


def _queue():  # noqa: ANN202 - rq.Queue
    from redis import Redis
    from rq import Queue

    return Queue(QUEUE, connection=Redis.from_url(redisdb.URL))


def _enqueue_many(q, n: int) -> int:  # noqa: ANN001 - rq.Queue
    from rq import Queue

    for i in range(0, n, BULK):
        q.enqueue_many([Queue.prepare_data(noop) for _ in range(min(BULK, n - i))])
    return n


def _argv(worker_class: str, workers: int) -> list[str]:
    return procs.copies(["rq", "worker", "-u", redisdb.URL, "-w", worker_class, "-q", QUEUE],
                        workers)


def _e2e(worker_class: str):  # noqa: ANN202
    @redisdb.flushed
    def run(n: int, runs: int, workers: int = 1) -> list[float]:
        q = _queue()
        return drain_rates(_argv(worker_class, workers), lambda k: _enqueue_many(q, k),
                           lambda path: q.enqueue(mark, path), n, runs)
    return run


def _latency(worker_class: str):  # noqa: ANN202
    @redisdb.flushed
    def run(rate: float, count: int, runs: int) -> list[list[float]]:
        q = _queue()
        return latency.delays(_argv(worker_class, 1), lambda path, i: q.enqueue(stamp, path, i),
                              lambda path: q.enqueue(mark, path), rate, count, runs)
    return run


def _one_client(seconds: float) -> float:
    q = _queue()
    return timed_rate(seconds, lambda: (q.enqueue(noop), 1)[1])


@redisdb.flushed
def _submit_bulk(seconds: float) -> float:
    q = _queue()
    return timed_rate(seconds, lambda: _enqueue_many(q, BULK))


def configs() -> list[Config]:
    store = f"1 node, {redisdb.persistence()}, job in started registry"
    return [
        Config("rq", "rq Worker", "forking Worker (fork per job), W processes", store,
               e2e=_e2e("rq.worker.Worker"), submit_bulk=_submit_bulk,
               latency=_latency("rq.worker.Worker"), **redisdb.submitters(_one_client)),
        Config("rq", "rq SimpleWorker", "SimpleWorker (no fork), W processes", store,
               e2e=_e2e("rq.worker.SimpleWorker"), latency=_latency("rq.worker.SimpleWorker"),
               # Same client side as the Worker row; with --durable-redis this is RQ's
               # only row, so it submits too.
               submit_bulk=_submit_bulk if redisdb.DURABLE else None,
               **(redisdb.submitters(_one_client) if redisdb.DURABLE else {})),
    ]
