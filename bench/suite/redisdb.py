"""The Redis database the Redis-based peers use: db 5, flushed before and after.

Never db 0: the benchmark only ever empties the database it owns. By default that is
the shared Redis on 127.0.0.1:6379 as it is configured; `python -m bench
--durable-redis` instead starts a throwaway redis-server (AOF, appendfsync always:
fsync per write) and points every peer at it through BENCH_REDIS_URL, which the peers'
worker subprocesses inherit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

from bench.suite import parallel

DEFAULT_URL = "redis://127.0.0.1:6379/5"
URL = os.environ.get("BENCH_REDIS_URL", DEFAULT_URL)
DURABLE = os.environ.get("BENCH_REDIS_DURABLE") == "1"
# With --durable-redis: each Redis peer's durable configuration only (the row names).
DURABLE_ROWS = {"celery acks_late", "huey", "rq SimpleWorker", "dramatiq"}


def address() -> tuple[str, int]:
    from urllib.parse import urlparse

    u = urlparse(URL)
    return u.hostname or "127.0.0.1", u.port or 6379


def flush() -> None:
    import redis

    redis.Redis.from_url(URL).flushdb()


def flushed(fn: Callable) -> Callable:
    """Run `fn` on an empty database and leave it empty (each measurement starts clean)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        flush()
        try:
            return fn(*args, **kwargs)
        finally:
            flush()
    return run


def submitters(one_client: Callable[[float], float]) -> dict[str, Callable]:
    """`submit_one` and `submit_clients` of a Config, from one client's timed loop."""
    return {"submit_one": flushed(one_client),
            "submit_clients": flushed(lambda seconds, clients: parallel.summed_rate(
                one_client, seconds, clients))}


def persistence() -> str:
    """What Redis promises on disk right now (AOF / RDB snapshots), for the table."""
    import redis

    r = redis.Redis.from_url(URL)
    aof = r.config_get("appendonly").get("appendonly")
    fsync = r.config_get("appendfsync").get("appendfsync")
    save = r.config_get("save").get("save")
    if aof == "yes":
        return f"Redis AOF, appendfsync {fsync}" + (
            " (fsync per write)" if fsync == "always" else "")
    return f"Redis RDB snapshots '{save}'" if save else "Redis without persistence"


@contextlib.contextmanager
def durable_server() -> Iterator[str]:
    """A throwaway redis-server (AOF, appendfsync always, no RDB) on a free port, in a
    temporary directory; the peers use it (BENCH_REDIS_URL) until the block ends, then
    it is stopped and its directory deleted."""
    import redis

    from dtask.raft.localcluster import free_ports

    global URL, DURABLE
    port = free_ports(1)[0]
    tmp = tempfile.mkdtemp(prefix="dtask-bench-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--appendonly", "yes", "--appendfsync", "always", "--dir", tmp,
                             "--save", ""], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/5"
    saved = {k: os.environ.get(k) for k in ("BENCH_REDIS_URL", "BENCH_REDIS_DURABLE")}
    old = URL, DURABLE
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.05)
        os.environ["BENCH_REDIS_URL"], os.environ["BENCH_REDIS_DURABLE"] = url, "1"
        URL, DURABLE = url, True
        yield url
    finally:
        URL, DURABLE = old
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
