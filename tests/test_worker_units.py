"""Unit tests for the worker's pure pieces: log bounds, docker argv, payload checks,
the @task registry, the outbox and the configuration."""

from __future__ import annotations

import pytest

from dtask import protocol as p
from dtask.worker.config import WorkerConfig
from dtask.worker.executors import Context, TaskError, build
from dtask.worker.executors.docker import build_argv, container_name
from dtask.worker.logbuf import LogBuffer, marker
from dtask.worker.outbox import ACK_WAIT, BATCH_BYTES, BATCH_RESULTS, Outbox, batches
from dtask.worker.registry import TASKS, resolve, task


def test_log_buffer_keeps_everything_under_the_limit() -> None:
    buf = LogBuffer(1000)
    buf.write(b"a" * 500)
    buf.write(b"b" * 100)
    assert buf.value() == b"a" * 500 + b"b" * 100 and not buf.truncated


def test_log_buffer_truncates_with_a_marker_and_stays_within_the_limit() -> None:
    buf = LogBuffer(1000)
    chunks = []
    for _ in range(30):
        buf.write(b"x" * 100)
        if buf.pending() > 250:
            chunks.append(buf.unsent())
    chunks.append(buf.unsent())
    log = buf.value()
    assert len(log) <= 1000 and buf.truncated
    assert log.endswith(marker(buf.cap)) and log.startswith(b"x" * buf.cap)
    assert b"output truncated after" in log
    assert buf.dropped == 3000 - buf.cap
    # streamed chunks are contiguous and add up to the final log
    offset = 0
    for off, data in chunks:
        assert off == offset
        offset += len(data)
    assert b"".join(d for _, d in chunks) == log


def test_log_buffer_zero_limit_keeps_nothing() -> None:
    buf = LogBuffer(0)
    buf.write(b"hello")
    assert buf.value() == b"" and buf.truncated


def test_docker_argv_is_exact_and_env_values_stay_off_the_command_line() -> None:
    spec = {"image": "alpine:3", "command": ["sh", "-c", "echo $B"], "env": {"B": "2", "A": "1"},
            "workdir": "/srv"}
    argv, env = build_argv(spec, container_name("job/1:x", 2))
    assert argv == ["docker", "run", "--rm", "--name", "dtask-job_1_x-2", "--workdir", "/srv",
                    "-e", "A", "-e", "B", "alpine:3", "sh", "-c", "echo $B"]
    assert env == {"A": "1", "B": "2"}
    argv, _ = build_argv({"image": "busybox", "command": "echo 'a b'"}, "n")
    assert argv[-3:] == ["busybox", "echo", "a b"]


@pytest.mark.parametrize("spec, why", [
    ({}, "image"), ({"image": "--privileged"}, "image"),
    ({"image": "x", "env": {"A=B": "1"}}, "env name"),
    ({"image": "x", "command": [1]}, "command"), ({"image": "x", "workdir": "rel"}, "workdir"),
])
def test_docker_rejects_bad_payloads(spec: dict, why: str) -> None:
    with pytest.raises(TaskError, match=why):
        build_argv(spec, "n")


def _executors() -> dict:
    cfg = WorkerConfig(["tcp://127.0.0.1:1"], executors=["shell", "python", "http", "docker"])
    return build(cfg.executors, Context(cfg, None))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind, payload, why", [
    ("shell", {}, "exactly one"), ("shell", {"cmd": "x", "argv": ["x"]}, "exactly one"),
    ("shell", {"argv": []}, "argv"), ("shell", {"cmd": "x", "env": {"A": 1}}, "env"),
    ("shell", ["ls"], "JSON object"), ("python", {"fn": ""}, "fn"),
    ("python", {"fn": "m:f", "args": {}}, "args"), ("http", {"url": "ftp://x/"}, "url"),
    ("http", {"url": "http://x/", "expect": [99]}, "expect"),
    ("http", {"url": "http://x/", "method": "GE T"}, "method"),
])
def test_payload_checks_give_clear_errors(kind: str, payload: object, why: str) -> None:
    with pytest.raises(TaskError, match=why):
        _executors()[kind].parse(payload)


def test_payload_content_types() -> None:
    shell = _executors()["shell"]
    assert shell.decode(b'{"cmd": "true"}', p.JSON) == {"cmd": "true"}
    assert shell.decode(b"\x81\xa3cmd\xa4true", "application/msgpack") == {"cmd": "true"}
    with pytest.raises(TaskError, match="does not accept content type"):
        shell.decode(b"true", p.BINARY)
    with pytest.raises(TaskError, match="not valid JSON"):
        shell.decode(b"{", p.JSON)


def test_task_decorator_registers_by_default_and_explicit_name() -> None:
    @task
    def double(x: int) -> int:
        return 2 * x

    @task(name="unit.triple")
    def triple(x: int) -> int:
        return 3 * x

    try:
        assert resolve(f"{__name__}.{double.__qualname__}")(2) == 4
        assert resolve("unit.triple")(2) == 6 and triple(1) == 3
        with pytest.raises(ValueError, match="already registered"):
            task(name="unit.triple")(double)
        assert resolve("os.path:join")("a", "b") == "a/b"
        with pytest.raises(LookupError, match="no task registered"):
            resolve("unit.nope")
    finally:
        TASKS.pop("unit.triple", None)
        TASKS.pop(f"{__name__}.{double.__qualname__}", None)


def item(task_id: str, log: bytes = b"") -> dict:
    return {"task_id": task_id, "attempt": 1, "result": b"", "log": log, "error": ""}


def test_outbox_keeps_until_acked_and_reports_due_resends() -> None:
    box = Outbox(limit=2)
    box.add(("a", 1), item("a"))
    box.add(("b", 1), item("b"))
    assert box.full() and list(box.unsent) == [("a", 1), ("b", 1)]
    assert box.due(10.0, 1.0) == []  # never sent: the next flush sends them, not the resend
    box.sent([("a", 1)], 7, now=10.0)
    assert list(box.unsent) == [("b", 1)] and box.keys_of(7) == [("a", 1)]
    assert box.due(10.5, 1.0) == [] and box.due(11.0, 1.0) == [("a", 1)]
    assert box.ack(("a", 1)) and not box.ack(("a", 1))
    assert box.keys_of(7) == [] and len(box) == 1 and not box.full()


def test_outbox_holds_the_next_batch_until_the_one_in_flight_is_answered() -> None:
    box = Outbox(limit=10)
    for name in "abc":
        box.add((name, 1), item(name))
    assert not box.waiting_for_ack(0.0)  # an idle link is never waited for
    box.sent([("a", 1), ("b", 1)], 3, now=5.0, batched=True, window=True)
    assert box.waiting_for_ack(5.0) and box.waiting_for_ack(5.0 + ACK_WAIT / 2)
    assert not box.waiting_for_ack(5.0 + ACK_WAIT)  # a lost ack does not hold them forever
    assert box.hold_until() == 5.0 + ACK_WAIT
    box.answered(99)  # some other request's answer changes nothing
    assert box.waiting_for_ack(5.0)
    assert sorted(box.keys_of(3)) == [("a", 1), ("b", 1)]
    box.answered(3)
    assert not box.waiting_for_ack(5.0) and list(box.unsent) == [("c", 1)]
    # a refused batch: its results go again, each on its own
    box.resend_alone(("b", 1))
    assert box.entries[("b", 1)].alone and list(box.unsent) == [("c", 1)]
    assert list(box.unsent_alone) == [("b", 1)]
    assert box.entries[("b", 1)].batched  # how it was last sent, for the error handler
    box.sent([("b", 1)], 4, now=6.0)
    assert not box.unsent_alone and not box.entries[("b", 1)].batched
    assert box.keys_of(3) == [("a", 1)]


def test_batches_are_cut_by_count_and_by_bytes_and_keep_order() -> None:
    box = Outbox(limit=10 * BATCH_RESULTS)
    keys = [(f"t{i}", 1) for i in range(2 * BATCH_RESULTS + 1)]
    for key in keys:
        box.add(key, item(key[0]))
    cut = batches(box, keys)
    assert [len(b) for b in cut] == [BATCH_RESULTS, BATCH_RESULTS, 1]
    assert [k for b in cut for k in b] == keys
    big = BATCH_BYTES // 2 + 1
    box = Outbox(limit=10)
    for name, size in [("x", big), ("y", big), ("z", 10), ("huge", 2 * BATCH_BYTES)]:
        box.add((name, 1), item(name, b"l" * size))
    assert batches(box, list(box.entries)) == [[("x", 1)], [("y", 1), ("z", 1)], [("huge", 1)]]


def test_config_defaults_and_validation() -> None:
    cfg = WorkerConfig(["tcp://127.0.0.1:1"], concurrency=3)
    assert cfg.python_pool_size == 3 and cfg.queues == ["default"] and cfg.prefetch == 64
    assert cfg.max_log_bytes == p.MAX_LOG and cfg.max_result_bytes == p.MAX_RESULT
    assert cfg.worker_id.endswith(f"-{__import__('os').getpid()}")
    for bad in ({"endpoints": []}, {"endpoints": ["127.0.0.1:1"]}, {"concurrency": 0},
                {"queues": ["a b"]}, {"prefetch": -1}):
        with pytest.raises(ValueError):
            WorkerConfig(**{"endpoints": ["tcp://127.0.0.1:1"], **bad})  # type: ignore[arg-type]
