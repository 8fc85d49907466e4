"""Parsing what people type: durations, points in time, payloads."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import time
from typing import IO, Any

import click

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_NUMBER = re.compile(r"^[+]?(\d+(?:\.\d*)?|\.\d+)$")


def parse_duration(text: str) -> float:
    """'30s', '5m', '1h30m', '250ms', '2d' or a bare number of seconds; ValueError else."""
    s = text.strip().lower().replace(" ", "")
    if _NUMBER.match(s):
        return float(s)
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(s):
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 1h30m or a number of "
                         "seconds")
    return total


def parse_moment(text: str, *, relative: bool = False) -> float:
    """ISO 8601 (naive = local time) or epoch seconds, as epoch seconds.

    relative=True also accepts a duration with a unit ('10m'), meaning that long ago.
    A bare number is always epoch seconds (as in docker's --since), never "ago".
    """
    s = text.strip()
    if _NUMBER.match(s):
        return float(s)
    if relative:
        try:
            return time.time() - parse_duration(s)
        except ValueError:
            pass  # not a duration: an ISO time, then
    try:
        # Python 3.11 reads most of ISO 8601, including a trailing Z and a bare date.
        when = dt.datetime.fromisoformat(s)
    except ValueError:
        hint = ", a duration ago like 10m," if relative else ""
        raise ValueError(f"{text!r} is not an ISO 8601 time (2024-05-01T12:00:00, "
                         f"naive = local time){hint} or epoch seconds") from None
    return when.timestamp()  # naive datetimes are local time


class Duration(click.ParamType):
    name = "DURATION"

    def __init__(self, max_seconds: float = 10 * 365 * 86400.0) -> None:
        self.max_seconds = max_seconds

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if not math.isfinite(seconds) or seconds > self.max_seconds:
            self.fail(f"{value!r} is more than the limit of {self.max_seconds:g} s", param, ctx)
        return seconds


class Moment(click.ParamType):
    name = "TIME"

    def __init__(self, relative: bool = False) -> None:
        self.relative = relative

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_moment(str(value), relative=self.relative)
        except (ValueError, OverflowError, OSError) as exc:
            self.fail(str(exc), param, ctx)


class PayloadError(ValueError):
    """The payload the user gave cannot be sent."""


def read_payload(arg: str | None, stream: IO[bytes] | None, binary: bool) -> object:
    """The payload to hand to Client.submit: bytes with --binary, else a JSON value."""
    if arg is not None and stream is not None:
        raise click.UsageError("give the payload as an argument or with --payload-file, "
                               "not both")
    if stream is not None:
        raw = stream.read()
        source = "payload file" if getattr(stream, "name", "-") not in ("-", "<stdin>") \
            else "payload from stdin"
    elif arg is not None:
        raw, source = arg.encode(), "payload"
    else:
        return b"" if binary else None  # JSON null: the executor decides if it is enough
    if binary:
        return raw
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise PayloadError(f"{source} is not UTF-8 text; use --binary to send raw "
                           "bytes") from None
    except json.JSONDecodeError as exc:
        raise PayloadError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} "
                           f"column {exc.colno}); quote it for the shell, e.g. "
                           "'{\"cmd\": \"echo hi\"}', or use --binary for raw bytes") from None
