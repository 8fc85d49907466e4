"""procrastinate (PostgreSQL at 127.0.0.1): one worker process, concurrency 1.

Each scenario runs in a database of its own, created with procrastinate's schema and
dropped afterwards. A job is one committed row, so PostgreSQL's fsync setting is the
durability it gets; a killed worker leaves its job 'doing' until someone retries it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import procrastinate
import psycopg

from bench.suite import latency, parallel, procs
from bench.suite.drain import drain_rates, timed_rate
from bench.suite.mark import write_mark
from bench.suite.model import Config

SERVER = "postgresql://postgres@127.0.0.1:5432"
DATABASE = "dtask_bench_procrastinate"
BULK = 1000

app = procrastinate.App(connector=procrastinate.PsycopgConnector(
    conninfo=f"{SERVER}/{DATABASE}"))


@app.task(name="bench.noop", queue="bench")
def noop() -> None:
    return None


@app.task(name="bench.mark", queue="bench")
def mark(path: str) -> None:
    write_mark(path)


@app.task(name="bench.stamp", queue="bench")
def stamp(path: str, i: int) -> None:
    latency.record(path, i)


def _admin(sql: str) -> None:
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(sql)


@contextlib.contextmanager
def fresh_database() -> Iterator[None]:
    _admin(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    _admin(f"CREATE DATABASE {DATABASE}")
    try:
        with app.open():
            app.schema_manager.apply_schema()
            yield
    finally:
        _admin(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


def _batch(n: int) -> int:
    for i in range(0, n, BULK):
        noop.batch_defer(*({} for _ in range(min(BULK, n - i))))
    return n


def _argv(workers: int) -> list[str]:
    return procs.copies(["procrastinate", "--app=bench.suite.peer_procrastinate.app",
                         "worker", "-q", "bench", "-c", "1"], workers)


def _e2e(n: int, runs: int, workers: int = 1) -> list[float]:
    with fresh_database():
        return drain_rates(_argv(workers), _batch, lambda path: mark.defer(path=path), n, runs)


def _latency(rate: float, count: int, runs: int) -> list[list[float]]:
    with fresh_database():
        return latency.delays(_argv(1), lambda path, i: stamp.defer(path=path, i=i),
                              lambda path: mark.defer(path=path), rate, count, runs)


def _one_client(seconds: float) -> float:
    """In a client process of its own: opens the app there."""
    with app.open():
        return timed_rate(seconds, lambda: (noop.defer(), 1)[1])


def _submit_one(seconds: float) -> float:
    with fresh_database():
        return timed_rate(seconds, lambda: (noop.defer(), 1)[1])


def _submit_clients(seconds: float, clients: int) -> float:
    with fresh_database():
        return parallel.summed_rate(_one_client, seconds, clients)


def _submit_bulk(seconds: float) -> float:
    with fresh_database():
        return timed_rate(seconds, lambda: _batch(BULK))


def _durability() -> str:
    with psycopg.connect(f"{SERVER}/postgres") as conn:
        fsync = conn.execute("SHOW fsync").fetchone()[0]
        sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
    return f"1 node, PostgreSQL fsync {fsync}, synchronous_commit {sync}, job left 'doing'"


def configs() -> list[Config]:
    return [Config("procrastinate", "procrastinate", "PostgreSQL, W worker processes, "
                   "concurrency 1", _durability(), e2e=_e2e, submit_one=_submit_one,
                   submit_bulk=_submit_bulk, latency=_latency,
                   submit_clients=_submit_clients)]
