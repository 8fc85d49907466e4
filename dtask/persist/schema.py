"""The persister's tables, as versioned migrations for SQLite and PostgreSQL.

Each migration is written once in a small dialect of SQL and translated: `{blob}`,
`{bool}`, `{real}` become each database's type, and statements listed
under `PG_ONLY` (human-friendly views) run on PostgreSQL alone. Times are BIGINT
microseconds since the Unix epoch in both databases, so rows compare and sort the
same everywhere. A migration, once released, never changes: add a new version.
"""

from __future__ import annotations

import time

SQLITE, POSTGRES = "sqlite", "postgres"

_TYPES = {
    SQLITE: {"blob": "BLOB", "bool": "INTEGER", "real": "REAL"},
    POSTGRES: {"blob": "BYTEA", "bool": "BOOLEAN", "real": "DOUBLE PRECISION"},
}

# A fixed key for pg_advisory_xact_lock: two processes migrating at once take turns.
_LOCK_KEY = 0x64746173_6B5F6D67  # "dtask_mg"

_V1 = [
    """CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        task_type TEXT NOT NULL,
        payload {blob} NOT NULL,
        content_type TEXT NOT NULL,
        priority INTEGER NOT NULL,
        queue TEXT NOT NULL,
        labels TEXT NOT NULL,
        timeout_s {real} NOT NULL,
        max_retries INTEGER NOT NULL,
        retry_policy TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        cron_job TEXT,
        status TEXT NOT NULL,
        created_us BIGINT NOT NULL,
        next_run_us BIGINT NOT NULL,
        finished_us BIGINT NOT NULL,
        current_retry INTEGER NOT NULL,
        cancel_requested {bool} NOT NULL,
        seq BIGINT NOT NULL,
        raft_index BIGINT NOT NULL)""",
    "CREATE INDEX tasks_status_seq ON tasks (status, seq)",
    # Few indexes on purpose: each is one more B-tree to update per row, and every
    # state change of a task rewrites its row (measured with SQLite: two indexes
    # fewer, 56k -> 91k changes/s, and ~20 % of a busy leader's CPU back). Listings
    # filter by status first (the scheduler always sends statuses); type and time
    # filters are checked on those rows.
    # Most tasks have no cron job (NULL): a partial index leaves them out.
    "CREATE INDEX tasks_cron_job ON tasks (cron_job) WHERE cron_job IS NOT NULL",
    # No foreign key to tasks: rows of one batch arrive in any order, and the mirror
    # must never refuse a row the Raft log already committed.
    # Keyed by (task_id, attempt) rather than a serial id: one index less to update
    # per row (the persister's merge is index-bound: +18 % changes/s measured).
    """CREATE TABLE execution_logs (
        task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        worker_id TEXT NOT NULL,
        started_us BIGINT NOT NULL,
        deadline_us BIGINT NOT NULL,
        finished_us BIGINT NOT NULL,
        status TEXT NOT NULL,
        exit_code INTEGER,
        result {blob} NOT NULL,
        output {blob} NOT NULL,
        error_message TEXT NOT NULL,
        raft_index BIGINT NOT NULL,
        PRIMARY KEY (task_id, attempt))""",
    """CREATE TABLE cron_jobs (
        name TEXT PRIMARY KEY,
        expr TEXT NOT NULL,
        timezone TEXT NOT NULL,
        template {blob} NOT NULL,
        misfire TEXT NOT NULL,
        overlap TEXT NOT NULL,
        paused {bool} NOT NULL,
        last_tick_us BIGINT NOT NULL,
        next_tick_us BIGINT NOT NULL,
        last_task_id TEXT NOT NULL,
        last_outcome TEXT NOT NULL,
        created_us BIGINT NOT NULL,
        updated_us BIGINT NOT NULL,
        raft_index BIGINT NOT NULL)""",
    """CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        concurrency INTEGER NOT NULL,
        queues TEXT NOT NULL,
        labels TEXT NOT NULL,
        executors TEXT NOT NULL,
        state TEXT NOT NULL,
        registered_us BIGINT NOT NULL,
        last_seen_us BIGINT NOT NULL)""",
    """CREATE TABLE persist_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        last_index BIGINT NOT NULL,
        updated_us BIGINT NOT NULL)""",
    "INSERT INTO persist_state (id, last_index, updated_us) VALUES (1, 0, 0)",
]

# Times as timestamptz for people at a psql prompt; 0 (not yet) shows as NULL.
_V1_PG_ONLY = [
    """CREATE VIEW tasks_v AS SELECT t.*,
        to_timestamp(created_us / 1e6) AS created_at,
        to_timestamp(NULLIF(next_run_us, 0) / 1e6) AS next_run_at,
        to_timestamp(NULLIF(finished_us, 0) / 1e6) AS finished_at
        FROM tasks t""",
    """CREATE VIEW execution_logs_v AS SELECT e.*,
        to_timestamp(NULLIF(started_us, 0) / 1e6) AS started_at,
        to_timestamp(NULLIF(deadline_us, 0) / 1e6) AS deadline_at,
        to_timestamp(NULLIF(finished_us, 0) / 1e6) AS finished_at
        FROM execution_logs e""",
]


def _translate(statements: list[str], dialect: str) -> list[str]:
    return [s.format(**_TYPES[dialect]) for s in statements]


# (version, statements for SQLite, statements for PostgreSQL), in order.
MIGRATIONS: list[tuple[int, list[str], list[str]]] = [
    (1, _translate(_V1, SQLITE), _translate(_V1, POSTGRES) + _V1_PG_ONLY),
]

LATEST = MIGRATIONS[-1][0]

_TRACK = "CREATE TABLE IF NOT EXISTS schema_migrations " \
         "(version INTEGER PRIMARY KEY, applied_us BIGINT NOT NULL)"


def migrate(conn, dialect: str) -> int:
    """Apply pending migrations in one transaction; returns the schema version.

    `conn` is a sqlite3 connection in autocommit mode (isolation_level=None) or a
    psycopg connection in autocommit mode; either way the caller holds no transaction.
    """
    if dialect == SQLITE:
        conn.execute("BEGIN IMMEDIATE")  # the write lock, before reading the version
        try:
            version = _apply(conn, dialect, "?")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return version
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        return _apply(conn, dialect, "%s")


def _apply(conn, dialect: str, mark: str) -> int:
    conn.execute(_TRACK)
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    for version, sqlite_sql, pg_sql in MIGRATIONS:
        if version in done:
            continue
        for statement in sqlite_sql if dialect == SQLITE else pg_sql:
            conn.execute(statement)
        conn.execute(f"INSERT INTO schema_migrations (version, applied_us) "
                     f"VALUES ({mark}, {mark})", (version, time.time_ns() // 1000))
        done.add(version)
    return max(done)
