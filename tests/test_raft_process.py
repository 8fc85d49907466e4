"""Raft with real processes on 127.0.0.1: SIGKILL, restarts, snapshots, bad input."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

from dtask.raft.kvclient import KVError
from dtask.raft.localcluster import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path), size=3, spares=1, snapshot_every=300, keep_entries=50)
    c.start_all()
    yield c
    c.stop_all()


def write_keys(c: Cluster, start: int, count: int, batch: int = 50) -> dict[str, str]:
    """Pipelined puts; a batch interrupted by a failure is retried (puts are idempotent).
    Returns only what the cluster acknowledged."""
    acked: dict[str, str] = {}
    for lo in range(start, start + count, batch):
        ops = [("put", f"k{i}", f"v{i}") for i in range(lo, min(lo + batch, start + count))]
        try:
            c.client.pipeline(ops, window=32)
        except (TimeoutError, KVError):
            for op, key, value in ops:
                c.client.call(op, key, value)
        acked.update({key: value for _, key, value in ops})
    return acked


def read_all_local(c: Cluster, node_id: int, keys: list[str]) -> dict[str, object]:
    return {k: c.client.call("local_get", k, node=node_id) for k in keys}


def test_leader_sigkill_under_a_stream_of_writes_loses_nothing(cluster):
    leader = cluster.wait_leader()
    killer = threading.Timer(0.3, cluster.kill, [leader])
    killer.start()
    acked: dict[str, str] = {}
    after_kill = 0
    # Keep writing through the failover, then enough for the new leader to compact past
    # the killed node (it snapshots every LEADER_SNAPSHOT_SPACING x 300 entries).
    while after_kill < 3000:
        dead = not killer.is_alive()
        acked.update(write_keys(cluster, len(acked), 50))
        after_kill += 50 if dead else 0
    assert cluster.members[leader].proc.poll() == -signal.SIGKILL

    new_leader = cluster.wait_leader(exclude=leader)
    assert new_leader != leader
    survivors = [i for i in cluster.founders if i != leader]
    commit = cluster.status(new_leader)["commit"]
    cluster.wait_applied(survivors, commit)
    for node in survivors:
        assert read_all_local(cluster, node, list(acked)) == acked

    # The killed node recovers from its disk and catches up; the leader has compacted
    # far past it, so it needs InstallSnapshot.
    cluster.start(leader)
    cluster.wait_applied([leader], commit)
    assert read_all_local(cluster, leader, list(acked)) == acked
    assert "event=snapshot_installed" in cluster.members[leader].log_text()


def test_full_cluster_sigkill_then_restart_recovers_everything(cluster):
    acked = write_keys(cluster, 0, 400)
    for i in cluster.founders:
        cluster.kill(i)
    cluster.start_all()
    cluster.wait_leader()
    assert {k: cluster.client.call("get", k) for k in acked} == acked


def test_graceful_stop_of_the_leader_transfers_leadership(cluster):
    leader = cluster.wait_leader()
    write_keys(cluster, 0, 20)
    cluster.kill(leader, signal.SIGTERM)
    assert cluster.members[leader].proc.returncode == 0
    assert "event=stop_transfer" in cluster.members[leader].log_text()
    new_leader = cluster.wait_leader(exclude=leader, timeout=2)
    assert new_leader != leader
    assert cluster.client.call("put", "after", "transfer") is None


def test_learner_joins_is_promoted_and_the_leader_removes_itself(cluster):
    write_keys(cluster, 0, 700)  # enough that the learner starts from a snapshot
    leader = cluster.wait_leader()
    cluster.start(4, join=True)
    cluster.client.call("add_learner", value=[4, cluster.members[4].raft])
    commit = cluster.status(leader)["commit"]
    cluster.wait_applied([4], commit)
    assert cluster.client.call("local_get", "k699", node=4) == "v699"

    cluster.client.call("promote", value=[4, ""])
    st = cluster.status(leader)
    assert st["voters"] == [1, 2, 3, 4]

    cluster.client.call("remove", value=[leader, ""])
    new_leader = cluster.wait_leader(exclude=leader)
    assert leader not in cluster.status(new_leader)["voters"]
    assert cluster.client.call("put", "after", "removal") is None
    cluster.wait_applied([4], cluster.status(new_leader)["commit"])
    assert cluster.client.call("local_get", "after", node=4) == "removal"


def test_malformed_raft_frames_are_dropped_and_counted(cluster):
    leader = cluster.wait_leader()
    target = next(i for i in cluster.founders if i != leader)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"9")
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(cluster.members[target].raft)
    garbage = [b"", b"\xc1\xff\x00", msgpack.packb({"a": 1}), msgpack.packb([1, 2, 3]),
               msgpack.packb([1, 99, 2, 9, 1, 0, 0, [], 0, False, 0, b"", None, 0, b"", False]),
               msgpack.packb([1, 1, target, 9, 1, 0, 0, [[1, 5, 0, b"x"]], 0, False, 0, b"",
                              None, 0, b"", False]),
               os.urandom(4096)]
    for g in garbage:
        sock.send(g)
    sock.send_multipart([b"two", b"frames"])
    sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        counters = cluster.status(target)["transport"]
        if counters.get("recv_malformed", 0) >= len(garbage) + 1:
            break
        time.sleep(0.05)
    assert counters.get("recv_malformed", 0) >= len(garbage) + 1
    assert cluster.members[target].proc.poll() is None
    assert cluster.client.call("put", "still", "serving") is None


def test_corrupt_log_refuses_to_start_with_one_line_error(cluster):
    write_keys(cluster, 0, 100)
    cluster.kill(3)
    segments = sorted(glob.glob(os.path.join(cluster.members[3].data_dir, "raft", "log", "*")))
    assert segments
    with open(segments[0], "r+b") as f:
        f.seek(64)
        byte = f.read(1)
        f.seek(64)
        f.write(bytes([byte[0] ^ 0xFF]))
    m = cluster.start(3)
    m.proc.wait(15)
    assert m.proc.returncode == 2
    last_line = m.log_text().strip().splitlines()[-1]
    assert last_line.startswith("dtask: refusing to start:")
    assert os.path.basename(segments[0]) in last_line
    assert "Traceback" not in m.log_text()


def test_node_cli_rejects_bad_peers_without_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dtask", "raft-node", "--id", "1", "--data-dir", str(tmp_path),
         "--raft", "tcp://127.0.0.1:1", "--client", "tcp://127.0.0.1:2", "--peers", "one=x"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "is not ID=tcp://HOST:PORT" in out.stderr
    assert "Traceback" not in out.stderr
