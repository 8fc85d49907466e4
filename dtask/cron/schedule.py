"""Cron schedules: parsing, validation and fire instants, in a time zone, across DST.

Pure: nothing here reads a clock. Instants are int microseconds since the Unix epoch (UTC)
and every function takes "now" (or "after") as an argument, so the replicated state
machine and the tests can run them on any clock.

Syntax (checked by croniter, see docs/cron.md): five fields ``minute hour day-of-month
month day-of-week``, or six with SECONDS LAST (croniter's convention:
``minute hour dom month dow second``; ``* * * * * */10`` fires every ten seconds), or a
macro ``@yearly @annually @monthly @weekly @daily @midnight @hourly``.

Fire instants of a schedule in zone Z are the local wall-clock times that match, mapped
to instants as follows (Vixie cron's rules, see docs/cron.md for examples):

* A schedule is *periodic* if its second, minute or hour field starts with ``*`` (``*``,
  ``*/15``), as ``@hourly`` does; otherwise it is *fixed-time* (``30 1 * * *``).
* Wall times that exist once map to their one instant.
* Wall times that exist twice (clocks go back): fixed-time schedules fire at the first
  occurrence only; periodic ones fire at both, so ``*/15 * * * *`` keeps firing every
  15 real minutes through the repeated hour.
* Wall times that do not exist (clocks go forward): a fixed-time schedule fires once,
  at the first instant after the gap (however many of its times fell in the gap, and
  merged with a time that matches exactly there); a periodic schedule just has no ticks
  there, so ``*/15`` goes on firing every 15 real minutes.

Every tick falls on a whole second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from croniter import CroniterError, croniter

from dtask.cron.misfire import FirePlan, Tick, misfire
from dtask.cron.policies import (
    DEFAULT_MISFIRE_POLICY,
    DEFAULT_OVERLAP_POLICY,
    MISFIRE_POLICIES,
    OVERLAP_POLICIES,
    CronError,
    check_misfire_policy,
    check_overlap_policy,
    validate_policy,
)
from dtask.cron.wallclock import DAY, EPOCH_ORDINAL, WallRule
from dtask.cron.zone import Zone

# The broker imports this one module for everything cron; these live next door.
__all__ = [
    "DEFAULT_MISFIRE_POLICY", "DEFAULT_OVERLAP_POLICY", "MACROS", "MISFIRE_POLICIES",
    "OVERLAP_POLICIES", "CronError", "FirePlan", "Schedule", "Tick", "check_misfire_policy",
    "check_overlap_policy", "misfire", "parse", "validate_policy",
]

_US = 1_000_000

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# (name, what it accepts), in croniter's field order; the sixth is the seconds field
_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31 or L"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat, optionally 1#2 (2nd Monday) or L5 (last Friday)"),
    ("second", "0-59"),
)
_HASHED = re.compile(r"^[hr](\(|/|$)")  # croniter's H/R: needs a hash id, or is random
_NEAREST_WEEKDAY = re.compile(r"^(\d+w|w\d+)$")


def parse(expr: str, tz: str = "UTC") -> Schedule:
    """Validate `expr` in zone `tz` and return its Schedule (raises CronError)."""
    return Schedule(expr, tz)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A validated cron expression in an IANA time zone. Compares and hashes by text."""

    expr: str
    tz: str = "UTC"
    _rule: WallRule = field(init=False, repr=False, compare=False)
    _periodic: bool = field(init=False, repr=False, compare=False)
    _zone: Zone | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.expr, str):
            raise CronError(f"a cron expression must be text, not {type(self.expr).__name__}")
        if not isinstance(self.tz, str):
            raise CronError(f"unknown time zone '{self.tz}'")
        rule, periodic = _compile(self.expr)
        object.__setattr__(self, "_rule", rule)
        object.__setattr__(self, "_periodic", periodic)
        object.__setattr__(self, "_zone", _zone(self.tz))

    @property
    def periodic(self) -> bool:
        """True if a second, minute or hour field starts with '*' (see the DST rules)."""
        return self._periodic

    def next_after(self, t_us: int) -> int:
        """The first fire instant strictly after t_us."""
        return self._next_s(t_us // _US) * _US

    def last_at_or_before(self, t_us: int, after_us: int) -> int | None:
        """The latest fire instant in (after_us, t_us], or None.

        Costs O(log(distance to it)) calls of next_after: it gallops back from t_us.
        """
        return _scaled(self._last_s(after_us // _US, t_us // _US))

    def count_between(self, after_us: int, until_us: int) -> int:
        """How many fire instants lie in (after_us, until_us]; O(days + transitions)."""
        return self._count_s(after_us // _US, until_us // _US)

    def ticks_between(self, after_us: int, until_us: int, limit: int) -> list[int]:
        """The LATEST `limit` fire instants in (after_us, until_us], ascending.

        The latest, not the earliest, because catching up runs the most recent missed
        ticks; use count_between for how many there are in all. The work is bounded by
        `limit` and the length of the range in days, never by the number of ticks.
        """
        a, b = after_us // _US, until_us // _US
        if limit <= 0 or b <= a:
            return []
        if self._count_s(a, b) <= limit:
            ticks, t = [], self._next_s(a)
            while t <= b:
                ticks.append(t * _US)
                t = self._next_s(t)
            return ticks
        ticks = []
        while len(ticks) < limit:
            t = self._last_s(a, b)
            ticks.append(t * _US)
            b = t - 1
        ticks.reverse()
        return ticks

    # -- in whole seconds from here on ---------------------------------------------

    def _next_s(self, t: int) -> int:
        rule, zone = self._rule, self._zone
        if zone is None:
            return self._found(rule.next_at_or_after(t + 1))
        seg = zone.segment(t)
        lower = t + seg.offset + 1  # wall-clock second to search from
        while True:
            off = seg.offset
            if not self._periodic and seg.start is not None and seg.before > off:
                # clocks went back at seg.start: fixed times there fired on the first pass
                lower = max(lower, seg.start + seg.before)
            wall = self._found(rule.next_at_or_after(lower))
            if wall < seg.end + off:
                return wall - off
            if seg.after > off and not self._periodic and wall < seg.end + seg.after:
                return seg.end  # a fixed time in the skipped hour runs when the gap ends
            end = seg.end
            seg = zone.segment(end)
            lower = end + seg.offset

    def _count_s(self, a: int, b: int) -> int:
        """Ticks in (a, b]; mirrors _next_s one segment at a time."""
        rule, zone = self._rule, self._zone
        if b <= a:
            return 0
        if zone is None:
            return rule.count(a + 1, b + 1)
        seg = zone.segment(a)
        lower, total = a + seg.offset + 1, 0
        while True:
            off = seg.offset
            if not self._periodic and seg.start is not None and seg.before > off:
                lower = max(lower, seg.start + seg.before)
            total += rule.count(lower, min(b + 1, seg.end) + off)
            if seg.end > b:
                return total
            nxt = zone.segment(seg.end)
            lower = seg.end + nxt.offset
            if (not self._periodic and nxt.offset > off
                    and rule.count(seg.end + off, seg.end + nxt.offset)):
                total += 1  # the gap's one tick, at seg.end: a match right there is the same
                lower += 1
            seg = nxt

    def _last_s(self, a: int, b: int) -> int | None:
        """Latest tick in (a, b]: gallop back from b, then bisect, using _next_s only."""
        if b <= a or self._next_s(a) > b:
            return None
        good, bad, step = a, b, 1  # invariant: a tick in (good, b], none in (bad, b]
        while True:
            probe = b - step
            if probe <= good:
                break
            if self._next_s(probe) <= b:
                good = probe
                break
            bad, step = probe, step * 2
        while bad - good > 1:
            mid = (good + bad) // 2
            if self._next_s(mid) <= b:
                good = mid
            else:
                bad = mid
        return good + 1

    def _found(self, wall: int | None) -> int:
        if wall is None:
            raise CronError(f"cron expression '{self.expr}' has no fire time before year 10000")
        return wall


def _scaled(t: int | None) -> int | None:
    return None if t is None else t * _US


@lru_cache(maxsize=65536)
def _compile(expr: str) -> tuple[WallRule, bool]:
    """(rule, periodic) for an expression; cached, so Schedules are cheap to rebuild."""
    text = expr.strip()
    if not text:
        raise CronError("empty cron expression")
    if text.startswith("@"):
        if text.lower() == "@reboot":
            raise CronError("'@reboot' is not supported: schedule times, or submit a task")
        if text.lower() not in MACROS:
            raise CronError(f"unknown cron macro '{text}': use one of {', '.join(MACROS)}")
        text = MACROS[text.lower()]
    fields = text.split()
    if len(fields) not in (5, 6):
        raise CronError(
            f"bad cron expression '{expr}': expected 5 fields (minute hour day-of-month "
            f"month day-of-week) or 6 (the same, then second), got {len(fields)}"
        )
    for i in range(len(fields)):
        _check_field(expr, fields, i)
    try:
        expanded, nth = croniter.expand(" ".join(fields))
    except CroniterError as e:
        raise CronError(f"bad cron expression '{expr}': {_croniter_reason(e)}") from None
    if nth and expanded[2] != ["*"]:
        # croniter's meaning for "15 * 1#2" is not cron's OR; refuse rather than guess
        raise CronError(
            f"bad cron expression '{expr}': day-of-week '#' or 'L' needs day-of-month '*'"
        )
    rule = WallRule(expanded, nth, expanded[5] if len(fields) == 6 else None)
    # the calendar repeats every 400 years: no match in 401 means never
    if rule.next_at_or_after((datetime(2000, 1, 1).toordinal() - EPOCH_ORDINAL) * DAY,
                             year_limit=2401) is None:
        raise CronError(f"bad cron expression '{expr}': it never fires (no such date)")
    periodic = any(fields[i].startswith("*") for i in (0, 1, 5) if i < len(fields))
    return rule, periodic


def _check_field(expr: str, fields: list[str], i: int) -> None:
    """Validate field i alone, so the message can name the field that is wrong."""
    name, accepts = _FIELDS[i]
    value = fields[i].lower()
    items = value.split(",")
    unsupported = any(_HASHED.match(item) for item in items) or (
        name == "day-of-month" and any(_NEAREST_WEEKDAY.match(item) for item in items)
    )
    probe = ["*"] * len(fields)
    probe[i] = fields[i]
    try:
        if not unsupported:
            croniter.expand(" ".join(probe))
            return
    except CroniterError:
        pass
    raise CronError(f"bad cron expression '{expr}': {name} must be {accepts}, not '{fields[i]}'")


def _croniter_reason(e: Exception) -> str:
    """croniter's message without the expression it repeats in brackets."""
    reason = re.sub(r"^\[[^\]]*\]\s*(is not acceptable[.,]?\s*)?", "", str(e)).strip()
    return reason.split("\n")[0].split("  ")[0] or "not a valid cron expression"


@lru_cache(maxsize=1024)
def _zone(tz: str) -> Zone | None:
    """The Zone for an IANA name; None for UTC (no transitions, fast path)."""
    if not tz:
        raise CronError(f"unknown time zone '{tz}'")
    if tz in ("UTC", "Etc/UTC", "Etc/UCT", "Etc/Zulu", "Zulu", "Universal", "Etc/Universal"):
        return None
    try:
        return Zone(ZoneInfo(tz))
    except (ValueError, OSError, KeyError):  # ZoneInfoNotFoundError is a KeyError
        raise CronError(f"unknown time zone '{tz}'") from None
