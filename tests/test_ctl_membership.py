"""`dtaskctl cluster add-node / remove-node` end to end: the real entry point as a
subprocess against a fresh cluster of 3 scheduler processes per test (membership
changes do not leave a cluster as they found it)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from dtask.broker.localcluster import SchedulerCluster
from dtask.raft.localcluster import Member, free_ports

from .test_ctl import OK, USAGE, assert_one_error_line, ctl, out

pytestmark = pytest.mark.slow

PERSIST_KEYS = {"pending_rows", "lag_s", "persisted_index", "state", "db_index"}


@pytest.fixture
def cluster(tmp_path):
    c = SchedulerCluster(str(tmp_path), size=3)
    c.start_all()
    try:
        c.wait_leader()
        yield c
    finally:
        c.stop_all()


def ok_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == OK, r.stderr.decode()
    return json.loads(r.stdout)


def start_joining(cluster: SchedulerCluster, node_id: int) -> Member:
    """A new, empty scheduler started with --join: it waits to be added."""
    raft_port, client_port = free_ports(2)
    m = Member(node_id, f"tcp://127.0.0.1:{raft_port}", f"tcp://127.0.0.1:{client_port}",
               os.path.join(cluster.root, f"s{node_id}"))
    cluster.members[node_id] = m
    cluster.start(node_id, join=True)
    return m


def founders(cluster: SchedulerCluster) -> str:
    return ",".join(cluster.members[i].client for i in (1, 2, 3))


def status(cluster: SchedulerCluster) -> dict[int, dict]:
    """`cluster status --json` over every member's endpoint, the answering nodes by id."""
    doc = ok_json(ctl(cluster, "cluster", "status", "--json", "--endpoints",
                      ",".join(cluster.endpoints)))
    return {n["id"]: n for n in doc["nodes"] if n["reachable"]}


def test_add_node_then_remove_node(cluster):
    new = start_joining(cluster, 4)
    add = ["cluster", "add-node", "4", "--raft", new.raft, "--client", new.client]
    # A learner first (--learner stops there), then the same command promotes it.
    r = ctl(cluster, *add, "--learner", endpoints=founders(cluster))
    assert r.returncode == OK, r.stderr
    assert out(r) == "node 4 is a learner; voters [1, 2, 3], learners [4]\n"
    conf = ok_json(ctl(cluster, *add, "--catch-up-timeout", "20s", "--json",
                       endpoints=founders(cluster)))
    assert conf["voters"] == [1, 2, 3, 4] and conf["learners"] == []

    # Node 4 answers `cluster status` as a follower and its replica catches up.
    deadline = time.monotonic() + 15
    while True:
        nodes = status(cluster)
        leader = next((n for n in nodes.values() if n["role"] == "leader"), None)
        four = nodes.get(4)
        if leader and four and four["applied_index"] >= leader["commit_index"]:
            break
        assert time.monotonic() < deadline, nodes
        time.sleep(0.2)
    assert four["role"] == "follower" and four["term"] == leader["term"]
    assert four["leader"] == leader["endpoint"]
    for n in nodes.values():  # every scheduler reports its history writer (DB LAG)
        assert n["persist"].keys() >= PERSIST_KEYS, n
        assert n["persist"]["pending_rows"] >= 0 and n["persist"]["lag_s"] >= 0
    human = out(ctl(cluster, "cluster", "status", "--endpoints", ",".join(cluster.endpoints)))
    header, *rows = human.splitlines()
    assert header.split()[-2:] == ["DB", "LAG"]
    assert len([row for row in rows if row.split()[0] in {"1", "2", "3", "4"}]) == 4

    # Adding it again changes nothing (a retried command must be safe).
    r = ctl(cluster, *add, endpoints=founders(cluster))
    assert r.returncode == OK and "voters [1, 2, 3, 4]" in out(r), r.stderr

    conf = ok_json(ctl(cluster, "cluster", "remove-node", "4", "--json"))
    assert conf["voters"] == [1, 2, 3] and conf["learners"] == []
    cluster.kill(4)
    del cluster.members[4]
    r = ctl(cluster, "cluster", "status", "--json")
    assert r.returncode == OK, r.stderr
    assert sum(n["role"] == "leader" for n in json.loads(r.stdout)["nodes"]) == 1


def test_remove_node_of_a_non_member_succeeds(cluster):
    # Idempotent by design (dtask/raft/node.py change_membership): a retry whose first
    # try applied, its reply lost to a failover, must not fail. So is any non-member.
    r = ctl(cluster, "cluster", "remove-node", "9")
    assert r.returncode == OK, r.stderr
    assert out(r) == "node 9 removed; voters [1, 2, 3]\n"
    conf = ok_json(ctl(cluster, "cluster", "remove-node", "9", "--json"))
    assert conf["voters"] == [1, 2, 3]


@pytest.mark.parametrize(("raft", "client"), [
    ("nonsense", "tcp://127.0.0.1:7999"),
    ("tcp://127.0.0.1:7998", "127.0.0.1:7999"),
])
def test_add_node_with_a_malformed_endpoint(cluster, raft, client):
    r = ctl(cluster, "cluster", "add-node", "5", "--raft", raft, "--client", client)
    assert "tcp://HOST:PORT" in assert_one_error_line(r, USAGE)
    conf = ok_json(ctl(cluster, "cluster", "remove-node", "9", "--json"))
    assert conf["voters"] == [1, 2, 3] and conf["learners"] == []  # nothing was added


def test_add_node_with_an_endpoint_without_port(cluster):
    r = ctl(cluster, "--timeout", "2s", "cluster", "add-node", "5", "--raft", "tcp://127.0.0.1",
            "--client", "tcp://127.0.0.1:7999", "--learner")
    assert_one_error_line(r, USAGE)
    assert all(cluster.alive(i) for i in (1, 2, 3))


def test_add_node_usage_errors_need_no_cluster():
    dead = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    r = ctl(None, "--timeout", "0.5", "cluster", "add-node", "4", "--raft", "tcp://h:1",
            endpoints=dead)
    assert "--client" in assert_one_error_line(r, USAGE)
    r = ctl(None, "--timeout", "0.5", "cluster", "remove-node", "0", endpoints=dead)
    assert_one_error_line(r, USAGE)
