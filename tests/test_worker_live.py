"""The worker against the real scheduler: a 3-node cluster of scheduler processes,
real worker processes and the real client. Tests run in file order; the last one kills
the leader."""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from dtask import protocol as p
from dtask.broker.localcluster import SchedulerCluster
from dtask.client import Client

pytestmark = pytest.mark.slow


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b"hello from http"
        self.send_response(200 if self.path == "/ok" else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("live")
    cluster = SchedulerCluster(str(root), size=3, worker_timeout=1.5)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cluster.start_all()
        cluster.wait_leader()
        # 4 slots for at most 4 tasks at a time: see the credits race in the worker docs
        worker = cluster.start_worker("wl-1", 4, "--import", "tests.tasks", "--kill-grace",
                                      "0.3", "--drain-timeout", "0.5")
        with Client(cluster.endpoints, timeout=15) as client:
            yield {"cluster": cluster, "client": client, "root": root, "worker": worker,
                   "http": f"http://127.0.0.1:{server.server_address[1]}"}
    finally:
        cluster.stop_all()
        server.shutdown()
        for log in sorted(root.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}")


def wait_running(client: Client, tid: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while (task := client.status(tid))["status"] != p.RUNNING:
        assert time.monotonic() < deadline, f"{tid} never ran: {task}"
        time.sleep(0.05)
    return task


def wait_logs(client: Client, tid: str, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while not (data := client.logs(tid)):
        assert time.monotonic() < deadline, f"no live log for {tid}"
        time.sleep(0.05)
    return data


def group_gone(pgid: int, wait: float = 3.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_each_executor_end_to_end(live: dict) -> None:
    client = live["client"]
    sh = client.submit("shell", {"cmd": "echo out; echo err >&2"})
    py = client.submit("python", {"fn": "tests.tasks:add", "args": [40, 2]})
    ok = client.submit("http", {"url": live["http"] + "/ok"})
    bad = client.submit("http", {"url": live["http"] + "/down"}, max_retries=0)
    t_sh, t_py, t_ok, t_bad = (client.wait(t, timeout=30) for t in (sh, py, ok, bad))
    assert t_sh["status"] == p.COMPLETED and client.logs(sh) == b"out\nerr\n"
    assert t_py["status"] == p.COMPLETED
    assert msgpack.unpackb(t_py["attempts"][0]["result"]) == 42
    assert t_ok["status"] == p.COMPLETED
    assert msgpack.unpackb(t_ok["attempts"][0]["result"])["body"] == b"hello from http"
    assert t_bad["status"] == p.FAILED and "unexpected HTTP status 503" in (
        t_bad["attempts"][0]["error"])
    assert all(t["attempts"][0]["worker"] == "wl-1" for t in (t_sh, t_py, t_ok, t_bad))


def test_logs_stream_while_running_and_are_complete_after(live: dict) -> None:
    client = live["client"]
    tid = client.submit("shell", {"cmd": "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.2;"
                                         " done"})
    partial = wait_logs(client, tid)
    assert client.status(tid)["status"] == p.RUNNING and partial.startswith(b"line 1\n")
    assert client.wait(tid, timeout=30)["status"] == p.COMPLETED
    assert client.logs(tid) == b"".join(b"line %d\n" % i for i in range(1, 7))


def test_cancel_running_shell_and_python_tasks(live: dict) -> None:
    client = live["client"]
    sh = client.submit("shell", {"cmd": "echo pgid=$$; sleep 30"})
    py = client.submit("python", {"fn": "time:sleep", "args": [30]})
    pgid = int(wait_logs(client, sh).decode().split("pgid=")[1].split()[0])
    wait_running(client, py)
    client.cancel(sh)
    client.cancel(py)
    for tid in (sh, py):
        task = client.wait(tid, timeout=15)
        assert task["status"] == p.CANCELLED and task["attempts"][-1]["outcome"] == p.KILLED
    assert group_gone(pgid)


def test_timeout_of_a_task_that_ignores_sigterm(live: dict) -> None:
    client = live["client"]
    tid = client.submit("shell", {"cmd": "trap '' TERM; sleep 30"}, timeout=0.5,
                        max_retries=0)
    task = client.wait(tid, timeout=30)
    assert task["status"] == p.FAILED
    attempt = task["attempts"][0]
    assert attempt["outcome"] == p.TIMED_OUT and "killed by SIGKILL" in attempt["error"]


def test_sigterm_drain_reports_lost_and_the_task_retries_elsewhere(live: dict) -> None:
    client, cluster = live["client"], live["cluster"]
    marker = live["root"] / "drained-once"
    tid = client.submit("shell", {"cmd": f"if [ -e {marker} ]; then echo second; "
                                         f"else touch {marker}; sleep 30; fi"})
    first = wait_running(client, tid)["attempts"][0]["worker"]
    assert first == "wl-1"
    live["worker"].send_signal(signal.SIGTERM)
    assert live["worker"].wait(10) == 0
    live["worker"] = cluster.start_worker("wl-2", 2, "--import", "tests.tasks")
    task = client.wait(tid, timeout=30)
    assert task["status"] == p.COMPLETED and client.logs(tid) == b"second\n"
    attempts = task["attempts"]
    assert [a["worker"] for a in attempts] == ["wl-1", "wl-2"]
    assert attempts[0]["outcome"] == p.LOST
    assert attempts[0]["error"].startswith("worker shutting down")
    log = (live["root"] / "wl-1.log").read_text()
    assert "event=draining" in log and "event=worker_stopped" in log


def test_leader_sigkill_while_a_task_runs_reports_it_once(live: dict) -> None:
    client, cluster = live["client"], live["cluster"]
    tid = client.submit("shell", {"cmd": "sleep 1; echo finished"})
    wait_running(client, tid)
    leader = cluster.wait_leader()
    cluster.kill(leader)  # the result comes out while there is no leader
    task = client.wait(tid, timeout=40)
    assert task["status"] == p.COMPLETED and len(task["attempts"]) == 1
    assert task["attempts"][0]["outcome"] == p.SUCCEEDED
    assert client.logs(tid) == b"finished\n"
    log = Path(live["root"] / "wl-2.log").read_text()
    assert log.count("event=registered") >= 2  # found the new leader by itself
