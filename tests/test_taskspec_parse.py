"""The scheduler's check of submitted task specs (dtask.protocol.parse_task_spec)."""

from __future__ import annotations

import pytest

from dtask import protocol as p

BASE = {"type": "shell", "payload": b"{}"}

BAD_FIELDS = [
    ("type", None), ("type", 7), ("type", "has space"), ("type", "x" * 65),
    ("content_type", None), ("content_type", 1), ("name", None), ("name", "n" * 256),
    ("priority", None), ("priority", "hi"), ("priority", 1.5), ("priority", 10**7),
    ("delay", None), ("delay", -1), ("delay", float("nan")), ("at_us", -5),
    ("at_us", 1.0), ("timeout", "10"), ("timeout", 86400 * 8), ("queue", None),
    ("queue", "bad queue"), ("labels", "gpu"), ("labels", ["ok", 3]),
    ("idempotency_key", None), ("idempotency_key", "k" * 256), ("task_id", 5),
    ("task_id", "a b"), ("task_id", "1f.2.3a"), ("retry", [1]),
    ("retry", {"max_retries": -1}), ("retry", {"multiplier": 0.5}),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_a_bad_field_is_refused_and_named(field, value):
    with pytest.raises(p.ProtocolError) as exc:
        p.parse_task_spec({**BASE, field: value})
    assert exc.value.code == p.BAD_REQUEST
    name = next(iter(value)) if field == "retry" and isinstance(value, dict) else field
    assert name in exc.value.message or "task_id" in exc.value.message


def test_missing_type_and_non_binary_payload_are_refused():
    for raw in ({"payload": b""}, {"type": "shell", "payload": "text"}, ["not", "a", "map"]):
        with pytest.raises(p.ProtocolError):
            p.parse_task_spec(raw)


def test_absent_fields_take_the_defaults_and_unknown_ones_are_ignored():
    spec = p.parse_task_spec({**BASE, "future_field": 1})
    assert spec == p.TaskSpec(type="shell", payload=b"{}")
    assert spec.retry == p.RetryPolicy() and spec.queue == "default" and spec.labels == ()


def test_every_field_is_taken_as_given():
    raw = {**BASE, "content_type": "application/octet-stream", "name": "n", "priority": -3,
           "at_us": 123, "timeout": 2.5, "queue": "q1", "labels": ["gpu", "ssd"],
           "idempotency_key": "k", "task_id": "my-task",
           "retry": {"max_retries": 0, "initial": 2, "multiplier": 3, "max_delay": 9,
                     "jitter": 0}}
    spec = p.parse_task_spec(raw)
    assert (spec.content_type, spec.name, spec.priority, spec.at_us, spec.timeout,
            spec.queue, spec.labels, spec.idempotency_key, spec.task_id) == (
        "application/octet-stream", "n", -3, 123, 2.5, "q1", ("gpu", "ssd"), "k", "my-task")
    assert spec.retry == p.RetryPolicy(0, 2.0, 3.0, 9.0, 0.0)
    with pytest.raises(p.ProtocolError, match="not both"):
        p.parse_task_spec({**BASE, "delay": 1, "at_us": 5})


def test_oversized_payload_is_too_large():
    with pytest.raises(p.ProtocolError) as exc:
        p.parse_task_spec({**BASE, "payload": b"x" * 11}, max_payload=10)
    assert exc.value.code == p.TOO_LARGE
