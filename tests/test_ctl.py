"""`dtaskctl` end to end: the real entry point as a subprocess against a live cluster
of 3 scheduler processes and one worker (started once for the module)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtask import protocol as p
from dtask.broker.localcluster import SchedulerCluster
from dtask.client import Client
from dtask.ctl.params import parse_duration, parse_moment
from dtask.raft.localcluster import free_ports

pytestmark = pytest.mark.slow

# The installed console script when there is one, else the module (same code path).
_SCRIPT = Path(sys.executable).with_name("dtaskctl")
DTASKCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dtask.ctl"]

# Exit codes (docs/cli.md).
OK, TASK_FAILED, TIMED_OUT, USAGE, NOT_FOUND, CONFLICT, UNAVAILABLE = 0, 1, 2, 3, 4, 5, 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SchedulerCluster(str(tmp_path_factory.mktemp("ctl")), size=3)
    c.start_all()
    try:
        c.wait_leader()
        c.start_worker("w1", 4)
        yield c
    finally:
        c.stop_all()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.endpoints, timeout=15) as c:
        yield c


def ctl(cluster: SchedulerCluster | None, *args: str, endpoints: str | None = None,
        timeout: float = 30, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["DTASK_ENDPOINTS"] = endpoints or ",".join(cluster.endpoints)
    return subprocess.run([*DTASKCTL, *args], input=stdin, capture_output=True, env=env,
                          timeout=timeout)


def out(r: subprocess.CompletedProcess) -> str:
    return r.stdout.decode()


def assert_one_error_line(r: subprocess.CompletedProcess, code: int) -> str:
    """Principle 9: one line `dtaskctl: ...` on stderr, the documented code, no traceback."""
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err, out(r))
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtaskctl: "), err
    assert err.endswith("\n")
    return lines[0]


def submit(cluster: SchedulerCluster, *args: str) -> str:
    r = ctl(cluster, "submit", *args)
    assert r.returncode == OK, r.stderr.decode()
    return out(r).splitlines()[0]


# -- happy paths ---------------------------------------------------------------------


def test_submit_with_options_then_status(cluster):
    args = ["shell", '{"cmd": "echo opts"}', "--delay", "1h", "--priority", "7",
            "--timeout", "1m30s", "--retries", "2", "--backoff-initial", "2s",
            "--backoff-multiplier", "3", "--backoff-max", "1m", "--backoff-jitter", "0",
            "--queue", "q1", "--label", "gpu", "--label", "ssd,big", "--name", "nightly",
            "--idempotency-key", "ctl-opts-1", "--id", "ctl-opts-task"]
    before = time.time()
    task_id = submit(cluster, *args)
    assert task_id == "ctl-opts-task"
    assert submit(cluster, *args) == task_id  # same idempotency key: the same task

    r = ctl(cluster, "status", task_id, "--json")
    assert r.returncode == OK, r.stderr
    task = json.loads(r.stdout)
    assert task["id"] == task_id and task["status"] == p.SCHEDULED
    assert (task["name"], task["type"], task["queue"]) == ("nightly", "shell", "q1")
    assert task["priority"] == 7 and task["max_retries"] == 2 and task["timeout"] == 90
    assert task["labels"] == ["big", "gpu", "ssd"]  # a set: kept sorted
    assert task["idempotency_key"] == "ctl-opts-1"
    assert task["payload"] == {"cmd": "echo opts"}  # JSON payloads come back as JSON
    assert before + 3590 < task["run_at_us"] / 1e6 < time.time() + 3610
    assert task["attempts"] == []

    human = out(ctl(cluster, "status", task_id))  # the same through the people's view
    assert "SCHEDULED (due in 59m" in human and "nightly" in human and "big, gpu, ssd" in human
    ctl(cluster, "cancel", task_id)


def test_submit_wait_then_logs(cluster):
    r = ctl(cluster, "submit", "shell", '{"cmd": "echo hi"}', "--wait")
    assert r.returncode == OK, r.stderr
    task_id, final = out(r).splitlines()
    assert final.startswith("COMPLETED after 1 attempt")
    logs = ctl(cluster, "logs", task_id)
    assert logs.returncode == OK and logs.stdout == b"hi\n"
    assert b"COMPLETED" in ctl(cluster, "status", task_id).stdout


def test_submit_payload_from_stdin_and_wait_json(cluster):
    r = ctl(cluster, "submit", "shell", "--payload-file", "-", "--wait", "--json",
            stdin=b'{"cmd": "echo from-stdin"}')
    assert r.returncode == OK, r.stderr
    doc = json.loads(r.stdout)
    assert doc["task"]["status"] == p.COMPLETED and doc["task"]["id"] == doc["id"]
    assert ctl(cluster, "logs", doc["id"]).stdout == b"from-stdin\n"


def test_list_filters_by_status(cluster):
    later = submit(cluster, "shell", '{"cmd": "true"}', "--delay", "10m", "--name", "list-a")
    done = submit(cluster, "shell", '{"cmd": "true"}', "--wait")
    r = ctl(cluster, "list", "--status", "scheduled", "--json")
    assert r.returncode == OK, r.stderr
    listed = json.loads(r.stdout)["tasks"]
    assert later in {t["id"] for t in listed} and done not in {t["id"] for t in listed}
    assert {t["status"] for t in listed} == {p.SCHEDULED}
    r = ctl(cluster, "list", "--status", "COMPLETED,FAILED", "--type", "shell", "--since", "5m")
    assert done in out(r) and later not in out(r)
    assert out(r).split()[:4] == ["ID", "TYPE", "NAME", "STATUS"]  # a table for people
    ctl(cluster, "cancel", later)


def test_cancel_of_a_delayed_task(cluster):
    task_id = submit(cluster, "shell", '{"cmd": "echo never"}', "--delay", "5m")
    r = ctl(cluster, "cancel", task_id)
    assert r.returncode == OK and out(r) == f"cancelled {task_id}\n"
    r = ctl(cluster, "status", task_id, "--json")
    assert json.loads(r.stdout)["status"] == p.CANCELLED
    assert ctl(cluster, "cancel", task_id).returncode == OK  # cancel is idempotent
    r = ctl(cluster, "wait", task_id)
    assert r.returncode == TASK_FAILED and out(r).startswith("CANCELLED")


def test_cluster_status_json(cluster):
    r = ctl(cluster, "cluster", "status", "--json")
    assert r.returncode == OK, r.stderr
    doc = json.loads(r.stdout)
    nodes = doc["nodes"]
    assert len(nodes) == 3 and all(n["reachable"] for n in nodes)
    assert sorted(n["id"] for n in nodes) == [1, 2, 3]
    leaders = [n for n in nodes if n["role"] == "leader"]
    assert len(leaders) == 1
    assert doc["leader"] == leaders[0]["endpoint"]
    for n in nodes:
        assert n["endpoint"] in cluster.endpoints
        assert n["term"] >= 1 and n["commit_index"] >= 1 and n["applied_index"] >= 1
        assert isinstance(n["pid"], int) and n["pid"] > 0
    human = out(ctl(cluster, "cluster", "status"))
    assert f"leader: node {leaders[0]['id']} at {leaders[0]['endpoint']}" in human


def test_cluster_transfer_leader(cluster):
    before = cluster.wait_leader()
    target = next(i for i in cluster.members if i != before)
    r = ctl(cluster, "cluster", "transfer-leader", str(target), "--json")
    assert r.returncode == OK, r.stderr
    assert json.loads(r.stdout) == {"to": target}
    assert cluster.wait_leader(exclude=before, timeout=5) == target


def test_cluster_status_shows_an_unreachable_node(cluster):
    dead = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    eps = ",".join([*cluster.endpoints, dead])
    r = ctl(None, "cluster", "status", "--node-timeout", "0.3", "--json", endpoints=eps)
    assert r.returncode == OK, r.stderr
    nodes = {n["endpoint"]: n for n in json.loads(r.stdout)["nodes"]}
    assert not nodes[dead]["reachable"] and nodes[dead]["role"] is None
    assert sum(n["role"] == "leader" for n in nodes.values()) == 1
    r = ctl(None, "cluster", "status", "--node-timeout", "0.3", endpoints=eps)
    assert "unreachable" in out(r) and r.returncode == OK


def test_workers(cluster):
    # After a leader change (another test transfers leadership) the worker needs a
    # heartbeat or two to register with the new leader: wait for it, boundedly.
    deadline = time.monotonic() + 15
    while True:
        r = ctl(cluster, "workers", "--json")
        listed = {w["id"] for w in json.loads(r.stdout)["workers"]} if r.returncode == OK \
            else set()
        if r.returncode != OK or "w1" in listed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if r.returncode == OK:  # the scheduler lists workers in its cluster reply
        assert "w1" in listed
        assert "w1" in out(ctl(cluster, "workers"))
    else:  # an older scheduler: one clear line instead
        assert "not supported by this scheduler yet" in assert_one_error_line(r, 7)


def test_logs_follow_streams_a_running_task(cluster, client):
    cmd = "for i in 1 2 3 4 5; do echo line$i; sleep 0.3; done"
    task_id = submit(cluster, "shell", json.dumps({"cmd": cmd}))
    env = dict(os.environ, DTASK_ENDPOINTS=",".join(cluster.endpoints))
    # Unbuffered: readline() then takes exactly one line, and communicate() (which reads
    # the raw fds) the rest; a buffered reader could hold line 2 where neither sees it.
    proc = subprocess.Popen([*DTASKCTL, "logs", "-f", task_id], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, bufsize=0)
    try:
        first = proc.stdout.readline()
        # The first line arrived while the task still runs: streamed, not dumped at the end.
        assert client.status(task_id)["status"] == p.RUNNING
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == OK, err
    assert err == b""  # piped: no progress indicator
    assert first + rest == b"".join(b"line%d\n" % i for i in range(1, 6))


def test_wait_shows_progress_only_on_a_terminal(cluster):
    task_id = submit(cluster, "shell", '{"cmd": "sleep 0.6"}')
    master, slave = pty.openpty()
    env = dict(os.environ, DTASK_ENDPOINTS=",".join(cluster.endpoints))
    proc = subprocess.Popen([*DTASKCTL, "wait", task_id], stdout=subprocess.PIPE,
                            stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(30) == OK and proc.stdout.read().startswith(b"COMPLETED")
    assert f"waiting for {task_id}".encode() in seen and seen.endswith(b"\r\x1b[K")

    piped = ctl(cluster, "wait", submit(cluster, "shell", '{"cmd": "sleep 0.3"}'))
    assert piped.returncode == OK and piped.stderr == b""


def test_wait_exit_codes_for_failure_and_timeout(cluster):
    r = ctl(cluster, "submit", "shell", '{"cmd": "exit 3"}', "--retries", "0", "--wait")
    assert r.returncode == TASK_FAILED
    assert out(r).splitlines()[1].startswith("FAILED after 1 attempt")
    slow = submit(cluster, "shell", '{"cmd": "sleep 5"}')
    r = ctl(cluster, "wait", slow, "--timeout", "0.5")
    assert "timed out" in assert_one_error_line(r, TIMED_OUT)
    ctl(cluster, "cancel", slow)


# -- errors: one line, a documented exit code, never a traceback --------------------------


@pytest.mark.parametrize("args", [["status", "t-1"], ["submit", "shell", "{}"],
                                  ["cluster", "status"]])
def test_no_cluster_reachable(args):
    dead = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    r = ctl(None, "--timeout", "0.5", *args, endpoints=dead)
    line = assert_one_error_line(r, UNAVAILABLE)
    assert "unavailable" in line and dead in line


def test_unknown_task_id(cluster):
    for cmd in ("status", "wait", "logs", "cancel"):
        line = assert_one_error_line(ctl(cluster, cmd, "no-such-task"), NOT_FOUND)
        assert "no-such-task" in line


def test_bad_json_payload(cluster, client):
    before = len(client.list(limit=None))
    line = assert_one_error_line(ctl(cluster, "submit", "shell", "{cmd: nope"), USAGE)
    assert "not valid JSON" in line
    line = assert_one_error_line(ctl(cluster, "submit", "shell", "--payload-file", "-",
                                     stdin=b"[1, 2"), USAGE)
    assert "not valid JSON" in line
    assert len(client.list(limit=None)) == before  # nothing was submitted


def test_cancel_of_a_completed_task(cluster):
    task_id = submit(cluster, "shell", '{"cmd": "true"}', "--wait")
    line = assert_one_error_line(ctl(cluster, "cancel", task_id), CONFLICT)
    assert "COMPLETED" in line


@pytest.mark.parametrize("args", [
    ["submit", "shell", "{}", "--delay", "5x"],
    ["submit", "shell", "{}", "--delay", "1m", "--at", "2030-01-01T00:00:00"],
    ["submit", "shell", "{}", "--priority", "lots"],
    ["list", "--status", "BOGUS"],
    ["logs"],
    ["submit", "bad type!", "{}"],
    ["--endpoints", "nonsense", "status", "x"],
])
def test_bad_usage_is_one_line(args):
    dead = f"tcp://127.0.0.1:{free_ports(1)[0]}"  # validation happens before any request
    assert_one_error_line(ctl(None, "--timeout", "0.5", *args, endpoints=dead), USAGE)


# -- parsing (pure) -----------------------------------------------------------------------


def test_durations_and_times():
    assert parse_duration("30") == 30 and parse_duration("1.5") == 1.5
    assert parse_duration("1h30m") == 5400 and parse_duration("250ms") == 0.25
    assert parse_duration("2d") == 172800 and parse_duration("5m 10s") == 310
    for bad in ("", "5x", "m", "1h30", "-3s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_moment("1700000000") == 1700000000
    assert parse_moment("2023-11-14T22:13:20Z") == 1700000000
    assert abs(parse_moment("10m", relative=True) - (time.time() - 600)) < 5
    with pytest.raises(ValueError):
        parse_moment("10m")  # a duration is only a time with relative=True
