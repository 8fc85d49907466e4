"""End-to-end: a real worker against fake schedulers — finding the leader, failing
over with unacknowledged results, and draining on SIGTERM/SIGINT; and the worker's
connection alone, in this process, for which sockets it polls."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import msgpack
import pytest
import zmq

from dtask import protocol as p
from dtask.worker.config import WorkerConfig
from dtask.worker.connection import Connection
from dtask.worker.reactor import Reactor
from dtask.worker.testing import FakeScheduler, WorkerProcess, task

pytestmark = pytest.mark.slow

FAST = ["--heartbeat-interval", "0.1", "--register-timeout", "0.3", "--log-level", "debug"]


@pytest.fixture
def fakes() -> Iterator[list[FakeScheduler]]:
    made = [FakeScheduler().start() for _ in range(2)]
    yield made
    for f in made:
        f.close()


def finish(worker: WorkerProcess, expect_code: int = 0, sig: int = signal.SIGTERM) -> str:
    if worker.proc.poll() is None:
        worker.proc.send_signal(sig)
    try:
        code = worker.proc.wait(15)
    finally:
        out = worker.output()
        print(out[-20000:])
        worker.close()
    assert code == expect_code
    return out


def test_follows_the_leader_hint_and_fails_over_with_its_unacked_results(
        fakes: list[FakeScheduler]) -> None:
    a, b = fakes
    a.mode, a.leader_hint = "not_leader", b.endpoint
    b.drop_results = 1000  # B never acknowledges
    worker = WorkerProcess([a.endpoint], "--id", "w-lc", "--result-resend-interval", "30",
                           *FAST)
    try:
        b.wait_for(lambda: b.messages(p.HEARTBEAT), 10, "heartbeats at B (from A's hint)")
        assert a.messages(p.REGISTER) and not a.messages(p.HEARTBEAT)
        b.run(task("lc-1", "shell", {"cmd": "echo one"}),
              task("lc-2", "shell", {"cmd": "sleep 1; echo two"}))
        first = b.wait_result("lc-1")
        b.wait_for(lambda: [h for h in b.messages(p.HEARTBEAT)
                            if h["running"] == [["lc-2", 1]]], 5, "lc-2 running")
        # B goes quiet (a dead or partitioned leader); A wins the election
        b.mode, a.mode = "silent", "leader"
        reg = a.wait_for(lambda: [r for r in a.messages(p.REGISTER) if r["running"]], 10,
                         "a register at A")[0]
        assert reg["running"] == [["lc-2", 1]] and reg["worker_id"] == "w-lc"
        again = a.wait_result("lc-1", 5)  # resent because of the re-registration
        for k in ("task_id", "attempt", "outcome", "log", "started_us", "finished_us"):
            assert again[k] == first[k]
        assert again["log"] == b"one\n"
        second = a.wait_result("lc-2", 5)
        assert second["outcome"] == p.SUCCEEDED and second["log"] == b"two\n"
        assert not b.results("lc-2")
        a.wait_for(lambda: len(a.messages(p.HEARTBEAT)) >= 3, 5, "heartbeats at A")
        time.sleep(0.5)
        assert len(a.results("lc-1")) == 1  # acknowledged by A: not sent again
    finally:
        out = finish(worker)
    assert "event=not_leader" in out and "event=register_timeout" in out
    assert a.messages(p.BYE)


def test_skips_an_endpoint_that_does_not_answer(fakes: list[FakeScheduler]) -> None:
    dead, live = fakes
    dead.mode = "silent"
    live.heartbeat_interval = 0.05  # the leader's `registered` reply overrides ours
    worker = WorkerProcess([dead.endpoint, live.endpoint], *FAST)
    try:
        live.wait_for(lambda: live.messages(p.HEARTBEAT), 10, "heartbeats at the live one")
        assert dead.messages(p.REGISTER) and not dead.messages(p.HEARTBEAT)
        live.run(task("sk-1", "python", {"fn": "operator:add", "args": [1, 2]}))
        assert live.wait_result("sk-1")["outcome"] == p.SUCCEEDED
    finally:
        out = finish(worker)
    assert f"event=registered leader={live.endpoint} heartbeat_interval=0.05" in out


def test_only_the_leaders_socket_is_polled_while_registered() -> None:
    """While registered, the other endpoints' sockets leave the poll set (each costs
    system calls per loop turn); what they still receive is read with the heartbeats,
    and a lost leader puts every socket back for the search."""
    leader, other = FakeScheduler().start(), FakeScheduler().start()
    other.mode = "silent"  # answers the worker's first register only much later
    zctx = zmq.Context()
    reactor = Reactor()
    config = WorkerConfig(worker_id="w-poll", endpoints=[other.endpoint, leader.endpoint],
                          heartbeat_interval=0.05, register_timeout=0.2)
    conn = Connection(zctx, config, reactor, on_message=lambda ep, msg: None,
                      on_error=lambda ep, msg: None,
                      registration=lambda: {"worker_id": "w-poll"},
                      heartbeat=lambda: {"worker_id": "w-poll"},
                      on_registered=lambda changed: None)

    def polled() -> set[zmq.Socket]:
        return {k for k in reactor.handlers if isinstance(k, zmq.Socket)}

    def run_until(done: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, what
            now = time.monotonic()
            reactor.poll(min(0.02, max(0.0, conn.tick(now) - now)))

    try:
        assert polled() == set(conn.sockets.values())  # searching: all of them
        run_until(lambda: conn.leader == leader.endpoint, "registered at the leader")
        assert polled() == {conn.sockets[leader.endpoint]}
        # A late answer from the endpoint it gave up on waits in its socket while only
        # the reactor runs (nothing polls it), and is read (and dropped as stale) by the
        # next heartbeats.
        other.send(p.reply(p.REGISTERED, 1), "w-poll")
        late = conn.sockets[other.endpoint]
        deadline = time.monotonic() + 5
        while not late.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            assert time.monotonic() < deadline, "the late answer arrives"
            reactor.poll(0.01)
        run_until(lambda: not late.getsockopt(zmq.EVENTS) & zmq.POLLIN, "read at a heartbeat")
        assert conn.leader == leader.endpoint
        leader.mode = "silent"  # the probe goes unanswered: the search starts over
        run_until(lambda: conn.leader is None, "the silent leader given up")
        assert polled() == set(conn.sockets.values())
    finally:
        conn.close()
        zctx.term()
        leader.close()
        other.close()


def test_sigterm_drains_reports_and_says_bye(fakes: list[FakeScheduler]) -> None:
    fake = fakes[0]
    worker = WorkerProcess([fake.endpoint], "--concurrency", "2", "--drain-timeout", "1.5",
                           "--kill-grace", "0.3", *FAST)
    fake.wait_for(lambda: fake.messages(p.HEARTBEAT), 10, "heartbeats")
    pid_task = task("dr-0", "python", {"fn": "os:getpid"})
    fake.run(pid_task)
    pool_pid = msgpack.unpackb(fake.wait_result("dr-0")["result"])
    fake.run(task("dr-short", "shell", {"cmd": "sleep 0.8; echo short done"}),
             task("dr-long", "shell", {"cmd": "echo started; sleep 30"}),
             task("dr-queued", "shell", {"cmd": "echo queued ran"}))  # prefetched: no slot
    fake.wait_for(lambda: fake.log_chunks("dr-long"), 5, "dr-long to start")
    worker.proc.send_signal(signal.SIGTERM)
    queued = fake.wait_result("dr-queued")  # handed back at once, never run: retry elsewhere
    assert queued["outcome"] == p.REJECTED and queued["error"] == "worker shutting down"
    assert queued["log"] == b"" and not fake.results("dr-short")
    n = len(fake.messages())
    fake.wait_for(lambda: [m for m in fake.messages()[n:]
                           if m["t"] == p.HEARTBEAT and m["credits"] == 0], 5, "credits 0")
    fake.run(task("dr-late", "shell", {"cmd": "true"}))
    late = fake.wait_result("dr-late")
    assert late["outcome"] == p.REJECTED and late["error"] == "worker shutting down"
    short = fake.wait_result("dr-short")
    assert short["outcome"] == p.SUCCEEDED and short["log"] == b"short done\n"
    long = fake.wait_result("dr-long", 5)
    assert long["outcome"] == p.LOST and long["error"].startswith("worker shutting down")
    assert long["log"] == b"started\n"
    fake.wait_for(lambda: fake.messages(p.BYE), 5, "bye")
    kinds = [m["t"] for m in fake.messages()]
    assert kinds.index(p.BYE) > max(i for i, k in enumerate(kinds) if k == p.RESULT)
    out = finish(worker)
    assert "event=draining" in out and "results_unacknowledged" not in out
    with pytest.raises(ProcessLookupError):
        os.kill(pool_pid, 0)  # the Python pool went with the worker


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init counts as gone
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_sigkilled_worker_takes_its_shell_tasks_along(fakes: list[FakeScheduler]) -> None:
    """The worker cannot clean up after SIGKILL: the task's processes must not live on
    (they would run beside the retry of the same attempt on another worker) — neither
    the task's own process nor what it started in the background."""
    fake = fakes[0]
    worker = WorkerProcess([fake.endpoint], "--concurrency", "1", *FAST)
    fake.wait_for(lambda: fake.messages(p.HEARTBEAT), 10, "heartbeats")
    fake.run(task("orphan", "shell", {"cmd": "echo $$; sleep 300 & echo $!; wait"}))
    fake.wait_for(lambda: len(b"".join(c["data"] for c in fake.log_chunks("orphan")).split())
                  == 2, 5, "the task and its background child to start")
    pids = [int(x) for x in b"".join(c["data"] for c in fake.log_chunks("orphan")).split()]
    assert not any(_gone(pid) for pid in pids)  # running
    guard = [int(x) for x in subprocess.run(
        ["pgrep", "-P", str(worker.proc.pid), "-f", "dtask.worker.groupguard"],
        capture_output=True, text=True).stdout.split()]
    assert len(guard) == 1  # the worker's group guard, in a session of its own
    assert os.getsid(guard[0]) != os.getsid(worker.proc.pid)
    worker.proc.kill()
    worker.proc.wait(10)
    deadline = time.monotonic() + 5
    while not all(_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"task processes {pids} outlived their worker"
        time.sleep(0.05)
    while not _gone(guard[0]):  # its work done, the guard leaves too
        assert time.monotonic() < deadline, "the group guard outlived its worker"
        time.sleep(0.05)


def test_a_repeated_run_of_an_unacknowledged_attempt_gets_its_result_again(
        fakes: list[FakeScheduler]) -> None:
    """A new leader may push an attempt the worker already ran (its lease never
    committed under the old leader). The worker must not run it again nor ignore the
    push: the result it still holds answers it, at once."""
    fake = fakes[0]
    fake.drop_results = 1000  # never acknowledged: the worker keeps its results
    # Slow heartbeats: no liveness probe (which re-sends held results) during the test.
    worker = WorkerProcess([fake.endpoint], *FAST, "--heartbeat-interval", "5",
                           "--result-resend-interval", "30", "--ack-timeout", "0.3")
    try:
        fake.wait_for(lambda: fake.messages(p.HEARTBEAT), 10, "heartbeats")
        t = task("rr-1", "shell", {"cmd": "echo once"})
        fake.run(t)
        first = fake.wait_result("rr-1")
        fake.run(t)
        fake.wait_for(lambda: len(fake.results("rr-1")) == 2, 3, "the result again")
        again = fake.results("rr-1")[1]
        assert again["log"] == b"once\n" and again["started_us"] == first["started_us"]
    finally:
        finish(worker)


def test_shutdown_waits_for_acks_but_not_forever(fakes: list[FakeScheduler]) -> None:
    fake = fakes[0]
    worker = WorkerProcess([fake.endpoint], "--ack-timeout", "0.5",
                           "--result-resend-interval", "0.2", *FAST)
    fake.wait_for(lambda: fake.messages(p.HEARTBEAT), 10, "heartbeats")
    fake.drop_results = 1000
    fake.run(task("ak-1", "shell", {"cmd": "echo unacked"}))
    fake.wait_result("ak-1")
    worker.proc.send_signal(signal.SIGINT)  # Ctrl-C drains like SIGTERM
    fake.wait_for(lambda: fake.messages(p.BYE), 5, "bye")
    assert len(fake.results("ak-1")) >= 2  # kept resending while it waited
    out = finish(worker)
    assert "event=results_unacknowledged count=1" in out
