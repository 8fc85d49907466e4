"""The persister and history threads: batches land, outages are ridden out, reads time out.

PostgreSQL outages are simulated with a TCP proxy in front of the shared server (which
these tests never stop): stopping the proxy cuts every connection and refuses new
ones, exactly what the persister sees when the server goes away.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sqlite3
import threading
import time
import uuid

import pytest
import zmq

from dtask.persist.history import HistoryReader
from dtask.persist.rows import Batch
from dtask.persist.store import StoreUnavailable, open_store
from dtask.persist.writer import DOWN, OK, Persister

from .test_persist_store import batch_of, drop_schema, make_task, pg_schema_dsn

PG_HOST, PG_PORT = "127.0.0.1", 5432


class Proxy:
    """A TCP forwarder to PostgreSQL that can be stopped (server gone) and restarted."""

    def __init__(self, upstream=(PG_HOST, PG_PORT), forward=True) -> None:
        self.upstream, self.forward = upstream, forward
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        # shutdown wakes the thread blocked in accept(); close alone would leave the
        # kernel socket listening until that accept() returned.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                self._conns.append(client)
            if not self.forward:
                continue  # a black hole: accepts, never answers
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._conns.append(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def make():
    """Persister / HistoryReader factory: closed at teardown even when a test fails."""
    made = []

    def build(cls, dsn, **kw):
        obj = cls(dsn, **kw)
        obj.start()
        made.append(obj)
        return obj

    yield build
    for obj in made:
        obj.close()


@pytest.fixture
def proxied_pg():
    """(proxy, dsn through the proxy, dsn direct) on a fresh schema."""
    proxy = Proxy()
    proxy.start()
    name, direct = pg_schema_dsn()
    through = direct.replace(f"{PG_HOST}:{PG_PORT}", f"{PG_HOST}:{proxy.port}")
    assert through != direct
    yield proxy, through, direct
    proxy.stop()
    drop_schema(name)


def loop_until(persister, cond, timeout=30.0) -> list[int]:
    """The scheduler loop's part: wait on `wake`, call poll(), until cond(done)."""
    poller = zmq.Poller()
    poller.register(persister.wake.fd, zmq.POLLIN)
    done: list[int] = []
    deadline = time.monotonic() + timeout
    while not cond(done):
        assert time.monotonic() < deadline, f"timed out: {persister.stats()}"
        poller.poll(50)
        done += persister.poll()
    return done


def persist_logs(caplog, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "dtask.persist" and f"event={event} " in r.getMessage()]


def test_batches_land_in_order(tmp_path, make):
    dsn = str(tmp_path / "h.db")
    persister = make(Persister, dsn)
    loop_until(persister, lambda _: persister.db_index is not None)
    assert persister.db_index == 0 and persister.state == OK
    done: list[int] = []
    for i in range(1, 6):
        assert not persister.busy()
        persister.submit(batch_of([make_task(i, attempts=1)], i * 10))
        assert persister.busy()
        with pytest.raises(RuntimeError):
            persister.submit(batch_of([], 99))  # one batch in flight, never two
        done += loop_until(persister, lambda d: d)
    assert done == [10, 20, 30, 40, 50]
    stats = persister.stats()
    assert stats["batches"] == 5 and stats["rows"] == 10 and stats["db_index"] == 50
    persister.close()
    s = open_store(dsn)
    assert s.last_index() == 50 and len(s.list_tasks([], "", 0, 100, "")[0]) == 5
    s.close()


def test_refresh_index_reads_what_another_writer_committed_since(tmp_path, make):
    """A node that becomes leader must see the previous leader's writes, not the index
    it read when it connected (or it would rewrite the whole live state)."""
    dsn = str(tmp_path / "h.db")
    persister = make(Persister, dsn)
    loop_until(persister, lambda _: persister.db_index is not None)
    assert persister.db_index == 0
    other = open_store(dsn)  # the leader of the time, on another node
    other.write(batch_of([make_task(1)], 77))
    other.close()
    assert persister.db_index == 0  # stale
    persister.refresh_index()
    assert persister.busy() and persister.db_index is None
    loop_until(persister, lambda _: persister.db_index is not None)
    assert persister.db_index == 77 and not persister.busy()


def test_postgres_outage_retries_the_same_batch_and_loses_nothing(proxied_pg, make, caplog):
    caplog.set_level(logging.INFO, logger="dtask.persist")
    proxy, through, direct = proxied_pg
    persister = make(Persister, through, timeout=2)
    loop_until(persister, lambda _: persister.state == OK)
    tasks = [make_task(i, attempts=i % 3) for i in range(1, 301)]
    persister.submit(batch_of(tasks[:100], 1))
    assert loop_until(persister, lambda d: d) == [1]

    proxy.stop()  # the server goes away, mid-session
    persister.submit(batch_of(tasks[100:200], 2))
    loop_until(persister, lambda _: persister.state == DOWN)
    assert "unavailable" in persister.last_error and "postgres@" in persister.last_error
    time.sleep(1.0)  # several retries, all failing
    assert persister.busy() and persister.poll() == []
    proxy.start()  # back, on the same port
    assert loop_until(persister, lambda d: d) == [2]
    assert persister.state == OK

    persister.submit(batch_of(tasks[200:], 3))
    assert loop_until(persister, lambda d: d) == [3]
    persister.close()
    assert len(persist_logs(caplog, "persist_down")) == 1  # one line per outage,
    assert len(persist_logs(caplog, "persist_up")) == 1  # not one per retry
    assert "down_s=" in persist_logs(caplog, "persist_up")[0]

    s = open_store(direct)
    assert s.last_index() == 3
    for t in tasks:
        assert s.get_task(t.id) == t.to_dict()
    s.close()


def test_postgres_terminated_backend_is_an_outage_too(proxied_pg, make, caplog):
    caplog.set_level(logging.INFO, logger="dtask.persist")
    _, _, direct = proxied_pg
    app = "persister_" + uuid.uuid4().hex[:8]
    persister = make(Persister, f"{direct}&application_name={app}", timeout=2)
    loop_until(persister, lambda _: persister.state == OK)
    admin = open_store(direct, migrate=False)
    killed = admin.conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE application_name = %s", (app,)).fetchone()[0]
    assert killed == 1
    persister.submit(batch_of([make_task(1)], 5))
    assert loop_until(persister, lambda d: d) == [5]
    assert admin.last_index() == 5
    admin.close()
    persister.close()
    assert len(persist_logs(caplog, "persist_down")) == 1
    assert len(persist_logs(caplog, "persist_up")) == 1


def test_down_from_the_start_then_connects(make, caplog):
    caplog.set_level(logging.INFO, logger="dtask.persist")
    proxy = Proxy()
    proxy.start()
    proxy.stop()  # a port nothing listens on (yet)
    name, direct = pg_schema_dsn()
    try:
        persister = make(Persister, direct.replace(f":{PG_PORT}/", f":{proxy.port}/"),
                         timeout=2)
        persister.submit(batch_of([make_task(1)], 8))
        loop_until(persister, lambda _: persister.state == DOWN)
        assert persister.db_index is None  # never connected: the loop must not trust it
        time.sleep(0.5)
        proxy.start()
        assert loop_until(persister, lambda d: d) == [8]
        assert persister.db_index == 8
        persister.close()
        proxy.stop()
        assert len(persist_logs(caplog, "persist_down")) == 1
    finally:
        drop_schema(name)


def test_sqlite_locked_by_another_process_then_catches_up(tmp_path, make, caplog):
    caplog.set_level(logging.INFO, logger="dtask.persist")
    path = tmp_path / "h.db"
    persister = make(Persister, str(path), timeout=0.1)
    loop_until(persister, lambda _: persister.state == OK)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    persister.submit(batch_of([make_task(1, attempts=2)], 4))
    loop_until(persister, lambda _: persister.state == DOWN)
    assert "locked" in persister.last_error
    time.sleep(0.5)
    holder.execute("ROLLBACK")
    holder.close()
    assert loop_until(persister, lambda d: d) == [4]
    persister.close()
    assert len(persist_logs(caplog, "persist_down")) == 1
    s = open_store(str(path))
    assert s.get_task("task-00001") == make_task(1, attempts=2).to_dict()
    s.close()


def test_bad_batch_keeps_retrying_without_log_spam(tmp_path, make, caplog):
    caplog.set_level(logging.INFO, logger="dtask.persist")
    persister = make(Persister, str(tmp_path / "h.db"))
    persister.submit(Batch(tasks=[("short",)], last_index=1))
    loop_until(persister, lambda _: persister.state == DOWN)
    time.sleep(0.5)
    assert persister.busy()  # held, not dropped: Raft still has the changes
    persister.close()
    assert len(persist_logs(caplog, "persist_down")) == 1


# ---------------------------------------------------------------------- history reader


def run_reader(reader, n: int, timeout=10.0) -> list[tuple]:
    """Poll like the scheduler loop (on wake and on a tick) until n replies arrived."""
    poller = zmq.Poller()
    poller.register(reader.wake.fd, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while len(replies) < n:
        assert time.monotonic() < deadline
        poller.poll(20)
        reader.poll()
    return replies


replies: list[tuple] = []


@pytest.fixture(autouse=True)
def _clear_replies():
    replies.clear()


def keep(result, error):
    replies.append((result, error, time.monotonic()))


def test_history_reads_answer_through_poll(tmp_path, make):
    dsn = str(tmp_path / "h.db")
    task = make_task(1, attempts=2)
    s = open_store(dsn)
    s.write(batch_of([task], 1))
    s.close()
    reader = make(HistoryReader, dsn)
    reader.request("get_task", (task.id,), keep)
    reader.request("list_tasks", ([], "", 0, 10, ""), keep)
    reader.request("get_log", (task.id, 1), keep)
    reader.request("get_task", ("missing",), keep)
    run_reader(reader, 4)
    assert [r[:2] for r in replies] == [
        (task.to_dict(), None), (([task.to_dict(with_payload=False)], ""), None),
        (b"log \xff\xfe1", None), (None, None)]
    with pytest.raises(ValueError):
        reader.request("drop_table", (), keep)
    reader.close()


def test_history_read_fails_in_time_when_the_server_hangs(make):
    hole = Proxy(forward=False)  # accepts connections, never answers
    hole.start()
    reader = make(HistoryReader, f"postgresql://postgres@127.0.0.1:{hole.port}/test",
                  timeout=0.5, max_waiting=3)
    started = time.monotonic()
    for _ in range(3):
        reader.request("get_task", ("x",), keep)
    with pytest.raises(StoreUnavailable, match="busy"):
        reader.request("get_task", ("x",), keep)  # bounded: fails at once
    run_reader(reader, 3)
    for result, error, at in replies:
        assert result is None and isinstance(error, StoreUnavailable)
        assert at - started < 1.0  # 0.5 s and a tick, not libpq's connect timeout
    reader.close()
    hole.stop()


def test_history_reader_fails_fast_while_down_and_recovers(proxied_pg, make):
    proxy, through, direct = proxied_pg
    s = open_store(direct)
    s.write(batch_of([make_task(1)], 1))
    s.close()
    proxy.stop()
    reader = make(HistoryReader, through, timeout=2)
    reader.request("get_task", ("task-00001",), keep)
    run_reader(reader, 1)
    assert isinstance(replies[0][1], StoreUnavailable)
    assert "unavailable" in str(replies[0][1])
    proxy.start()
    deadline = time.monotonic() + 15
    while replies[-1][1] is not None:  # until the backoff lets it reconnect
        assert time.monotonic() < deadline
        time.sleep(0.1)
        reader.request("get_task", ("task-00001",), keep)
        run_reader(reader, len(replies) + 1)
    assert replies[-1][0] == make_task(1).to_dict()
    reader.close()
