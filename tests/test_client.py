"""The Python client against a fake scheduler cluster, and the protocol doc's golden vectors."""

from __future__ import annotations

import ast
import datetime as dt
import pathlib
import re
import socket
import threading
import time

import pytest

from dtask import protocol as p
from dtask.client import (
    BadRequest,
    Client,
    Conflict,
    DTaskError,
    TaskNotFound,
    TooLarge,
    Unavailable,
)

from .fake_scheduler import DROP, FakeScheduler

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


@pytest.fixture
def fake():
    f = FakeScheduler(1)
    yield f
    f.close()


@pytest.fixture
def cluster():
    f = FakeScheduler(3, leader=2)
    yield f
    f.close()


def client(fake: FakeScheduler, endpoints: list[str] | None = None, **kw) -> Client:
    kw.setdefault("timeout", 5.0)
    return Client(endpoints or fake.endpoints, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only_task(fake: FakeScheduler) -> dict:
    submits = fake.messages(p.SUBMIT)
    assert len(submits) == 1
    assert len(submits[0]["tasks"]) == 1
    return submits[0]["tasks"][0]


# -- golden vectors -----------------------------------------------------------------------

def golden() -> dict[str, tuple[dict, bytes]]:
    """name -> (the map shown in docs/protocol.md, the hex bytes shown under it)."""
    text = DOC.read_text()
    found = re.findall(r"`(\{[^`\n]*\})`\s*<!-- golden: (\w+) -->\s*```\n(.*?)```", text,
                       re.DOTALL)
    return {name: (ast.literal_eval(literal), bytes.fromhex(hexdump))
            for literal, name, hexdump in found}


def test_golden_vectors_in_the_doc_match_protocol_pack():
    vectors = golden()
    assert set(vectors) == {"submit", "submitted", "not_leader", "run"}
    for name, (msg, frame) in vectors.items():
        assert p.pack(msg) == frame, f"docs/protocol.md golden vector {name!r} is stale"
        assert p.unpack(frame) == msg
    assert p.error(1, p.NOT_LEADER, "not the leader",
                   leader="tcp://10.0.0.2:7300") == vectors["not_leader"][1]


def test_client_puts_the_golden_submit_frame_on_the_wire(fake):
    with client(fake) as c:
        c.submit("shell", {"cmd": "echo hi"}, priority=5, idempotency_key="k-1")
    assert fake.frames[0][1] == golden()["submit"][1]


# -- submitting -------------------------------------------------------------------------

def test_submit_returns_the_id_and_sends_a_generated_idempotency_key(fake):
    with client(fake) as c:
        first = c.submit("echo", {"n": 1})
        second = c.submit("echo", [1, "x"])
    assert first != second and set(fake.tasks) == {first, second}
    keys = [m["tasks"][0]["idempotency_key"] for m in fake.messages(p.SUBMIT)]
    assert all(keys) and keys[0] != keys[1]
    assert fake.tasks[first]["payload"] == b'{"n":1}'
    assert fake.tasks[first]["content_type"] == p.JSON


def test_options_are_encoded_as_the_protocol_says(fake):
    at = dt.datetime(2030, 1, 2, 3, 4, 5, 600000)  # naive: local time
    with client(fake) as c:
        c.submit("shell", b"\x00\xffraw", name="nightly", priority=-7, delay=2.5, timeout=30,
                 max_retries=5, backoff={"initial": 0.5, "max_delay": 60, "jitter": 0.2},
                 queue="gpu", labels=["linux", "cuda"], idempotency_key="key-1",
                 task_id="job-1")
    spec = only_task(fake)
    assert spec == {
        "type": "shell", "payload": b"\x00\xffraw", "content_type": p.BINARY,
        "name": "nightly", "priority": -7, "delay": 2.5, "timeout": 30,
        "retry": {"max_retries": 5, "initial": 0.5, "max_delay": 60, "jitter": 0.2},
        "queue": "gpu", "labels": ["linux", "cuda"], "idempotency_key": "key-1",
        "task_id": "job-1"}
    assert fake.tasks["job-1"]["status"] == p.SCHEDULED

    fake.received.clear()
    aware = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with client(fake) as c:
        c.submit("t", None, at=at, backoff=1.5, labels={"b", "a"})
        c.submit("t", "text", at=aware)
        c.submit("t", {"x": 1}, at=1_900_000_000.25, content_type="application/vnd.x+json")
    a, b, e = (m["tasks"][0] for m in fake.messages(p.SUBMIT))
    assert a["at_us"] == round(time.mktime(at.timetuple()) * 1e6) + 600000
    assert a["payload"] == b"null" and a["content_type"] == p.JSON
    assert a["retry"] == {"initial": 1.5} and a["labels"] == ["a", "b"]
    assert b["at_us"] == 1893546245 * 1_000_000 and b["payload"] == b'"text"'
    assert e["at_us"] == 1_900_000_000_250_000
    assert e["content_type"] == "application/vnd.x+json" and e["payload"] == b'{"x":1}'
    assert "delay" not in a and "priority" not in a  # unset options fall to server defaults


@pytest.mark.parametrize("call, exc, words", [
    (lambda c: c.submit("t", {1, 2}), TypeError, "JSON-serialisable"),
    (lambda c: c.submit("t", float("nan")), BadRequest, "JSON"),
    (lambda c: c.submit("t", b"x" * (p.MAX_PAYLOAD + 1)), TooLarge, "exceeds"),
    (lambda c: c.submit("t", 1, prioirty=3), TypeError, "prioirty"),
    (lambda c: c.submit("t", 1, delay=1, at=5), BadRequest, "not both"),
    (lambda c: c.submit("t", 1, delay=-1), BadRequest, "delay"),
    (lambda c: c.submit("t", 1, priority="high"), BadRequest, "priority"),
    (lambda c: c.submit("t", 1, priority=True), BadRequest, "priority"),
    (lambda c: c.submit("t", 1, labels="gpu"), BadRequest, "labels"),
    (lambda c: c.submit("t", 1, labels=["ok", "not ok"]), BadRequest, "label"),
    (lambda c: c.submit("t", 1, backoff={"initial": 1, "factor": 2}), BadRequest, "factor"),
    (lambda c: c.submit("t", 1, backoff={"multiplier": 0.5}), BadRequest, "multiplier"),
    (lambda c: c.submit("t", 1, max_retries=-1), BadRequest, "max_retries"),
    (lambda c: c.submit("t", 1, at="tomorrow"), BadRequest, "datetime"),
    (lambda c: c.submit("t", "x", content_type="text/plain"), BadRequest, "bytes payload"),
    (lambda c: c.submit("bad type!", 1), BadRequest, "type"),
    (lambda c: c.submit_many([{"type": "t"}, {"type": "t", "payload": object()}]),
     TypeError, "task 1"),
    (lambda c: c.status("no spaces allowed"), BadRequest, "task_id"),
    (lambda c: c.list(status="DONE"), BadRequest, "status"),
])
def test_invalid_input_is_refused_before_anything_is_sent(fake, call, exc, words):
    with client(fake) as c, pytest.raises(exc, match=words) as info:
        call(c)
    assert fake.received == []
    if isinstance(info.value, DTaskError):
        assert isinstance(info.value, ValueError)


def test_submit_many_is_one_round_trip_in_order(fake):
    tasks = [{"type": "echo", "payload": i, "priority": i % 3} for i in range(500)]
    tasks[7] = {"type": "blob", "payload": b"\x01", "idempotency_key": "mine"}
    with client(fake) as c:
        ids = c.submit_many(tasks)
        assert c.submit_many([]) == []
    assert len(fake.messages(p.SUBMIT)) == 1
    assert ids == list(fake.tasks)
    assert fake.tasks[ids[3]]["payload"] == b"3" and fake.tasks[ids[5]]["priority"] == 2
    assert fake.tasks[ids[7]]["idempotency_key"] == "mine"
    assert len({t["idempotency_key"] for t in fake.tasks.values()}) == 500


def test_submit_many_splits_batches_over_the_protocol_limit(fake):
    with client(fake) as c:
        ids = c.submit_many([{"type": "t", "payload": b""}] * (p.MAX_BATCH + 5))
    assert [len(m["tasks"]) for m in fake.messages(p.SUBMIT)] == [p.MAX_BATCH, 5]
    assert len(set(ids)) == p.MAX_BATCH + 5


def test_a_thousand_async_submits_in_flight_at_once(fake):
    fake.hold = True  # no reply until every request has arrived: all are in flight
    with client(fake) as c:
        futures = [c.submit_async("echo", {"i": i}) for i in range(1000)]
        deadline = time.monotonic() + 5
        while (sum(len(m["tasks"]) for m in fake.messages(p.SUBMIT)) < 1000
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert not any(f.done() for f in futures)
        fake.release()
        ids = [f.result(timeout=5) for f in futures]
    assert fake.max_held == len(fake.messages(p.SUBMIT))  # every message was in flight
    assert len(set(ids)) == 1000
    assert [fake.tasks[i]["payload"] for i in ids[:3]] == [b'{"i":0}', b'{"i":1}', b'{"i":2}']


def _stall_io_thread(c: Client, seconds: float) -> None:
    """Keep the client's I/O thread busy (in a future callback) for a while."""
    first = c.submit_async("t", "first")
    first.add_done_callback(lambda _: time.sleep(seconds))
    first.result(timeout=5)


def test_async_submits_queued_together_share_one_message(fake, monkeypatch):
    monkeypatch.setattr("dtask.client._COALESCE_TASKS", 20)
    with client(fake) as c:
        _stall_io_thread(c, 0.5)
        futures = [c.submit_async("t", {"i": i}, priority=i % 3) for i in range(50)]
        ids = [f.result(timeout=5) for f in futures]
        status = c.status(ids[7])
    sizes = [len(m["tasks"]) for m in fake.messages(p.SUBMIT)]
    assert sizes == [1, 20, 20, 10]  # the stalled thread found 50 waiting: joined, capped
    assert len(set(ids)) == 50 and status["payload"] == b'{"i":7}'
    # each future got its own task's id, options intact
    assert [fake.tasks[i]["payload"] for i in ids] == [f'{{"i":{i}}}'.encode() for i in range(50)]
    assert [fake.tasks[i]["priority"] for i in ids] == [i % 3 for i in range(50)]
    assert len({fake.tasks[i]["idempotency_key"] for i in ids}) == 50


def test_a_refused_shared_submit_is_retried_task_by_task(fake):
    def refuse_big(node, msg):  # as a scheduler with a 100-byte payload limit would
        if msg["t"] == p.SUBMIT and any(len(t["payload"]) > 100 for t in msg["tasks"]):
            return p.error(msg["id"], p.TOO_LARGE, "payload over 100 bytes")
        return None
    fake.hook = refuse_big
    with client(fake) as c:
        _stall_io_thread(c, 0.5)
        futures = [c.submit_async("t", "x" * (200 if i == 3 else 10)) for i in range(6)]
        with pytest.raises(TooLarge, match="over 100 bytes"):
            futures[3].result(timeout=5)
        ids = [f.result(timeout=5) for i, f in enumerate(futures) if i != 3]
    sizes = [len(m["tasks"]) for m in fake.messages(p.SUBMIT)]
    assert sizes == [1, 6, 1, 1, 1, 1, 1, 1]  # refused together, then one by one
    assert len(set(ids)) == 5 and len(fake.tasks) == 1 + 5


def test_max_in_flight_blocks_the_caller(fake):
    fake.hold = True
    with client(fake, max_in_flight=4) as c:
        futures = [c.submit_async("t", i) for i in range(4)]
        fifth: list = []
        t = threading.Thread(target=lambda: fifth.append(c.submit_async("t", 4)))
        t.start()
        t.join(0.3)
        sent = sum(len(m["tasks"]) for m in fake.messages(p.SUBMIT))
        assert t.is_alive() and sent == 4  # blocked, not sent
        fake.release()
        t.join(5)
        assert not t.is_alive()
        assert fifth[0].result(timeout=5) and all(f.result(timeout=5) for f in futures)


# -- finding the leader, retrying --------------------------------------------------------

def test_not_leader_redirects_to_the_named_leader(cluster):
    # The fake names the leader as "localhost"; the client knows it as 127.0.0.1.
    cluster.advertised[2] = cluster.endpoints[2].replace("127.0.0.1", "LOCALHOST")
    with client(cluster) as c:
        task_id = c.submit("echo", 1)
        assert [n for n, _ in cluster.received] == [0, 2]  # straight there, not via node 1
        assert c.leader == cluster.endpoints[2]
        assert c.status(task_id)["id"] == task_id
    assert [n for n, _ in cluster.received] == [0, 2, 2]  # the leader is remembered


def test_not_leader_without_a_usable_hint_tries_the_next_endpoint(cluster):
    cluster.advertised[2] = "tcp://10.9.9.9:1"  # not one of the client's endpoints
    with client(cluster) as c:
        c.submit("echo", 1)
    assert [n for n, _ in cluster.received] == [0, 1, 2]


def test_a_silent_endpoint_is_skipped_after_the_attempt_timeout(cluster):
    cluster.silent.add(0)
    with client(cluster, timeout=5, attempt_timeout=0.2) as c:
        task_id = c.submit("echo", 1)
    sent = cluster.messages(p.SUBMIT)
    assert [n for n, _ in cluster.received][:2] == [0, 1]
    assert task_id in cluster.tasks
    assert len({m["tasks"][0]["idempotency_key"] for m in sent}) == 1


def test_an_endpoint_with_nothing_listening_is_skipped_at_once(fake):
    dead = f"tcp://127.0.0.1:{free_port()}"
    with client(fake, [dead, fake.endpoints[0]], attempt_timeout=10) as c:
        t0 = time.monotonic()
        c.submit("echo", 1)
        assert time.monotonic() - t0 < 5  # well under the 10 s attempt timeout


def test_a_leader_that_disconnects_mid_request_is_left_at_once(cluster):
    cluster.leader = 0
    cluster.hook = lambda node, msg: DROP if node == 0 else None  # 0 swallows requests
    with client(cluster, timeout=30, attempt_timeout=20) as c:
        future = c.submit_async("echo", 1)
        deadline = time.monotonic() + 5
        while not cluster.messages(p.SUBMIT) and time.monotonic() < deadline:
            time.sleep(0.01)
        cluster.leader = 2
        cluster.kill(0)  # node 0 dies with the request
        t0 = time.monotonic()
        assert future.result(timeout=10) in cluster.tasks
        assert time.monotonic() - t0 < 10  # well under the 20 s attempt timeout


def test_a_reply_from_an_endpoint_no_longer_polled_still_arrives_promptly(cluster):
    """The I/O thread polls only the believed leader's sockets; the others are swept
    while requests are outstanding, so an answer from the old leader to a request sent
    before the leader changed lands within milliseconds, not at the attempt timeout."""
    cluster.leader = 0
    held: list[dict] = []  # the first submit node 0 gets: answered by the test, later

    def hold_first(node: int, msg: dict) -> object:
        if node == 0 and msg["t"] == p.SUBMIT and not held:
            held.append(msg)
            return DROP
        return None

    cluster.hook = hold_first
    idents: list[bytes] = []  # who sent what (to address the late answer)
    handle = cluster._handle
    cluster._handle = lambda node, ident, frames: (idents.append(ident),
                                                   handle(node, ident, frames))[1]
    with client(cluster, timeout=30, attempt_timeout=10) as c:
        first = c.submit_async("echo", 1)
        deadline = time.monotonic() + 5
        while not held:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cluster.leader = 2
        c.submit("echo", 2)  # NOT_LEADER from node 0 names node 2: now the one polled
        assert c.leader == cluster.endpoints[2]
        msg = held[0]
        cluster.call(lambda: cluster._send(
            0, idents[0], cluster._on_submit(0, idents[0], msg["id"], msg)))
        t0 = time.monotonic()
        task_id = first.result(timeout=5)  # the attempt timeout (10 s) would resend it
        assert time.monotonic() - t0 < 1.0
        assert task_id in cluster.tasks and c.late_replies == 0
    assert [n for n, m in cluster.received if m["t"] == p.SUBMIT] == [0, 0, 2]


def test_a_lost_reply_is_retried_with_the_same_idempotency_key(fake):
    fake.drop_replies = 1  # the task is created, but its acknowledgement is lost
    with client(fake, attempt_timeout=0.2) as c:
        task_id = c.submit("echo", {"a": 1})
    first, second = fake.messages(p.SUBMIT)
    assert first == second  # the identical request, idempotency key included
    assert first["tasks"][0]["idempotency_key"]
    assert list(fake.tasks) == [task_id]  # no duplicate task


def test_unavailable_is_retried_until_it_passes(fake):
    replies = iter([p.UNAVAILABLE, p.UNAVAILABLE])

    def hook(node, msg):
        code = next(replies, None)
        return code and {"v": 1, "t": "error", "id": msg["id"], "code": code,
                         "message": "no quorum"}
    fake.hook = hook
    with client(fake) as c:
        assert c.submit("echo", 1) in fake.tasks
    assert len(fake.messages(p.SUBMIT)) == 3


def test_unavailable_after_the_overall_timeout_when_nothing_answers(cluster):
    cluster.silent.update({0, 1, 2})
    with client(cluster, timeout=0.6, attempt_timeout=0.1) as c:
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as info:
            c.submit("echo", 1)
        elapsed = time.monotonic() - t0
    assert info.value.code == p.UNAVAILABLE and "no reply" in info.value.message
    assert 0.5 < elapsed < 5
    assert {n for n, _ in cluster.received} == {0, 1, 2}  # it toured every endpoint


def test_unavailable_when_no_node_is_leader(cluster):
    cluster.leader = None  # every node says NOT_LEADER with no hint: an election
    with client(cluster, timeout=0.5) as c:
        assert c.cluster()["leader"] == ""  # any node answers cluster, leader or not
        with pytest.raises(Unavailable, match="NOT_LEADER"):
            c.submit("echo", 1)


@pytest.mark.parametrize("code, exc", [
    (p.NOT_FOUND, TaskNotFound), (p.CONFLICT, Conflict), (p.BAD_REQUEST, BadRequest),
    (p.TOO_LARGE, TooLarge), (p.INTERNAL, DTaskError), (p.VERSION_MISMATCH, DTaskError),
])
def test_error_codes_map_to_exceptions(fake, code, exc):
    fake.hook = lambda node, msg: {"v": 1, "t": "error", "id": msg["id"], "code": code,
                                   "message": "said the fake"}
    with client(fake) as c, pytest.raises(exc) as info:
        c.submit("echo", 1)
    assert type(info.value) is exc
    assert (info.value.code, info.value.message) == (code, "said the fake")
    assert len(fake.messages()) == 1  # final errors are not retried


# -- reading -----------------------------------------------------------------------------

def test_status_wait_cancel_logs_list_and_cluster(cluster):
    with client(cluster) as c:
        ids = c.submit_many([{"type": "a" if i % 2 else "b", "payload": i} for i in range(8)])
        status = c.status(ids[0])
        assert (status["id"], status["status"], status["attempts"]) == (ids[0], p.PENDING, [])
        with pytest.raises(TaskNotFound):
            c.status("nope")

        box: list[dict] = []
        waiter = threading.Thread(target=lambda: box.append(c.wait(ids[1], timeout=5)))
        waiter.start()
        deadline = time.monotonic() + 5
        while not cluster.messages(p.WAIT) and time.monotonic() < deadline:
            time.sleep(0.01)
        extra = c.submit("x")  # the wait is parked on the scheduler; others still flow
        assert waiter.is_alive()
        cluster.complete(ids[1])
        waiter.join(5)
        assert box[0]["status"] == p.COMPLETED
        with pytest.raises(TimeoutError):
            c.wait(ids[2], timeout=0.2)

        assert c.cancel(ids[3])["status"] == p.CANCELLED
        assert c.cancel(ids[3])["status"] == p.CANCELLED  # idempotent
        with pytest.raises(Conflict):
            c.cancel(ids[1])

        cluster.logs[ids[1]] = b"line one\nline two\n"  # served 4 bytes at a time
        assert c.logs(ids[1]) == b"line one\nline two\n"
        cluster.logs[ids[4]] = b"partial"  # still running: what there is so far
        assert c.logs(ids[4]) == b"partial"

        assert [t["id"] for t in c.list()] == ids + [extra]  # the fake sends pages of 3
        assert [t["id"] for t in c.list(type="a", limit=3)] == ids[1:7:2]
        assert [t["id"] for t in c.list(status=["cancelled", "COMPLETED"])] == ids[1:4:2]
        assert c.list(since=time.time() + 3600) == []
        assert "payload" not in c.list(limit=1)[0]

        info = c.cluster()
        assert info["leader"] == cluster.endpoints[2] and info["node"]["role"] == "leader"
    logs_reqs = cluster.messages(p.LOGS)
    assert [m["offset"] for m in logs_reqs][:5] == [0, 4, 8, 12, 16]


def test_a_stale_status_is_answered_by_any_node(cluster):
    with client(cluster) as c:
        task_id = c.submit("echo", 1)
    cluster.received.clear()
    with client(cluster, [cluster.endpoints[1]]) as c:  # a client that only knows node 1
        assert c.status(task_id, stale=True)["id"] == task_id
        with Client([cluster.endpoints[1]], timeout=0.3) as strict, \
                pytest.raises(Unavailable):
            strict.status(task_id)  # a linearizable read needs the leader
    assert cluster.received[0] == (1, {"v": 1, "t": "status", "id": 1, "task_id": task_id,
                                       "stale": True})


# -- threads and lifetime ----------------------------------------------------------------

def test_many_threads_share_one_client(fake):
    results: list[tuple[int, int, str]] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(100):
                if i % 2:
                    task_id = c.submit("echo", {"t": n, "i": i})
                else:
                    task_id = c.submit_async("echo", {"t": n, "i": i}).result()
                results.append((n, i, task_id))
        except BaseException as exc:
            errors.append(exc)

    with client(fake, max_in_flight=16) as c:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
    assert errors == []
    assert len({task_id for _, _, task_id in results}) == 800
    for n, i, task_id in results:  # each reply reached the thread that asked
        assert fake.tasks[task_id]["payload"] == b'{"t":%d,"i":%d}' % (n, i)


def test_close_fails_outstanding_requests_and_releases_everything(fake):
    fake.silent.add(0)
    before = {t.name for t in threading.enumerate()}
    c = client(fake, timeout=30)
    future = c.submit_async("echo", 1)
    io = c._thread
    assert io.is_alive()
    c.close()
    assert not io.is_alive() and c._ctx.closed
    with pytest.raises(DTaskError) as info:
        future.result(timeout=1)
    assert info.value.code == "CLOSED"
    with pytest.raises(DTaskError, match="closed"):
        c.submit("echo", 1)
    c.close()  # twice is fine
    assert {t.name for t in threading.enumerate()} <= before


def test_close_from_a_callback_releases_everything(fake):
    c = client(fake)
    io = c._thread
    c.submit_async("echo", 1).add_done_callback(lambda _f: c.close())
    io.join(5)
    assert not io.is_alive() and c._ctx.closed


def test_blocking_calls_from_a_callback_raise_instead_of_deadlocking(fake):
    seen: list[BaseException] = []
    done = threading.Event()

    def callback(_f) -> None:
        try:
            c.status("t000001")
        except RuntimeError as exc:
            seen.append(exc)
        done.set()

    with client(fake) as c:
        c.submit_async("echo", 1).add_done_callback(callback)
        assert done.wait(5)
    assert seen and "callback" in str(seen[0])


def test_endpoints_are_parsed_and_checked():
    c = Client(" tcp://127.0.0.1:1 ,tcp://127.0.0.1:2,,tcp://LOCALHOST:1", timeout=1)
    try:
        assert c.endpoints == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    finally:
        c.close()
    for bad in ("", "127.0.0.1:1", ["tcp://a:1", 5]):
        with pytest.raises(ValueError):
            Client(bad)
    with pytest.raises(ValueError):
        Client("tcp://127.0.0.1:1", timeout=0)
