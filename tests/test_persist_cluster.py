"""Write-behind persistence and full restarts, with real processes and real databases.

Every test ends the same way: the cluster says the database has caught up (no dirty
rows left), and then every task the cluster knows is in the database with the same
status and the same attempts — nothing missing, nothing stale.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dtask import protocol as p
from dtask.broker.localcluster import SchedulerCluster
from dtask.client import Client, Unavailable
from dtask.persist.store import open_store
from dtask.raft.localcluster import Member, free_ports
from tests.pgserver import PgServer, drop_schema, pg_schema_dsn

pytestmark = pytest.mark.slow

FAST_RETRY = {"max_retries": 1, "backoff": {"initial": 0.05, "jitter": 0}}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "history.sqlite3")
        return
    name, dsn = pg_schema_dsn()
    yield dsn
    drop_schema(name)


def start_cluster(root, db: str, *args: str) -> SchedulerCluster:
    c = SchedulerCluster(str(root), size=3, worker_timeout=1.5, extra_args=["--db", db, *args])
    c.start_all()
    c.wait_leader()
    return c


def mixed_workload(client: Client) -> dict[str, str]:
    """Successes, a failure with a retry, cancels (pending and running), a delayed task.
    Returns task id -> the status it must end in."""
    expect = {}
    for i in range(20):
        expect[client.submit("shell", {"cmd": f"echo ok {i}"})] = p.COMPLETED
    for _ in range(3):
        expect[client.submit("shell", {"cmd": "echo bad; exit 3"}, **FAST_RETRY)] = p.FAILED
    later = client.submit("shell", {"cmd": "true"}, delay=3600)
    client.cancel(later)
    expect[later] = p.CANCELLED
    long = client.submit("shell", {"cmd": "sleep 30"})
    deadline = time.monotonic() + 20
    while client.status(long)["status"] != p.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.cancel(long)
    expect[long] = p.CANCELLED
    expect[client.submit("shell", {"cmd": "true"}, delay=3600)] = p.SCHEDULED
    return expect


def wait_status(client: Client, expect: dict[str, str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for task_id, status in expect.items():
        while client.status(task_id)["status"] != status:
            assert time.monotonic() < deadline, (task_id, client.status(task_id)["status"])
            time.sleep(0.05)


def wait_persisted(cluster: SchedulerCluster, timeout: float = 30.0) -> dict:
    """Until the leader reports no row left to write; returns its persist stats."""
    deadline = time.monotonic() + timeout
    while True:
        leader = cluster.wait_leader()
        info = cluster.node_info(leader) or {}
        persist = info.get("persist", {})
        if persist.get("pending_rows") == 0 and persist.get("state") == "ok" \
                and not persist.get("busy"):
            return persist
        assert time.monotonic() < deadline, persist
        time.sleep(0.1)


def summary(task: dict) -> tuple:
    return (task["status"], task["finished_us"],
            [(a["attempt"], a["worker"], a["outcome"], a["finished_us"])
             for a in task["attempts"]])


def assert_database_agrees(client: Client, dsn: str, task_ids) -> None:
    store = open_store(dsn)
    try:
        for task_id in task_ids:
            live = client.status(task_id)
            stored = store.get_task(task_id)
            assert stored is not None, f"{task_id} missing from the database"
            assert summary(stored) == summary(live), task_id
            assert stored == live  # every field, payload and attempts included
    finally:
        store.close()


def all_ids(client: Client) -> list[str]:
    return [t["id"] for t in client.list(limit=None)]


def test_rows_match_the_live_state_after_a_mixed_workload(tmp_path, db):
    cluster = start_cluster(tmp_path, db)
    try:
        cluster.start_worker("w1", 4)
        with Client(cluster.endpoints, timeout=15) as client:
            expect = mixed_workload(client)
            wait_status(client, expect)
            wait_persisted(cluster)
            ids = all_ids(client)
            assert set(expect) <= set(ids)
            assert_database_agrees(client, db, ids)
            failed = next(t for t, s in expect.items() if s == p.FAILED)
            assert [a["outcome"] for a in client.status(failed)["attempts"]] == [
                p.ERRORED, p.ERRORED]
    finally:
        cluster.stop_all()


def test_database_outage_mid_workload_loses_nothing(tmp_path):
    pg = PgServer(tempfile.mkdtemp(prefix="dtask-pg-"))
    pg.start()
    cluster = start_cluster(tmp_path, pg.dsn)
    try:
        cluster.start_worker("w1", 4)
        with Client(cluster.endpoints, timeout=15) as client:
            before = [client.submit("shell", {"cmd": "true"}) for _ in range(20)]
            wait_persisted(cluster)
            pg.kill()  # the database crashes mid-workload
            during = [client.submit("shell", {"cmd": "echo during"}) for _ in range(50)]
            wait_status(client, dict.fromkeys(before + during, p.COMPLETED))
            leader = cluster.wait_leader()
            persist = cluster.node_info(leader)["persist"]
            # The cluster kept scheduling; the database is behind and says so.
            assert persist["pending_rows"] > 0 and persist["state"] == "down", persist
            pg.start()
            wait_persisted(cluster, timeout=60)
            pg.stop()  # and a clean shutdown, later, mid-workload too
            after = [client.submit("shell", {"cmd": "true"}) for _ in range(20)]
            wait_status(client, dict.fromkeys(after, p.COMPLETED))
            pg.start()
            wait_persisted(cluster, timeout=60)
            assert_database_agrees(client, pg.dsn, before + during + after)
        node_log = "".join(Path(m.log_path).read_text() for m in cluster.members.values())
        # Logged once per state change, not per retry or row.
        assert 1 <= node_log.count("event=persist_down") <= 4
    finally:
        cluster.stop_all()
        pg.close()


def test_leader_sigkill_while_persisting_leaves_no_gap_or_duplicate(tmp_path, db):
    cluster = start_cluster(tmp_path, db)
    try:
        cluster.start_worker("w1", 4)
        with Client(cluster.endpoints, timeout=20) as client:
            ids: list[str] = []
            stop = threading.Event()

            def feed() -> None:
                while not stop.is_set():
                    with contextlib.suppress(Unavailable):
                        ids.extend(client.submit_many([{"type": "shell",
                                                        "payload": {"cmd": "true"}}] * 50))

            t = threading.Thread(target=feed)
            t.start()
            for _ in range(2):
                time.sleep(1.0)
                leader = cluster.wait_leader()
                cluster.kill(leader)  # SIGKILL, with batches in flight
                cluster.wait_leader(exclude=leader)
                cluster.start(leader)
            time.sleep(0.5)
            stop.set()
            t.join(30)
            wait_status(client, dict.fromkeys(ids, p.COMPLETED), timeout=120)
            wait_persisted(cluster, timeout=60)
            assert_database_agrees(client, db, ids)
            store = open_store(db)
            try:
                stored, _ = store.list_tasks([], "", 0, 1_000_000, "")
            finally:
                store.close()
            assert sorted(t["id"] for t in stored) == sorted(set(all_ids(client)))
        # A new leader continues from what the database holds: no full rewrite.
        logs = "".join(Path(m.log_path).read_text() for m in cluster.members.values())
        assert "event=persist_resync" not in logs
    finally:
        cluster.stop_all()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_full_restart_keeps_every_task_and_runs_the_pending_ones(tmp_path, how):
    db = str(tmp_path / "history.sqlite3")
    cluster = start_cluster(tmp_path, db)
    try:
        cluster.start_worker("w1", 4)
        with Client(cluster.endpoints, timeout=15) as client:
            done = [client.submit("shell", {"cmd": "echo before"}) for _ in range(10)]
            wait_status(client, dict.fromkeys(done, p.COMPLETED))
            for proc in cluster.workers:
                proc.kill()
                proc.wait()
            pending = [client.submit("shell", {"cmd": "echo after"}) for _ in range(10)]
            delayed = client.submit("shell", {"cmd": "echo delayed"}, delay=2.0)
        for proc in [m.proc for m in cluster.members.values()]:
            proc.send_signal(how)  # every scheduler at once
        for proc in [m.proc for m in cluster.members.values()]:
            proc.wait(30)
        cluster.start_all()
        cluster.wait_leader()
        cluster.start_worker("w2", 4)
        with Client(cluster.endpoints, timeout=15) as client:
            for task_id in done:
                task = client.status(task_id)
                assert task["status"] == p.COMPLETED and task["attempts"][0]["worker"] == "w1"
            wait_status(client, dict.fromkeys(pending + [delayed], p.COMPLETED))
            assert {client.status(t)["attempts"][-1]["worker"] for t in pending} == {"w2"}
            wait_persisted(cluster)
            assert_database_agrees(client, db, done + pending + [delayed])
    finally:
        cluster.stop_all()


def test_purged_tasks_are_read_from_the_database(tmp_path):
    db = str(tmp_path / "history.sqlite3")
    cluster = start_cluster(tmp_path, db, "--retention", "1")
    try:
        cluster.start_worker("w1", 2)
        with Client(cluster.endpoints, timeout=15) as client:
            old = client.submit("shell", {"cmd": "echo from the past"}, name="old")
            wait_status(client, {old: p.COMPLETED})
            live = client.status(old)
            deadline = time.monotonic() + 30
            leader = cluster.wait_leader()
            while cluster.node_info(leader)["tasks"][p.COMPLETED]:
                assert time.monotonic() < deadline, "never purged"
                time.sleep(0.2)
            # Gone from the live state; status, list and logs find it in the database.
            assert client.status(old) == live
            assert old in [t["id"] for t in client.list(status=p.COMPLETED, limit=None)]
            assert client.logs(old) == b"from the past\n"
            with pytest.raises(Exception, match="no task"):
                client.status("never-existed")
    finally:
        cluster.stop_all()


def test_a_wiped_scheduler_is_replaced_and_catches_up(tmp_path):
    db = str(tmp_path / "history.sqlite3")
    cluster = start_cluster(tmp_path, db)
    try:
        with Client(cluster.endpoints, timeout=15) as client:
            ids = [client.submit("shell", {"cmd": "true"}) for _ in range(30)]
            leader = cluster.wait_leader()
            victim = next(i for i in cluster.members if i != leader)
            cluster.kill(victim)
            shutil.rmtree(cluster.members[victim].data_dir)  # its disk is gone
            client.member_change("remove", victim)
            # A replacement under a new id (ids are never reused), joining empty.
            raft_port, client_port = free_ports(2)
            new = Member(4, f"tcp://127.0.0.1:{raft_port}", f"tcp://127.0.0.1:{client_port}",
                         os.path.join(str(tmp_path), "s4"))
            cluster.members[4] = new
            cluster.start(4, join=True)
            client.member_change("add_learner", 4, new.raft, new.client)
            deadline = time.monotonic() + 30
            while True:
                info = cluster.node_info(4) or {}
                if info.get("applied", 0) >= (cluster.node_info(leader) or {}).get("commit", 1):
                    break
                assert time.monotonic() < deadline, info
                time.sleep(0.1)
            conf = client.member_change("promote", 4)
            assert 4 in conf["voters"] and victim not in conf["voters"]
        with Client([new.client], timeout=15) as client4:
            for task_id in ids:  # the new node's own replica has every task
                assert client4.status(task_id, stale=True)["id"] == task_id
    finally:
        cluster.stop_all()
