"""The scheduler end to end: 3 scheduler processes, real workers, the real client."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from dtask import protocol as p
from dtask.broker.localcluster import SchedulerCluster
from dtask.client import Client, Unavailable

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    c = SchedulerCluster(str(tmp_path), size=3, worker_timeout=1.5)
    c.start_all()
    c.wait_leader()
    yield c
    c.stop_all()


@pytest.fixture
def client(cluster):
    with Client(cluster.endpoints, timeout=15) as c:
        yield c


def wait_all(client, ids, timeout=60.0) -> list[dict]:
    return [client.wait(i, timeout=timeout) for i in ids]


def wait_running(client, task_id: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while client.status(task_id)["status"] != p.RUNNING:
        assert time.monotonic() < deadline, f"{task_id} never started"
        time.sleep(0.05)


def started(task: dict, attempt: int = 1) -> float:
    return task["attempts"][attempt - 1]["started_us"] / 1e6


def test_shell_and_python_tasks_complete(cluster, client):
    cluster.start_worker("w1", 2, "--import", "tests.tasks")
    sh = client.submit("shell", {"cmd": "echo hello; echo oops >&2"})
    py = client.submit("python", {"fn": "tests.tasks:add", "args": [2, 3]})
    t_sh, t_py = wait_all(client, [sh, py])
    assert t_sh["status"] == p.COMPLETED and t_py["status"] == p.COMPLETED
    assert b"hello" in client.logs(sh) and b"oops" in client.logs(sh)
    assert t_py["attempts"][0]["result"]  # msgpack of 5
    import msgpack
    assert msgpack.unpackb(t_py["attempts"][0]["result"]) == 5


def test_priorities_are_honoured_when_workers_are_saturated(cluster, client):
    blocker = client.submit("shell", {"cmd": "sleep 1"})
    ids = {prio: client.submit("shell", {"cmd": "true"}, priority=prio) for prio in (1, 5, 3, 9)}
    cluster.start_worker("w1", 1)  # one slot: the blocker runs first, the rest queue
    wait_all(client, [blocker, *ids.values()])
    order = sorted(ids, key=lambda prio: started(client.status(ids[prio])))
    assert order == [9, 5, 3, 1]


def test_an_idle_worker_gets_a_new_task_before_its_submit_commits(cluster, client):
    """Leased early (behind its SUBMIT in the log): it runs once and completes."""
    cluster.start_worker("w1", 1)
    client.wait(client.submit("shell", {"cmd": "true"}), timeout=30)  # w1 registered
    leader = cluster.wait_leader()
    before = cluster.node_info(leader)["dispatch"]["early_leases"]
    ids, tasks = [], []
    for _ in range(5):  # one at a time: the worker is idle at each submit
        ids.append(client.submit("shell", {"cmd": "echo run-$0"}))
        tasks.append(client.wait(ids[-1], timeout=30))
    assert [t["status"] for t in tasks] == [p.COMPLETED] * 5
    assert [len(t["attempts"]) for t in tasks] == [1] * 5
    assert cluster.node_info(leader)["dispatch"]["early_leases"] - before == 5
    assert all(b"run-" in client.logs(i) for i in ids)


def test_delayed_task_starts_at_its_time_not_before(cluster, client):
    cluster.start_worker("w1", 2)
    before = time.time()
    tid = client.submit("shell", {"cmd": "true"}, delay=1.5)
    assert client.status(tid)["status"] == p.SCHEDULED
    task = client.wait(tid, timeout=30)
    assert task["status"] == p.COMPLETED
    assert started(task) >= before + 1.5


def test_retries_follow_the_backoff_policy(cluster, client):
    cluster.start_worker("w1", 2)
    tid = client.submit("shell", {"cmd": "exit 3"}, max_retries=2,
                        backoff={"initial": 0.4, "multiplier": 2.0, "jitter": 0})
    task = client.wait(tid, timeout=30)
    assert task["status"] == p.FAILED
    attempts = task["attempts"]
    assert [a["outcome"] for a in attempts] == [p.ERRORED] * 3
    assert [a["exit_code"] for a in attempts] == [3, 3, 3]
    gap1 = attempts[1]["started_us"] - attempts[0]["finished_us"]
    gap2 = attempts[2]["started_us"] - attempts[1]["finished_us"]
    assert gap1 >= 0.4e6 and gap2 >= 0.8e6


def test_cancel_pending_and_running_tasks(cluster, client):
    pending = client.submit("shell", {"cmd": "true"})
    assert client.cancel(pending)["status"] == p.CANCELLED
    cluster.start_worker("w1", 2)
    running = client.submit("shell", {"cmd": "sleep 30"})
    wait_running(client, running)
    client.cancel(running)
    task = client.wait(running, timeout=15)
    assert task["status"] == p.CANCELLED
    assert task["attempts"][-1]["outcome"] == p.KILLED
    time.sleep(0.5)  # give a wrongly-dispatched cancelled task time to show up
    assert client.status(pending)["attempts"] == []


def test_worker_sigkill_mid_task_reruns_elsewhere(cluster, client):
    w1 = cluster.start_worker("w1", 1)
    tid = client.submit("shell", {"cmd": "sleep 1.5"})
    wait_running(client, tid)
    assert client.status(tid)["attempts"][0]["worker"] == "w1"
    w1.send_signal(signal.SIGKILL)
    cluster.start_worker("w2", 1)
    task = client.wait(tid, timeout=30)
    assert task["status"] == p.COMPLETED
    assert [a["worker"] for a in task["attempts"]] == ["w1", "w2"]
    assert task["attempts"][0]["outcome"] == p.LOST


def test_prefetched_tasks_of_a_sigkilled_worker_run_elsewhere(cluster, client):
    """A worker whose tasks are quick takes tasks beyond its slot (prefetch); killed
    with them still waiting, it loses none: their leases expire and they rerun."""
    w1 = cluster.start_worker("w1", 1, "--import", "tests.tasks")
    quick = {"type": "python", "payload": {"fn": "tests.tasks:noop"}}
    wait_all(client, client.submit_many([quick] * 20))  # w1 learns its tasks are quick
    # one call: the leader pushes all six at once, the long one first (priority)
    long, *queued = client.submit_many(
        [{"type": "shell", "payload": {"cmd": "sleep 30"}, "priority": 5}] + [quick] * 5)
    deadline = time.monotonic() + 15
    while any(client.status(t)["status"] != p.RUNNING for t in [long, *queued]):
        assert time.monotonic() < deadline, "w1 never held all six (one running, five waiting)"
        time.sleep(0.02)
    w1.send_signal(signal.SIGKILL)
    cluster.start_worker("w2", 1, "--import", "tests.tasks")
    client.cancel(long)  # no need to wait 30 s for it on w2
    for task in wait_all(client, queued):
        assert task["status"] == p.COMPLETED
        assert [(a["worker"], a["outcome"]) for a in task["attempts"]] == [
            ("w1", p.LOST), ("w2", p.SUCCEEDED)]


def test_a_worker_running_an_attempt_the_leader_does_not_know_is_told_not_leased(cluster,
                                                                                client):
    """On registration the leader kills attempts its state does not give the worker
    (e.g. pushed by a dead leader before their lease committed) with reason
    not_leased, so that the worker's report of it cannot read as a cancel."""
    import zmq

    known = client.submit("shell", {"cmd": "true"})  # PENDING: no worker yet
    leader = cluster.wait_leader()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.members[leader].client)
    try:
        sock.send(p.pack({"v": p.VERSION, "t": p.REGISTER, "id": 1, "worker_id": "raw-w",
                          "host": "h", "pid": 1, "concurrency": 1, "queues": ["nowhere"],
                          "labels": [], "executors": ["shell"], "credits": 0,
                          "running": [[known, 1], ["no-such-task", 3]]}))
        kills = []
        deadline = time.monotonic() + 10
        while len(kills) < 2:
            assert time.monotonic() < deadline, f"kills so far: {kills}"
            if sock.poll(500):
                msg = p.unpack(sock.recv())
                if msg["t"] == p.KILL:
                    kills.append((msg["task_id"], msg["attempt"], msg.get("reason")))
        assert sorted(kills) == sorted([(known, 1, p.NOT_LEASED),
                                        ("no-such-task", 3, p.NOT_LEASED)])
    finally:
        sock.close()
        ctx.term()
    assert client.status(known)["status"] == p.PENDING  # nothing ran, nothing cancelled


def test_a_results_batch_is_taken_whole_or_refused_whole(cluster, client):
    """`results` (several results in one message): one malformed result refuses the
    whole message and nothing is recorded; a good batch gets one `results_ack` naming
    every attempt, with a repeat inside the batch acked as stale."""
    import zmq

    leader = cluster.wait_leader()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.members[leader].client)

    def answer(rid: int) -> dict:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sock.poll(200):
                msg = p.unpack(sock.recv())
                if msg.get("id") == rid:
                    return msg
        raise AssertionError(f"no answer to request {rid}")

    try:
        sock.send(p.pack({"v": p.VERSION, "t": p.REGISTER, "id": 1, "worker_id": "raw-b",
                          "host": "h", "pid": 1, "concurrency": 2, "queues": ["rawq"],
                          "labels": [], "executors": ["shell"], "credits": 2,
                          "running": []}))
        assert answer(1)["batch_results"] is True
        a, b = client.submit_many([{"type": "shell", "payload": {"cmd": "true"},
                                    "queue": "rawq"}] * 2)
        pushed: set[str] = set()
        deadline = time.monotonic() + 10
        while pushed != {a, b}:
            assert time.monotonic() < deadline, f"pushed so far: {pushed}"
            if sock.poll(200):
                msg = p.unpack(sock.recv())
                if msg["t"] == p.RUN:
                    pushed |= {t["task_id"] for t in msg["tasks"]}
        now = time.time_ns() // 1000

        def result(task_id: str, **change) -> dict:
            return {"task_id": task_id, "attempt": 1, "outcome": p.SUCCEEDED, "exit_code": 0,
                    "error": "", "result": b"", "log": f"log of {task_id}".encode(),
                    "started_us": now, "finished_us": now, **change}

        def send_results(rid: int, results: list) -> dict:
            sock.send(p.pack({"v": p.VERSION, "t": p.RESULTS, "id": rid, "worker_id": "raw-b",
                              "results": results, "credits": 2}))
            return answer(rid)

        refused = send_results(7, [result(a), result(b, exit_code="zero")])
        assert refused["t"] == p.ERROR and refused["code"] == p.BAD_REQUEST
        assert send_results(8, [])["code"] == p.BAD_REQUEST
        assert [client.status(t)["status"] for t in (a, b)] == [p.RUNNING, p.RUNNING]
        acked = send_results(9, [result(a), result(b), result(a)])
        assert acked["t"] == p.RESULTS_ACK
        assert acked["acks"] == [[a, 1, True], [b, 1, True], [a, 1, False]]
    finally:
        sock.close()
        ctx.term()
    for task_id in (a, b):
        task = client.status(task_id)
        assert task["status"] == p.COMPLETED and len(task["attempts"]) == 1
        assert client.logs(task_id) == f"log of {task_id}".encode()


def test_leader_sigkill_during_a_submit_stream_loses_nothing(cluster, client):
    """10,000 tasks submitted in batches with idempotency keys while the leader dies:
    every acknowledged task completes, and no key yields two tasks."""
    cluster.start_worker("w1", 2, "--import", "tests.tasks")
    cluster.start_worker("w2", 2, "--import", "tests.tasks")
    leader = cluster.wait_leader()
    acked: dict[str, str] = {}
    killer = threading.Timer(0.01, cluster.kill, [leader])
    for batch in range(100):
        if batch == 30:
            killer.start()  # dies while the next batches are in flight
        tasks = [{"type": "python", "payload": {"fn": "tests.tasks:noop"},
                  "idempotency_key": f"key-{batch}-{i}"} for i in range(100)]
        for attempt in range(3):
            try:
                ids = client.submit_many(tasks)
                break
            except Unavailable:
                if attempt == 2:
                    raise
        acked.update(zip((t["idempotency_key"] for t in tasks), ids, strict=True))
    killer.join()
    assert not cluster.alive(leader)
    assert len(acked) == 10_000 and len(set(acked.values())) == 10_000
    deadline = time.monotonic() + 120
    while True:
        done = client.list(status=[p.COMPLETED], limit=20_000)
        if len(done) >= 10_000 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    everything = client.list(limit=20_000)
    assert len(everything) == 10_000  # no duplicates from retried batches
    assert {t["id"] for t in done} == set(acked.values())


def test_results_held_across_a_leader_sigkill_land_exactly_once(cluster, client):
    """Workers finish tasks while the leader is dead; they keep their results and
    report them to the new leader: each task completes with exactly one attempt."""
    cluster.start_worker("w1", 4)
    cluster.start_worker("w2", 4)
    ids = [client.submit("shell", {"cmd": "sleep 1.2; echo done-$0"}) for _ in range(8)]
    deadline = time.monotonic() + 15
    while any(client.status(i)["status"] != p.RUNNING for i in ids):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    leader = cluster.wait_leader()
    follower = next(i for i in cluster.members if i != leader)
    cluster.kill(leader)  # every lease is committed; now take the quorum away too
    cluster.kill(follower)
    time.sleep(2.0)  # the runs finish while no leader exists: workers hold the results
    cluster.start(follower)
    tasks = wait_all(client, ids, timeout=60)
    assert [t["status"] for t in tasks] == [p.COMPLETED] * 8
    assert [len(t["attempts"]) for t in tasks] == [1] * 8  # no rerun, no double count
    assert all(b"done" in client.logs(i) for i in ids)


def test_drain_lets_running_tasks_finish_then_the_worker_leaves(cluster, client):
    w1 = cluster.start_worker("w1", 2)
    running = client.submit("shell", {"cmd": "sleep 1; echo finished"})
    wait_running(client, running)
    client.drain_worker("w1")
    later = client.submit("shell", {"cmd": "true"})  # must not go to the draining worker
    assert w1.wait(timeout=30) == 0  # it finished, reported, said bye and exited cleanly
    task = client.wait(running, timeout=10)
    assert task["status"] == p.COMPLETED and len(task["attempts"]) == 1
    assert client.status(later)["attempts"] == []
    workers = client.cluster().get("workers", [])
    assert all(w["id"] != "w1" for w in workers)
    cluster.start_worker("w2", 1)
    assert client.wait(later, timeout=15)["status"] == p.COMPLETED


def test_rolling_restart_under_a_stream_of_submissions(cluster, client):
    """SIGTERM each scheduler in turn (a leader hands over first) and start it again,
    while a client keeps submitting: no submission fails after the client's retries,
    and every acknowledged task completes."""
    cluster.start_worker("w1", 4)
    acked: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def submit_stream() -> None:
        i = 0
        while not stop.is_set():
            try:
                acked.append(client.submit("shell", {"cmd": "true"},
                                           idempotency_key=f"rolling-{i}"))
                i += 1
            except BaseException as exc:  # any failure is a finding
                errors.append(exc)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=submit_stream)
    thread.start()
    try:
        for node_id in cluster.members:
            time.sleep(0.5)
            cluster.kill(node_id, signal.SIGTERM)
            assert cluster.members[node_id].proc.returncode == 0
            cluster.start(node_id)
            cluster.wait_leader()
    finally:
        time.sleep(0.5)
        stop.set()
        thread.join(30)
    assert errors == []
    assert len(acked) > 100 and len(set(acked)) == len(acked)
    tasks = wait_all(client, acked, timeout=60)
    assert {t["status"] for t in tasks} == {p.COMPLETED}


def test_transfer_leader_on_request_keeps_serving(cluster, client):
    leader = cluster.wait_leader()
    target = next(i for i in cluster.members if i != leader)
    assert client.transfer_leader(target) == target
    assert cluster.wait_leader(exclude=leader, timeout=5) == target
    task_id = client.submit("shell", {"cmd": "true"})  # the client follows by itself
    assert client.status(task_id)["status"] == p.PENDING
    from dtask.client import BadRequest
    with pytest.raises(BadRequest):
        client.transfer_leader(99)  # not a voter
