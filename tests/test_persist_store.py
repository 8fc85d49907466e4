"""The persister's database layer against both SQLite and the real PostgreSQL.

Every store test runs twice: on a SQLite file in tmp_path and on PostgreSQL in a fresh
schema of its own (dropped afterwards), so tests can run concurrently and leave
nothing behind. PostgreSQL is part of the test environment: unreachable is a failure.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid

import psycopg
import pytest

from dtask import protocol as p
from dtask.broker.state import Attempt, Task
from dtask.persist import schema
from dtask.persist.rows import (
    ATTEMPT_COLUMNS,
    CRON_COLUMNS,
    TASK_COLUMNS,
    WORKER_COLUMNS,
    Batch,
    attempt_rows,
    task_row,
)
from dtask.persist.store import COPY, UPSERT, StoreUnavailable, open_store, redact

PG = os.environ.get("DTASK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
T0 = 1_700_000_000_000_000
EVERY_BYTE = bytes(range(256))


def pg_schema_dsn(base: str = PG) -> tuple[str, str]:
    """A fresh schema and a DSN whose search_path points at it."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in base else "?"
    return name, f"{base}{sep}options=-csearch_path%3D{name}"


def drop_schema(name: str) -> None:
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
def pg_dsn():
    name, dsn = pg_schema_dsn()
    yield dsn
    drop_schema(name)


@pytest.fixture(params=["sqlite", "pg-copy", "pg-upsert"])
def dsn_method(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "history.db"), COPY
        return
    name, dsn = pg_schema_dsn()
    yield dsn, COPY if request.param == "pg-copy" else UPSERT
    drop_schema(name)


@pytest.fixture
def store(dsn_method):
    dsn, method = dsn_method
    s = open_store(dsn, method=method)
    yield s
    s.close()


def make_task(n: int, *, status=p.PENDING, attempts=0, ttype="shell", created_us=None,
              cron_job="", payload=None, labels=("gpu", "linux")) -> Task:
    task = Task(f"task-{n:05d}", f"name {n} ünïcode", ttype,
                payload if payload is not None else b"{\"n\": %d}" % n, p.JSON, n % 7,
                "default", tuple(labels), 1.5 + n, p.RetryPolicy(max_retries=3, initial=0.5),
                f"key-{n}" if n % 2 else "", created_us if created_us is not None else T0 + n,
                n, status, T0 + 10 * n, cron_job=cron_job)
    for a in range(1, attempts + 1):
        if not task.attempts:
            task.attempts = []
        task.attempts.append(Attempt(a, f"worker-{a}", T0 + a, T0 + a + 100, T0 + a + 50,
                                     p.ERRORED, a, f"failed {a}", b"\x91\xa1x",
                                     b"log \xff\xfe%d" % a))
    return task


def batch_of(tasks: list[Task], index: int, **extra) -> Batch:
    b = Batch(last_index=index, **extra)
    for t in tasks:
        b.tasks.append(task_row(t, index))
        b.attempts.extend(attempt_rows(t, index))
    return b


def cron_row(name: str, index: int, paused=False, expr="*/5 * * * *") -> tuple:
    return (name, expr, "Europe/Paris", b"\x99\x00msgpack", "skip", "allow", paused,
            T0, T0 + 300_000_000, "task-00001", p.COMPLETED, T0 - 1, T0 + 1, index)


def worker_row(wid: str, state="registered", pid=1234) -> tuple:
    return (wid, "host-a", pid, 8, '["default"]', '["gpu"]', '["shell","python"]', state,
            T0, T0 + 5)


def table(s, name: str, columns: tuple, order: str) -> list[tuple]:
    """Rows as comparable tuples (SQLite's 0/1 booleans read back as bools)."""
    rows = s.conn.execute(f"SELECT {', '.join(columns)} FROM {name} ORDER BY {order}")
    bools = [i for i, c in enumerate(columns) if c in ("cancel_requested", "paused")]
    out = []
    for r in rows.fetchall():
        r = list(r)
        for i in bools:
            r[i] = bool(r[i])
        out.append(tuple(bytes(v) if isinstance(v, memoryview) else v for v in r))
    return out


def everything(s) -> list:
    return [table(s, "tasks", TASK_COLUMNS, "id"),
            table(s, "execution_logs", ATTEMPT_COLUMNS, "task_id, attempt"),
            table(s, "cron_jobs", CRON_COLUMNS, "name"),
            table(s, "workers", WORKER_COLUMNS, "id")]


# ---------------------------------------------------------------------- schema


def test_migrate_twice_is_a_no_op(store):
    assert store.migrate() == schema.LATEST
    assert store.migrate() == schema.LATEST
    rows = store.conn.execute("SELECT version FROM schema_migrations").fetchall()
    assert [r[0] for r in rows] == [v for v, _, _ in schema.MIGRATIONS]
    assert store.last_index() == 0


def test_concurrent_migrate_on_postgres(pg_dsn):
    """Four processes' worth of connections racing to create the same schema."""
    barrier, results, errors = threading.Barrier(4), [], []

    def race():
        try:
            barrier.wait()
            s = open_store(pg_dsn)
            results.append(s.migrate())
            s.close()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [schema.LATEST] * 4


def test_postgres_views_show_times_as_timestamps(pg_dsn):
    s = open_store(pg_dsn)
    s.write(batch_of([make_task(1, attempts=1)], 3))
    created, finished = s.conn.execute(
        "SELECT created_at, finished_at FROM tasks_v").fetchone()
    assert int(created.timestamp() * 1_000_000) == T0 + 1
    assert finished is None  # 0: not finished yet
    started = s.conn.execute("SELECT started_at FROM execution_logs_v").fetchone()[0]
    assert int(started.timestamp() * 1_000_000) == T0 + 1
    s.close()


# ---------------------------------------------------------------------- writes


def test_every_column_round_trips(store):
    task = make_task(1, status=p.RETRYING, attempts=2, payload=EVERY_BYTE, cron_job="nightly")
    task.cancel_requested = True
    task.attempts[1].exit_code = None
    batch = batch_of([task], 7, cron_jobs=[cron_row("nightly", 7, paused=True)],
                     workers=[worker_row("w-1")])
    store.write(batch)
    tasks, attempts, crons, workers = everything(store)
    assert tasks == batch.tasks
    assert attempts == batch.attempts
    assert crons == batch.cron_jobs
    assert workers == batch.workers
    assert attempts[0][9] == b"log \xff\xfe1"  # non-UTF-8 log bytes, intact
    assert store.last_index() == 7


def test_same_batch_twice_gives_the_same_rows(store):
    batch = batch_of([make_task(n, attempts=n % 3) for n in range(20)], 5,
                     cron_jobs=[cron_row("a", 5)], workers=[worker_row("w-1")])
    store.write(batch)
    first = everything(store)
    store.write(batch)
    assert everything(store) == first
    assert store.last_index() == 5


def test_last_index_and_rows_only_move_forward(store):
    old = make_task(1, status=p.PENDING)
    new = make_task(1, status=p.COMPLETED, attempts=1)
    store.write(batch_of([new], 10, cron_jobs=[cron_row("a", 10, expr="new")]))
    # A replay of an older batch (a previous leader's) arrives late.
    store.write(batch_of([old], 4, cron_jobs=[cron_row("a", 4, expr="old")]))
    assert store.last_index() == 10
    assert store.get_task(new.id) == new.to_dict()
    assert table(store, "cron_jobs", ("expr",), "name") == [("new",)]
    store.write(batch_of([], 12))
    assert store.last_index() == 12


def test_repeated_keys_in_one_batch_last_one_wins(store):
    first, last = make_task(1, status=p.RUNNING, attempts=1), make_task(1, attempts=1)
    last.status, last.attempts[0].outcome = p.COMPLETED, p.SUCCEEDED
    batch = batch_of([first, last], 9,
                     cron_jobs=[cron_row("a", 9, expr="first"), cron_row("a", 9, expr="last")],
                     workers=[worker_row("w", pid=1), worker_row("w", pid=2)])
    store.write(batch)
    assert store.get_task(last.id) == last.to_dict()
    assert table(store, "cron_jobs", ("expr",), "name") == [("last",)]
    assert table(store, "workers", ("pid",), "id") == [(2,)]
    assert len(table(store, "execution_logs", ("attempt",), "attempt")) == 1


def test_cron_jobs_deleted_and_workers_updated(store):
    store.write(Batch(cron_jobs=[cron_row("a", 1), cron_row("b", 1)],
                      workers=[worker_row("w1"), worker_row("w2")], last_index=1))
    store.write(Batch(cron_deleted=["a", "never-existed"],
                      workers=[worker_row("w1", state="gone")], last_index=2))
    assert table(store, "cron_jobs", ("name",), "name") == [("b",)]
    assert table(store, "workers", ("id", "state"), "id") == [("w1", "gone"),
                                                              ("w2", "registered")]


def test_nul_in_text_is_replaced_not_refused(store):
    task = make_task(1, attempts=1)
    task.attempts[0].error = "bad\x00byte"
    store.write(batch_of([task], 2))
    error = store.get_task(task.id)["attempts"][0]["error"]
    # SQLite keeps NUL; PostgreSQL text cannot hold it, so the mirror writes U+FFFD.
    assert error in ("bad\x00byte", "bad\ufffdbyte")
    assert store.last_index() == 2


# ---------------------------------------------------------------------- history reads


def test_get_task_equals_the_live_dict(store):
    tasks = [make_task(1), make_task(2, attempts=3, status=p.FAILED),
             make_task(3, payload=EVERY_BYTE, labels=()), make_task(4, cron_job="hourly")]
    tasks[1].finished_us = T0 + 999
    tasks[1].attempts[2].exit_code = None
    store.write(batch_of(tasks, 3))
    for t in tasks:
        assert store.get_task(t.id) == t.to_dict()
    assert store.get_task("missing") is None


def test_list_tasks_pages_like_the_live_list(store):
    statuses = [p.PENDING, p.COMPLETED, p.FAILED]
    tasks = [make_task(n, status=statuses[n % 3], attempts=n % 2,
                       ttype="python" if n % 4 == 0 else "shell") for n in range(1, 31)]
    store.write(batch_of(tasks, 3))

    def pages(statuses, ttype="", since_us=0, limit=4):
        got, after = [], ""
        while True:
            page, after = store.list_tasks(statuses, ttype, since_us, limit, after)
            assert len(page) <= limit
            got.extend(page)
            if not after:
                return got
            assert after == page[-1]["id"]

    def expect(pred):
        return [t.to_dict(with_payload=False) for t in sorted(tasks, key=lambda t: t.seq)
                if pred(t)]

    assert pages([]) == expect(lambda t: True)
    assert pages([p.FAILED, p.PENDING]) == expect(lambda t: t.status != p.COMPLETED)
    assert pages([], ttype="python", limit=3) == expect(lambda t: t.type == "python")
    assert pages([p.COMPLETED], since_us=T0 + 10) == expect(
        lambda t: t.status == p.COMPLETED and t.created_us >= T0 + 10)
    # An exact last page says "no more".
    page, after = store.list_tasks([], "", 0, 30, "")
    assert len(page) == 30 and after == ""
    # An unknown cursor starts over, as the live list does.
    assert store.list_tasks([], "", 0, 2, "nope")[0] == expect(lambda t: True)[:2]
    assert store.list_tasks([p.RUNNING], "", 0, 5, "") == ([], "")


def test_get_log(store):
    task = make_task(1, attempts=3)
    store.write(batch_of([task], 1))
    assert store.get_log(task.id, 2) == b"log \xff\xfe2"
    assert store.get_log(task.id, 0) == b"log \xff\xfe3"  # 0: the latest attempt
    assert store.get_log(task.id, 4) is None
    assert store.get_log("missing", 0) is None


# ---------------------------------------------------------------------- errors and DSNs


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_postgres_is_store_unavailable_without_password():
    dsn = f"postgresql://postgres:s3cret@127.0.0.1:{closed_port()}/test"
    with pytest.raises(StoreUnavailable) as info:
        open_store(dsn, timeout=2)
    message = str(info.value)
    assert "s3cret" not in message and "127.0.0.1" in message
    assert "\n" not in message


def test_locked_sqlite_is_store_unavailable(tmp_path):
    path = tmp_path / "h.db"
    s = open_store(str(path), timeout=0.1)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            s.write(batch_of([make_task(1)], 1))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    s.write(batch_of([make_task(1)], 1))  # the same store carries on once it is free
    assert s.last_index() == 1
    s.close()


def test_bad_rows_propagate_as_themselves(store):
    with pytest.raises(Exception) as info:
        store.write(Batch(tasks=[("too", "short")], last_index=1))
    assert not isinstance(info.value, StoreUnavailable)
    assert store.last_index() == 0  # the transaction rolled back
    store.write(batch_of([make_task(1)], 2))  # and the connection is still usable
    assert store.last_index() == 2


def test_sqlite_dsn_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for dsn, path in [(f"sqlite:///{tmp_path}/a.db", tmp_path / "a.db"),
                      ("sqlite:rel/b.db", tmp_path / "rel" / "b.db"),
                      (str(tmp_path / "c.db"), tmp_path / "c.db")]:
        s = open_store(dsn)
        s.write(batch_of([make_task(1)], 1))
        s.close()
        assert path.exists(), dsn
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_redact():
    assert redact("postgresql://u:pw@h:5432/db?x=1") == "postgresql://u@h:5432/db?x=1"
    assert redact("host=h password=pw dbname=d") == "host=h password=*** dbname=d"
    assert redact("postgresql://h/db?password=pw") == "postgresql://h/db?password=***"
    assert redact("/var/lib/dtask/history.db") == "/var/lib/dtask/history.db"


@pytest.mark.parametrize("dsn, message", [
    ("mysql://u@h/x", "unsupported database"),
    ("", "empty database DSN"),
    ("/tmp", "is a directory"),
])
def test_a_dsn_that_is_no_database_we_can_use_is_refused(dsn, message):
    with pytest.raises(ValueError, match=message):
        open_store(dsn)
