"""One connection to the history database: batch writes and history reads.

The same `Store` serves SQLite (the embedded default) and PostgreSQL: the schema is
shared (`schema`), reads are the same SQL, and only the bulk write differs. On
PostgreSQL a batch is COPYed (binary) into session-local staging tables and merged
with one INSERT ... SELECT ... ON CONFLICT per table (DESIGN.md: COPY ≈ 3x the rate of
row-by-row upserts); SQLite takes executemany upserts. Every write is one transaction
that also moves the stored last Raft index forward, so what the database holds and
the index it claims never disagree.

A database that cannot be reached (or is locked, or is read-only) raises
`StoreUnavailable` with a one-line message naming the DSN without its password;
the persister retries on it. Anything else is a bug or bad data and propagates.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import schema
from .rows import (
    ATTEMPT_COLUMNS,
    ATTEMPT_KEY,
    CRON_COLUMNS,
    CRON_KEY,
    TASK_COLUMNS,
    TASK_KEY,
    WORKER_COLUMNS,
    WORKER_KEY,
    Batch,
)

COPY, UPSERT = "copy", "upsert"

# (table, columns, key) in the order a batch writes them.
_TABLES = (
    ("tasks", TASK_COLUMNS, TASK_KEY),
    ("execution_logs", ATTEMPT_COLUMNS, ATTEMPT_KEY),
    ("cron_jobs", CRON_COLUMNS, CRON_KEY),
    ("workers", WORKER_COLUMNS, WORKER_KEY),
)

# History reads return the live state's dicts (Task.to_dict / Attempt.to_dict):
# (dict key, SQL expression), in to_dict's order.
_TASK_FIELDS = (
    ("id", "id"), ("name", "name"), ("type", "task_type"), ("content_type", "content_type"),
    ("priority", "priority"), ("queue", "queue"), ("labels", "labels"),
    ("timeout", "timeout_s"), ("max_retries", "max_retries"),
    ("idempotency_key", "idempotency_key"), ("created_us", "created_us"), ("seq", "seq"),
    ("status", "status"), ("run_at_us", "next_run_us"), ("finished_us", "finished_us"),
    ("cancel_requested", "cancel_requested"), ("cron_job", "COALESCE(cron_job, '')"),
)
_TASK_KEYS = tuple(k for k, _ in _TASK_FIELDS)
_TASK_READ = ", ".join(sql for _, sql in _TASK_FIELDS)
_ATTEMPT_KEYS = ("attempt", "worker", "started_us", "deadline_us", "finished_us", "outcome",
                 "exit_code", "error", "result", "log_bytes")
_ATTEMPT_READ = ("task_id, attempt, worker_id, started_us, deadline_us, finished_us, status, "
                 "exit_code, error_message, result, length(output)")

# SQLite result codes that mean "try again later", not "your SQL is wrong".
_SQLITE_TRANSIENT = {"BUSY", "LOCKED", "CANTOPEN", "IOERR", "READONLY", "FULL", "PROTOCOL"}


class StoreUnavailable(Exception):
    """The database cannot be reached or written right now; retrying may succeed."""


def redact(dsn: str) -> str:
    """The DSN without its password, for logs and error messages."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            user = parts.netloc.rpartition("@")[0].partition(":")[0]
            parts = parts._replace(netloc=f"{user}@{host}")
        dsn = urlunsplit(parts)
    return re.sub(r"password\s*=\s*('[^']*'|[^\s&]+)", "password=***", dsn)


def open_store(dsn: str, *, migrate: bool = True, method: str = COPY,
               timeout: float = 10.0, statement_timeout: float = 0.0) -> Store:
    """Connect to `dsn` and (by default) bring its schema up to date.

    `sqlite:///abs/path.db`, `sqlite:rel/path.db` or a bare path open SQLite;
    `postgresql://...` / `postgres://...` (or a libpq key=value string) open
    PostgreSQL. `timeout` bounds connecting and waiting for a lock, in seconds;
    `statement_timeout` (PostgreSQL, 0: none) bounds each statement, for readers.
    """
    store = Store(dsn, method=method, timeout=timeout)
    try:
        if migrate:
            store.migrate()
        if statement_timeout and store.dialect == schema.POSTGRES:
            with store._guard():
                store.conn.execute("SELECT set_config('statement_timeout', %s, false)",
                                   (str(int(statement_timeout * 1000)),))
    except BaseException:
        store.close()
        raise
    return store


def sqlite_path(dsn: str) -> str | None:
    """The file a SQLite DSN names, or None when the DSN is PostgreSQL's."""
    if dsn.startswith(("postgresql://", "postgres://")) or re.match(r"\s*\w+\s*=", dsn):
        return None
    if dsn.startswith("sqlite://"):
        path = unquote(dsn[len("sqlite://"):])  # sqlite:///abs -> /abs
    elif dsn.startswith("sqlite:"):
        path = unquote(dsn[len("sqlite:"):])
    elif re.match(r"^[A-Za-z][\w+.-]*://", dsn):
        raise ValueError(f"unsupported database {redact(dsn)!r}: use postgresql://... or a "
                         "SQLite file (sqlite:///path or a path)")
    else:
        path = dsn
    if not path.strip():
        raise ValueError("empty database DSN: use postgresql://... or a SQLite file path")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; the SQLite database is a file in it, e.g. "
                         f"{os.path.join(path, 'dtask.sqlite3')}")
    return path


class Store:
    def __init__(self, dsn: str, *, method: str = COPY, timeout: float = 10.0) -> None:
        if method not in (COPY, UPSERT):
            raise ValueError(f"unknown write method {method!r}")
        self.dsn = dsn
        self.name = redact(dsn)
        self.method = method
        path = sqlite_path(dsn)
        self.dialect = schema.SQLITE if path is not None else schema.POSTGRES
        self._sql: dict[str, str] = {}
        self._staged: dict[str, list] = {}  # PostgreSQL: table -> its staging column types
        with self._guard():
            if path is not None:
                self.conn = _connect_sqlite(path, timeout)
            else:
                self.conn = _connect_pg(dsn, timeout)

    # ------------------------------------------------------------------ lifecycle

    def migrate(self) -> int:
        with self._guard():
            return schema.migrate(self.conn, self.dialect)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a dead connection has nothing to report
            self.conn.close()

    # ------------------------------------------------------------------ writes

    def last_index(self) -> int:
        with self._guard():
            row = self.conn.execute("SELECT last_index FROM persist_state WHERE id = 1")
            found = row.fetchone()
        return found[0] if found else 0

    def write(self, batch: Batch) -> None:
        """One transaction: every row of the batch, and the last index moved forward."""
        tables = [(name, cols, _last_by_key(rows, len(key)), key)
                  for (name, cols, key), rows in zip(_TABLES, _batch_rows(batch), strict=True)]
        now_us = time.time_ns() // 1000
        with self._guard():
            if self.dialect == schema.SQLITE:
                self._write_sqlite(tables, batch, now_us)
                return
            try:
                self._write_pg(tables, batch, now_us)
            except psycopg.DataError:
                # PostgreSQL text cannot hold NUL (a worker's error message might):
                # write the batch again with NUL replaced rather than block the mirror.
                scrubbed = [(n, c, [_scrub(r) for r in rows], k) for n, c, rows, k in tables]
                if scrubbed == tables:
                    raise  # some other bad value
                self._write_pg(scrubbed, batch, now_us)

    def _write_sqlite(self, tables: list, batch: Batch, now_us: int) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for name, cols, rows, key in tables:
                if rows:
                    conn.executemany(self._upsert(name, cols, key), rows)
            if batch.cron_deleted:
                conn.executemany("DELETE FROM cron_jobs WHERE name = ?",
                                 [(n,) for n in batch.cron_deleted])
            conn.execute("UPDATE persist_state SET last_index = max(last_index, ?), "
                         "updated_us = ? WHERE id = 1", (batch.last_index, now_us))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _write_pg(self, tables: list, batch: Batch, now_us: int) -> None:
        conn = self.conn
        if self.method == COPY and not self._staged:
            self._create_staging()
        with conn.transaction(), conn.cursor() as cur:
            for name, cols, rows, key in tables:
                if not rows:
                    continue
                if self.method == UPSERT:
                    cur.executemany(self._upsert(name, cols, key), rows)
                    continue
                with cur.copy(f"COPY s_{name} ({', '.join(cols)}) FROM STDIN "
                              "(FORMAT BINARY)") as copy:
                    copy.set_types(self._staged[name])
                    for row in rows:
                        copy.write_row(row)
                cur.execute(self._upsert(name, cols, key, source=f"s_{name}"))
            if batch.cron_deleted:
                cur.execute("DELETE FROM cron_jobs WHERE name = ANY(%s)",
                            (list(batch.cron_deleted),))
            cur.execute("UPDATE persist_state SET last_index = GREATEST(last_index, %s), "
                        "updated_us = %s WHERE id = 1", (batch.last_index, now_us))

    def _create_staging(self) -> None:
        """Temp tables shaped like ours, emptied at every commit; kept for the session.

        Created outside the write transaction, so a failed write cannot roll them back
        while we remember them as there.
        """
        with self.conn.cursor() as cur:
            for name, cols, _key in _TABLES:
                cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS s_{name} ON COMMIT DELETE ROWS "
                            f"AS SELECT {', '.join(cols)} FROM {name} WITH NO DATA")
                cur.execute(f"SELECT {', '.join(cols)} FROM s_{name} LIMIT 0")
                self._staged[name] = [c.type_code for c in cur.description]

    def _upsert(self, table: str, cols: tuple, key: tuple, source: str = "") -> str:
        """INSERT ... ON CONFLICT DO UPDATE; a row never goes back to an older Raft index."""
        sql_key = f"{table}:{source}"
        sql = self._sql.get(sql_key)
        if sql is None:
            names = ", ".join(cols)
            mark = "?" if self.dialect == schema.SQLITE else "%s"
            values = f"SELECT {names} FROM {source}" if source else \
                f"VALUES ({', '.join([mark] * len(cols))})"
            sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in key)
            guard = f" WHERE {table}.raft_index <= excluded.raft_index" \
                if "raft_index" in cols else ""
            sql = self._sql[sql_key] = (f"INSERT INTO {table} ({names}) {values} ON CONFLICT "
                                        f"({', '.join(key)}) DO UPDATE SET {sets}{guard}")
        return sql

    # ------------------------------------------------------------------ history reads

    def get_task(self, task_id: str) -> dict | None:
        """The task as `Task.to_dict()` shows it (payload and attempts included)."""
        with self._guard():
            row = self._query(f"SELECT {_TASK_READ}, payload FROM tasks WHERE id = ?",
                              (task_id,)).fetchone()
            if row is None:
                return None
            task = _task_dict(row)
            task["payload"] = bytes(row[len(_TASK_FIELDS)])
            task["attempts"] = self._attempts([task_id]).get(task_id, [])
        return task

    def list_tasks(self, statuses: list[str], ttype: str, since_us: int, limit: int,
                   after: str) -> tuple[list[dict], str]:
        """A page in submission order, without payloads, like the live LIST.

        `after` is the last id of the previous page (unknown: start over, as the live
        state does); the returned cursor is this page's last id if more follow, else "".
        """
        where, args = [], []
        if after:
            where.append("seq > COALESCE((SELECT seq FROM tasks WHERE id = ?), 0)")
            args.append(after)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        if ttype:
            where.append("task_type = ?")
            args.append(ttype)
        if since_us:
            where.append("created_us >= ?")
            args.append(since_us)
        limit = max(1, limit)
        sql = (f"SELECT {_TASK_READ} FROM tasks"
               f"{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq LIMIT ?")
        with self._guard():
            rows = self._query(sql, (*args, limit + 1)).fetchall()
            page = [_task_dict(r) for r in rows[:limit]]
            attempts = self._attempts([t["id"] for t in page]) if page else {}
        for task in page:
            task["attempts"] = attempts.get(task["id"], [])
        return page, page[-1]["id"] if len(rows) > limit else ""

    def list_purged(self, statuses: list[str], ttype: str, since_us: int, after_seq: int,
                    finished_before_us: int, limit: int) -> list[dict]:
        """Finished tasks that may have left the live state (finished before the oldest
        live one), in submission order after `after_seq`: what the scheduler merges
        into a live LIST page."""
        where = ["seq > ?", "finished_us < ?",
                 f"status IN ({', '.join('?' * len(statuses))})"]
        args: list = [after_seq, finished_before_us, *statuses]
        if ttype:
            where.append("task_type = ?")
            args.append(ttype)
        if since_us:
            where.append("created_us >= ?")
            args.append(since_us)
        sql = (f"SELECT {_TASK_READ} FROM tasks WHERE {' AND '.join(where)} "
               "ORDER BY seq LIMIT ?")
        with self._guard():
            page = [_task_dict(r) for r in self._query(sql, (*args, limit)).fetchall()]
            attempts = self._attempts([t["id"] for t in page]) if page else {}
        for task in page:
            task["attempts"] = attempts.get(task["id"], [])
        return page

    def get_log(self, task_id: str, attempt: int) -> bytes | None:
        """An attempt's output; attempt 0 means the latest, as in the live LOGS."""
        with self._guard():
            if attempt:
                row = self._query("SELECT output FROM execution_logs "
                                  "WHERE task_id = ? AND attempt = ?", (task_id, attempt))
            else:
                row = self._query("SELECT output FROM execution_logs WHERE task_id = ? "
                                  "ORDER BY attempt DESC LIMIT 1", (task_id,))
            found = row.fetchone()
        return None if found is None else bytes(found[0])

    def _attempts(self, task_ids: list[str]) -> dict[str, list[dict]]:
        marks = ", ".join("?" * len(task_ids))
        out: dict[str, list[dict]] = {}
        for r in self._query(f"SELECT {_ATTEMPT_READ} FROM execution_logs WHERE task_id IN "
                             f"({marks}) ORDER BY task_id, attempt", task_ids):
            attempt = dict(zip(_ATTEMPT_KEYS, r[1:], strict=True))
            attempt["result"] = bytes(attempt["result"])
            out.setdefault(r[0], []).append(attempt)
        return out

    def _query(self, sql: str, args: tuple | list):
        if self.dialect == schema.POSTGRES:
            sql = sql.replace("?", "%s")
        return self.conn.execute(sql, args)

    # ------------------------------------------------------------------ errors

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except psycopg.errors.QueryCanceled:
            raise  # a statement timeout: this query is too slow, the database is fine
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from exc
        except sqlite3.OperationalError as exc:
            code = (getattr(exc, "sqlite_errorname", None) or "").split("_")
            if len(code) < 2 or code[1] not in _SQLITE_TRANSIENT:
                raise
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return StoreUnavailable(f"database {self.name} unavailable: {first}")


def _connect_sqlite(path: str, timeout: float) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE takes the write
    # lock up front, so two writers queue on busy_timeout instead of deadlocking).
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_pg(dsn: str, timeout: float) -> psycopg.Connection:
    given = conninfo_to_dict(dsn)
    # Bounded waits: a server that vanished without a RST must not hang the thread.
    defaults = {"connect_timeout": max(2, round(timeout)), "keepalives": 1,
                "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
                "tcp_user_timeout": int(timeout * 1000)}
    extra = {k: v for k, v in defaults.items() if k not in given}
    return psycopg.connect(make_conninfo(dsn, **extra), autocommit=True)


def _batch_rows(batch: Batch) -> tuple:
    return batch.tasks, batch.attempts, batch.cron_jobs, batch.workers


def _last_by_key(rows: list[tuple], width: int) -> list[tuple]:
    """One row per key, the last one given (a merge may touch each key only once)."""
    if len(rows) < 2:
        return rows
    if width == 1:
        return list({r[0]: r for r in rows}.values())
    return list({r[:width]: r for r in rows}.values())


def _scrub(row: tuple) -> tuple:
    return tuple(v.replace("\x00", "\ufffd") if type(v) is str else v for v in row)


def _task_dict(row) -> dict:
    task = dict(zip(_TASK_KEYS, row, strict=False))  # a trailing payload is not ours
    task["labels"] = json.loads(task["labels"])
    task["cancel_requested"] = bool(task["cancel_requested"])  # SQLite: 0/1
    return task


__all__ = ["COPY", "UPSERT", "Store", "StoreUnavailable", "open_store", "redact",
           "sqlite_path"]
