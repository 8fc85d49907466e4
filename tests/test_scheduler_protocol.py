"""Hostile and malformed input against a live scheduler: errors, never a crash."""

from __future__ import annotations

import json

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtask import protocol as p
from dtask.broker.localcluster import SchedulerCluster, request

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    c = SchedulerCluster(str(tmp_path_factory.mktemp("proto")), size=1)
    c.start_all()
    c.wait_leader()
    yield c
    c.stop_all()


@pytest.fixture(scope="module")
def sock(single):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(single.members[1].client)
    yield s
    s.close(0)


def ask(sock, frame: bytes, timeout_ms: int = 2000) -> dict | None:
    sock.send(frame)
    if not sock.poll(timeout_ms):
        return None
    return msgpack.unpackb(sock.recv(), strict_map_key=False)


def submit_one(ep: str, **task) -> dict:
    task.setdefault("type", "shell")
    task.setdefault("payload", json.dumps({"cmd": "true"}).encode())
    return request(ep, {"t": p.SUBMIT, "tasks": [task]}, timeout=5)


BAD = [
    (b"", p.BAD_REQUEST),
    (b"\xc1", p.BAD_REQUEST),
    (msgpack.packb([1, 2, 3]), p.BAD_REQUEST),
    (msgpack.packb({"v": 99, "t": "submit", "id": 1}), p.VERSION_MISMATCH),
    (msgpack.packb({"v": 1, "t": 5, "id": 1}), p.BAD_REQUEST),
    (msgpack.packb({"v": 1, "t": "nope", "id": 1}), p.BAD_REQUEST),
    (msgpack.packb({"v": 1, "t": "submit", "id": 1}), p.BAD_REQUEST),
    (msgpack.packb({"v": 1, "t": "submit", "id": 1, "tasks": [{"type": 7}]}), p.BAD_REQUEST),
    (msgpack.packb({"v": 1, "t": "submit", "id": 1, "tasks": [{"type": "x", "priority": "hi"}]}),
     p.BAD_REQUEST),
    (msgpack.packb({"v": 1, "t": "status", "id": 1, "task_id": "no/such"}), p.NOT_FOUND),
    (msgpack.packb({"v": 1, "t": "status", "id": 1, "task_id": 12}), p.BAD_REQUEST),
    (msgpack.packb({"v": 1, "t": "heartbeat", "id": 1, "worker_id": "ghost", "credits": 1}),
     p.UNKNOWN_WORKER),
    (msgpack.packb({"v": 1, "t": "list", "id": 1, "status": ["WHATEVER"]}), p.BAD_REQUEST),
]


@pytest.mark.parametrize(("frame", "code"), BAD)
def test_bad_requests_get_a_coded_error(sock, frame, code):
    reply = ask(sock, frame)
    assert reply is not None and reply["t"] == p.ERROR and reply["code"] == code
    assert reply["message"]


def test_oversized_payload_is_refused_with_too_large(single):
    ep = single.members[1].client
    reply = submit_one(ep, payload=b"x" * (p.MAX_PAYLOAD + 1))
    assert reply["code"] == p.TOO_LARGE and "exceeds" in reply["message"]
    assert submit_one(ep)["t"] == p.SUBMITTED  # and nothing else is disturbed


def test_error_reply_carries_the_request_id(sock):
    reply = ask(sock, msgpack.packb({"v": 1, "t": "status", "id": "req-42", "task_id": "zz"}))
    assert reply["id"] == "req-42"


def test_multipart_garbage_is_dropped_and_counted(single, sock):
    before = single.node_info(1)["bad_requests"]
    sock.send_multipart([b"a", b"b", b"c"])
    after = single.node_info(1)["bad_requests"]
    assert after == before + 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
messages = st.fixed_dictionaries(
    {"v": st.just(1), "id": st.integers(0, 1000),
     "t": st.sampled_from(sorted(p.CLIENT_TYPES | p.WORKER_TYPES) + ["x"])},
    optional={"tasks": json_values, "task_id": json_values, "worker_id": json_values,
              "credits": json_values, "status": json_values, "timeout": json_values,
              "limit": json_values, "attempt": json_values, "outcome": json_values,
              "running": json_values, "concurrency": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(msg=messages)
def test_generated_messages_never_break_the_scheduler(single, sock, msg):
    if msg["t"] == p.WAIT:
        msg["timeout"] = 0  # keep waits short
    sock.send(msgpack.packb(msg, use_bin_type=True))
    # A reply, if any, must be a well-formed protocol message.
    while sock.poll(50):
        reply = msgpack.unpackb(sock.recv(), strict_map_key=False)
        assert reply["v"] == p.VERSION and isinstance(reply["t"], str)


def test_still_serving_after_the_fuzzing(single):
    assert single.alive(1)
    reply = submit_one(single.members[1].client)
    assert reply["t"] == p.SUBMITTED
    status = request(single.members[1].client, {"t": p.STATUS, "task_id": reply["task_ids"][0]})
    assert status["task"]["status"] == p.PENDING
