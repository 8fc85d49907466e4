"""UTC-offset transitions of an IANA time zone, found through zoneinfo.

Cron schedules are written in wall-clock time; mapping them to instants needs to know,
around any instant, the offset in force and the transitions (DST changes) next to it.
zoneinfo answers "what is the offset at t" but does not list transitions, so we find them
by sampling the offset every few hours and bisecting each change to the second, once per
~388-day bucket, cached. The assumption (true of tzdata as shipped) is that a zone never
changes its offset twice within one sampling step and back again.

All values are int seconds: instants since the Unix epoch, offsets east of UTC.
"""

from __future__ import annotations

from bisect import bisect_right
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

_BUCKET_BITS = 25  # 2**25 s ~ 388 days: few buckets per query, cheap to fill one
_SAMPLE = 6 * 3600


class Segment:
    """A stretch [start, end) of constant offset, with its neighbours' offsets.

    `start`/`end` are None when no transition lies within a bucket either side; the
    neighbouring offset is then the same as `offset`, which is all the callers need.
    """

    __slots__ = ("start", "before", "offset", "end", "after")

    def __init__(self, start, before, offset, end, after) -> None:
        self.start, self.before, self.offset, self.end, self.after = (
            start, before, offset, end, after,
        )


class Zone:
    """Offsets and transitions of one zone; thread-compatible cache, deterministic values."""

    def __init__(self, info: ZoneInfo) -> None:
        self.info = info
        self._buckets: dict[int, tuple[int, list[int], list[tuple[int, int, int]]]] = {}

    def _raw_offset(self, t: int) -> int:
        dt = datetime.fromtimestamp(t, UTC).astimezone(self.info)
        return int(dt.utcoffset().total_seconds())

    def _bucket(self, k: int) -> tuple[int, list[int], list[tuple[int, int, int]]]:
        """Offset at the bucket's start and its transitions (instant, before, after).

        A bucket holds the transitions T with start < T <= end.
        """
        cached = self._buckets.get(k)
        if cached is not None:
            return cached
        start, end = k << _BUCKET_BITS, (k + 1) << _BUCKET_BITS
        first = prev = self._raw_offset(start)
        trans: list[tuple[int, int, int]] = []
        t = start
        while t < end:  # transitions in (start, end]: one at a boundary is found once
            nxt = min(t + _SAMPLE, end)
            off = self._raw_offset(nxt)
            if off != prev:
                lo, hi = t, nxt  # offset(lo) = prev != offset(hi)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self._raw_offset(mid) == prev:
                        lo = mid
                    else:
                        hi = mid
                trans.append((hi, prev, off))
                prev = off
            t = nxt
        cached = (first, [tr[0] for tr in trans], trans)
        self._buckets[k] = cached
        return cached

    def segment(self, t: int) -> Segment:
        """The constant-offset stretch containing instant t."""
        k = t >> _BUCKET_BITS
        first, instants, trans = self._bucket(k)
        i = bisect_right(instants, t)
        offset = trans[i - 1][2] if i else first
        if i:
            start, before = trans[i - 1][0], trans[i - 1][1]
        else:
            _, _, prev = self._bucket(k - 1)
            start, before = (prev[-1][0], prev[-1][1]) if prev else (None, offset)
        if i < len(trans):
            end, after = trans[i][0], trans[i][2]
        else:
            _, _, nxt = self._bucket(k + 1)
            if nxt:
                end, after = nxt[0][0], nxt[0][2]
            else:
                # no change for a whole bucket ahead: stop the segment there, unchanged
                end, after = (k + 2) << _BUCKET_BITS, offset
        return Segment(start, before, offset, end, after)
