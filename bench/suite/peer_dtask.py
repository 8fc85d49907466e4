"""DTask itself: a local 3-scheduler cluster (Raft, fsync on), reusing the code paths
of bench_worker_e2e.py (end to end) and bench_scheduler.py (submit throughput).

End to end starts a fresh cluster and W worker processes with one slot each per run and
runs the Python no-op `builtins:int`, submitted with `submit_many` in batches of 500.
Latency is bench_scheduler.latency on one worker process with one slot; several
submitting clients are separate processes (see `parallel`); failover is `failover`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator

from bench import bench_scheduler, bench_worker_e2e
from bench.suite import failover, parallel, procs
from bench.suite.model import Config
from dtask.broker.localcluster import SchedulerCluster

GUARANTEES = "3-node Raft, quorum fdatasync, ack-late (lease; reruns on worker loss)"
BULK = 1000


def _e2e(n: int, runs: int, workers: int = 1) -> list[float]:
    return [bench_worker_e2e.run("python", {"fn": "builtins:int"}, n, workers, 1)
            for _ in range(runs)]


@contextlib.contextmanager
def _cluster() -> Iterator[list[str]]:
    """Three schedulers and no worker: submissions queue up, nothing is dispatched."""
    root = tempfile.mkdtemp(prefix="dtask-bench-suite-")
    cluster = SchedulerCluster(root, size=3)
    try:
        cluster.start_all()
        cluster.wait_leader()
        yield cluster.endpoints
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def _submit_one(seconds: float) -> float:
    with _cluster() as endpoints:
        return bench_scheduler.sync_one_by_one(endpoints, seconds)[0]


def _submit_bulk(seconds: float) -> float:
    with _cluster() as endpoints:
        return bench_scheduler.submit_many(endpoints, seconds, BULK)


def _one_client(endpoints: list[str], seconds: float) -> float:
    return bench_scheduler.sync_one_by_one(endpoints, seconds)[0]


def _submit_clients(seconds: float, clients: int) -> float:
    with _cluster() as endpoints:
        return parallel.summed_rate(functools.partial(_one_client, endpoints), seconds, clients)


def _latency(rate: float, count: int, runs: int) -> list[list[float]]:
    """bench_scheduler.latency (task `bench_tasks:stamp` returns time.time()) on a
    fresh cluster with one worker process, one slot, warmed up first."""
    root = tempfile.mkdtemp(prefix="dtask-bench-suite-lat-")
    cluster = SchedulerCluster(root, size=3)
    saved = os.environ.get("PYTHONPATH")
    try:
        cluster.start_all()
        cluster.wait_leader()
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(procs.REPO / "bench"), procs.env()["PYTHONPATH"]])
        cluster.start_worker("bench-lat", 1, "--import", "bench_tasks", "--log-level", "warning")
        bench_scheduler.latency(cluster.endpoints, rate, 20)  # warm: leader, worker, pool
        return [bench_scheduler.latency(cluster.endpoints, rate, count) for _ in range(runs)]
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def _scale(tasks: int, dispatch: int, slots: int) -> dict:
    from bench import bench_scale
    return bench_scale.run(tasks, dispatch=dispatch, slots=slots)


def _persist(rate: float, seconds: float) -> dict:
    from bench import bench_persist_lag  # imports psycopg
    return bench_persist_lag.run(rate, seconds, "postgresql")


def configs() -> list[Config]:
    return [Config("dtask", "dtask", "3 schedulers, W worker processes x 1 slot", GUARANTEES,
                   e2e=_e2e, submit_one=_submit_one, submit_bulk=_submit_bulk,
                   latency=_latency, submit_clients=_submit_clients,
                   failover=failover.runs, scale=_scale, persist=_persist)]
