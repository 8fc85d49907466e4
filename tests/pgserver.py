"""PostgreSQL for tests: a schema of its own on the shared server, or a throwaway
server that a test may stop, kill and start again.

The shared server on 127.0.0.1:5432 serves every other test, so outage tests get their
own: `initdb` into a temporary directory (as the `postgres` user: the server refuses
to run as root) and `pg_ctl` on a free port. About a second to create.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import time
import uuid

import psycopg

from dtask.raft.localcluster import free_ports

PG = os.environ.get("DTASK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pg_schema_dsn(base: str = PG) -> tuple[str, str]:
    """A fresh schema on the shared server, and a DSN whose search_path points at it."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in base else "?"
    return name, f"{base}{sep}options=-csearch_path%3D{name}"


def drop_schema(name: str) -> None:
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (.ci/run installs it)")
    return found


class PgServer:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "pgdata")
        self.port = free_ports(1)[0]
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        os.makedirs(self.dir)
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            for path in (root, self.dir):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self._run([_bin("initdb"), "-D", self.dir, "-U", "postgres", "-A", "trust",
                   "--no-sync", "-E", "UTF8"])

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        self._run([_bin("pg_ctl"), "-D", self.dir, "-w", "-l",
                   os.path.join(self.dir, "server.log"), "-o",
                   f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=on", "start"])
        deadline = time.monotonic() + 15
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """A clean shutdown (pg_ctl stop -m fast)."""
        self._run([_bin("pg_ctl"), "-D", self.dir, "-m", "fast", "-w", "stop"], check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would (its children follow)."""
        pidfile = os.path.join(self.dir, "postmaster.pid")
        try:
            with open(pidfile) as f:
                pid = int(f.readline())
        except (OSError, ValueError):
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        # Orphaned backends keep the shared memory; they exit once they notice.
        time.sleep(0.5)

    def close(self) -> None:
        self._run([_bin("pg_ctl"), "-D", self.dir, "-m", "immediate", "-w", "stop"],
                  check=False)
