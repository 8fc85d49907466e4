"""Matching cron fields against naive wall-clock time.

A `WallRule` answers two questions about local wall-clock seconds (seconds since
1970-01-01 00:00 on a calendar with no time zone): what is the first matching second at or
after W, and how many matching seconds lie in [lo, hi). Time zones and DST are handled one
level up (`schedule.py`); here every day has 86,400 seconds.

It is built from croniter's expansion of the fields, so croniter stays the judge of the
syntax, but the search itself is ours: it is several times faster than croniter's
(the leader runs it for every job on every leader change) and it never sees a tz-aware
datetime, which is where croniter's DST bugs live.
"""

from __future__ import annotations

from bisect import bisect_left
from datetime import date

DAY = 86_400
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
MAX_YEAR = 9999
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_in_month(year: int, month: int) -> int:
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        return 29
    return _DAYS_IN_MONTH[month - 1]


def _values(expanded: list, low: int, high: int) -> tuple[int, ...]:
    """croniter writes a full field as ['*']; we want the numbers."""
    if expanded == ["*"]:
        return tuple(range(low, high + 1))
    return tuple(sorted(v for v in expanded if isinstance(v, int)))


class WallRule:
    """The fields of one cron expression, ready for fast matching."""

    __slots__ = (
        "seconds", "minutes", "hours", "months", "dom", "dom_last", "dom_any",
        "dow", "dow_any", "nth", "day_or", "_hour_set", "_minute_set", "_second_set",
        "per_day",
    )

    def __init__(self, expanded: list[list], nth: dict, seconds: list | None) -> None:
        minute, hour, dom, month, dow = expanded[:5]
        self.seconds = _values(seconds, 0, 59) if seconds is not None else (0,)
        self.minutes = _values(minute, 0, 59)
        self.hours = _values(hour, 0, 23)
        self.months = frozenset(_values(month, 1, 12))
        self.dom_any = dom == ["*"]
        self.dom = frozenset(_values(dom, 1, 31))
        self.dom_last = "l" in dom
        self.dow_any = dow == ["*"]
        self.dow = frozenset(_values(dow, 0, 6))
        # weekday -> {1..5 or "l"}: "the n-th (or last) such weekday of the month"
        self.nth = {wd: frozenset(ns) for wd, ns in nth.items()}
        # Cron's rule (and croniter's): when both day fields are restricted, a day
        # matches if EITHER matches; otherwise both must.
        self.day_or = not self.dom_any and not self.dow_any
        self._hour_set = frozenset(self.hours)
        self._minute_set = frozenset(self.minutes)
        self._second_set = frozenset(self.seconds)
        self.per_day = len(self.hours) * len(self.minutes) * len(self.seconds)

    def day_ok(self, day: int, dim: int, weekday: int) -> bool:
        """Does day-of-month `day` (month of `dim` days, cron weekday 0=Sunday) match?"""
        dom_hit = self.dom_any or day in self.dom or (self.dom_last and day == dim)
        if self.nth:
            ns = self.nth.get(weekday)
            dow_hit = ns is not None and (
                (day - 1) // 7 + 1 in ns or ("l" in ns and day + 7 > dim)
            )
        else:
            dow_hit = self.dow_any or weekday in self.dow
        return (dom_hit or dow_hit) if self.day_or else (dom_hit and dow_hit)

    def _next_time(self, sod: int) -> int | None:
        """First matching second-of-day >= sod, or None if none is left today."""
        h, rest = divmod(sod, 3600)
        m, s = divmod(rest, 60)
        hours, minutes, seconds = self.hours, self.minutes, self.seconds
        i = bisect_left(hours, h)
        if i == len(hours):
            return None
        if hours[i] == h:
            j = bisect_left(minutes, m)
            if j < len(minutes) and minutes[j] == m:
                k = bisect_left(seconds, s)
                if k < len(seconds):
                    return h * 3600 + m * 60 + seconds[k]
                j += 1
            if j < len(minutes):
                return h * 3600 + minutes[j] * 60 + seconds[0]
            i += 1
            if i == len(hours):
                return None
        return hours[i] * 3600 + minutes[0] * 60 + seconds[0]

    def _rank(self, sod: int) -> int:
        """How many matching seconds-of-day are < sod (0 <= sod <= 86,400)."""
        h, rest = divmod(sod, 3600)
        m, s = divmod(rest, 60)
        n_min, n_sec = len(self.minutes), len(self.seconds)
        rank = bisect_left(self.hours, h) * n_min * n_sec
        if h in self._hour_set:
            rank += bisect_left(self.minutes, m) * n_sec
            if m in self._minute_set:
                rank += bisect_left(self.seconds, s)
        return rank

    def next_at_or_after(self, wall: int, year_limit: int = MAX_YEAR) -> int | None:
        """First matching wall second >= `wall`, or None if none up to `year_limit`."""
        days, sod = divmod(wall, DAY)
        try:
            d = date.fromordinal(EPOCH_ORDINAL + days)
        except (ValueError, OverflowError):
            return None
        year, month, day = d.year, d.month, d.day
        year_limit = min(year_limit, MAX_YEAR)
        while year <= year_limit:
            if month in self.months:
                dim = _days_in_month(year, month)
                first = date(year, month, 1)
                weekday0 = (first.weekday() + 1) % 7  # cron counts from Sunday
                while day <= dim:
                    if self.day_ok(day, dim, (weekday0 + day - 1) % 7):
                        t = self._next_time(sod)
                        if t is not None:
                            return (first.toordinal() + day - 1 - EPOCH_ORDINAL) * DAY + t
                    day += 1
                    sod = 0
            month, day, sod = month + 1, 1, 0
            if month == 13:
                month, year = 1, year + 1
        return None

    def count(self, lo: int, hi: int) -> int:
        """How many matching wall seconds lie in [lo, hi). Costs O(days in the range)."""
        if hi <= lo:
            return 0
        d0, s0 = divmod(lo, DAY)
        d1, s1 = divmod(hi, DAY)
        if d0 == d1:
            return self._day_ok_at(d0) * (self._rank(s1) - self._rank(s0))
        total = self._day_ok_at(d0) * (self.per_day - self._rank(s0))
        total += self._day_ok_at(d1) * self._rank(s1)
        for d in range(d0 + 1, d1):
            total += self._day_ok_at(d) * self.per_day
        return total

    def _day_ok_at(self, days: int) -> bool:
        d = date.fromordinal(EPOCH_ORDINAL + days)
        dim = _days_in_month(d.year, d.month)
        return d.month in self.months and self.day_ok(d.day, dim, (d.weekday() + 1) % 7)
