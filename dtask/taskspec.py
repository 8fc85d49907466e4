"""Turning `submit` arguments into the task maps of a submit message, checked on the
client's side with the scheduler's own bounds, so that a bad option fails at the call
(BadRequest / TooLarge, both ValueError) before anything is sent.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

from . import protocol as p
from .errors import BadRequest, TooLarge

_OPTIONS = frozenset({"name", "priority", "delay", "at", "timeout", "max_retries", "backoff",
                      "queue", "labels", "idempotency_key", "task_id", "content_type"})
_BACKOFF = {  # key: (lo, hi), the scheduler's bounds (protocol.parse_task_spec)
    "initial": (0.0, 86400 * 7.0), "multiplier": (1.0, 100.0),
    "max_delay": (0.0, 86400 * 30.0), "jitter": (0.0, 1.0),
}
MAX_SECONDS = 10 * 365 * 86400.0
_IDENT = p._IDENT  # the scheduler's pattern for types, queues, labels and task ids
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_BYTES = (bytes, bytearray, memoryview)


def bad_request(message: str) -> BadRequest:
    return BadRequest(p.BAD_REQUEST, message)


def check_number(name: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not lo <= value <= hi:
        raise bad_request(f"{name} must be a number of seconds in [{lo:g}, {hi:g}], got {value!r}")
    return value if type(value) is int else float(value)


def check_ident(name: str, value: object, max_len: int = 128) -> str:
    if type(value) is not str or len(value) > max_len or not _IDENT.match(value):
        raise bad_request(f"{name} must be 1-{max_len} characters of [A-Za-z0-9_.:@/+-], "
                   f"got {value!r}")
    return value


def epoch_us(name: str, value: object) -> int:
    """A datetime (naive means local time) or epoch seconds, as epoch microseconds."""
    if isinstance(value, _dt.datetime):
        seconds = value.timestamp()  # naive: local time, as documented
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value
    else:
        raise bad_request(f"{name} must be a datetime or epoch seconds, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise bad_request(f"{name} must be at or after 1970-01-01, got {value!r}")
    return round(seconds * 1_000_000)


def encode_payload(payload: object, content_type: str | None = None) -> tuple[bytes, str]:
    """Bytes travel as-is (application/octet-stream unless told); anything else as JSON."""
    if isinstance(payload, _BYTES):
        data = payload if type(payload) is bytes else bytes(payload)
        ctype = p.BINARY if content_type is None else content_type
    else:
        if content_type is None:
            ctype = p.JSON
        elif type(content_type) is str and (content_type == p.JSON
                                            or content_type.endswith("+json")):
            ctype = content_type
        else:
            raise bad_request(f"content_type {content_type!r} needs a bytes payload; only JSON "
                       "content types are encoded by the client")
        try:
            data = _json.encode(payload).encode()
        except TypeError as exc:
            raise TypeError(f"payload is not JSON-serialisable ({exc}); pass bytes to send "
                            "it as application/octet-stream") from None
        except ValueError as exc:  # NaN/Infinity or a circular reference
            raise bad_request(f"payload cannot be encoded as JSON: {exc}") from None
    if type(ctype) is not str or not 0 < len(ctype) <= 100:
        raise bad_request(f"content_type must be a string of 1-100 characters, got {ctype!r}")
    if len(data) > p.MAX_PAYLOAD:
        raise TooLarge(p.TOO_LARGE, f"payload of {len(data)} bytes exceeds the "
                       f"{p.MAX_PAYLOAD}-byte limit")
    return data, ctype


def encode_task(ttype: str, payload: object, options: dict[str, Any],
                key: Callable[[], str]) -> dict:
    """One task spec as it goes on the wire, validated; `key()` makes an idempotency key.

    Fields are emitted in a fixed order and only when set (the scheduler's defaults
    apply otherwise), except that an idempotency key is always present.
    """
    if not options.keys() <= _OPTIONS:
        unknown = ", ".join(sorted(options.keys() - _OPTIONS))
        raise TypeError(f"unknown task option(s): {unknown}; valid options are "
                        f"{', '.join(sorted(_OPTIONS))}")
    data, ctype = encode_payload(payload, options.get("content_type"))
    spec: dict[str, Any] = {"type": check_ident("type", ttype, 64), "payload": data,
                            "content_type": ctype}
    get = options.get
    if (name := get("name")) is not None:
        if type(name) is not str or len(name) > p.MAX_NAME:
            raise bad_request(f"name must be a string of at most {p.MAX_NAME} characters")
        spec["name"] = name
    if (priority := get("priority")) is not None:
        if type(priority) is not int or not -1_000_000 <= priority <= 1_000_000:
            raise bad_request("priority must be an integer in [-1000000, 1000000], "
                              f"got {priority!r}")
        spec["priority"] = priority
    delay, at = get("delay"), get("at")
    if delay is not None and at is not None:
        raise bad_request("give delay or at, not both")
    if delay is not None and check_number("delay", delay, 0.0, MAX_SECONDS):
        spec["delay"] = delay if type(delay) is int else float(delay)
    if at is not None:
        spec["at_us"] = epoch_us("at", at)
    if (timeout := get("timeout")) is not None:
        spec["timeout"] = check_number("timeout", timeout, 0.0, 86400 * 7.0)
    retry = _retry(get("max_retries"), get("backoff"))
    if retry:
        spec["retry"] = retry
    if (queue := get("queue")) is not None:
        spec["queue"] = check_ident("queue", queue)
    if (labels := get("labels")) is not None:
        spec["labels"] = _labels(labels)
    ikey = get("idempotency_key")
    if ikey is None or ikey == "":
        ikey = key()
    elif type(ikey) is not str or len(ikey) > 255:
        raise bad_request("idempotency_key must be a string of at most 255 characters")
    spec["idempotency_key"] = ikey
    if (task_id := get("task_id")) is not None:
        spec["task_id"] = check_ident("task_id", task_id)
    return spec


def _retry(max_retries: object, backoff: object) -> dict:
    retry: dict[str, Any] = {}
    if max_retries is not None:
        if type(max_retries) is not int or not 0 <= max_retries <= 1000:
            raise bad_request(f"max_retries must be an integer in [0, 1000], got {max_retries!r}")
        retry["max_retries"] = max_retries
    if backoff is None:
        return retry
    if not isinstance(backoff, dict):  # a bare number is the initial delay
        backoff = {"initial": backoff}
    unknown = backoff.keys() - _BACKOFF.keys()
    if unknown:
        raise bad_request(f"unknown backoff field(s) {sorted(unknown)}; valid: initial, "
                   "multiplier, max_delay, jitter")
    for field in _BACKOFF:  # fixed order: the same options always give the same bytes
        if field in backoff:
            retry[field] = check_number(f"backoff {field}", backoff[field], *_BACKOFF[field])
    return retry


def _labels(labels: object) -> list[str]:
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise bad_request(f"labels must be a list of strings, got {labels!r}")
    out = sorted(labels) if isinstance(labels, (set, frozenset)) else list(labels)
    if len(out) > 64:
        raise bad_request("at most 64 labels")
    for label in out:
        check_ident("label", label)
    return out
