"""The Raft core's in-memory view of its log: entries after the last snapshot.

Indexes are 1-based. `offset` is the snapshot's index (0 for none): entry i lives at
`entries[i - offset - 1]`. Entries above `stable` have not been persisted yet; the
core hands them to the driver in `Ready.entries` and learns in `advance` that they
are durable.
"""

from __future__ import annotations

from .messages import Entry, EntryType


class RaftLog:
    __slots__ = ("offset", "offset_term", "entries", "committed", "applied", "stable",
                 "unstable_from")

    def __init__(self, snap_index: int = 0, snap_term: int = 0,
                 entries: list[Entry] | None = None) -> None:
        self.offset = snap_index
        self.offset_term = snap_term
        self.entries: list[Entry] = list(entries or [])
        self.committed = snap_index
        self.applied = snap_index
        self.stable = self.last_index()  # what storage gave us is durable
        self.unstable_from = self.stable + 1

    # -- reading -----------------------------------------------------------

    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.offset + len(self.entries)

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.offset_term

    def term(self, index: int) -> int | None:
        """Term of the entry at `index`; None when compacted away or beyond the end."""
        if index == self.offset:
            return self.offset_term
        if index < self.offset or index > self.last_index():
            return None
        return self.entries[index - self.offset - 1].term

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Whether a candidate with this last entry may get our vote (paper §5.4.1)."""
        mine = self.last_term()
        return last_term > mine or (last_term == mine and last_index >= self.last_index())

    def slice(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries [lo, hi), at least one, stopping once `max_bytes` of data is reached."""
        start = lo - self.offset - 1
        end = hi - self.offset - 1
        if max_bytes <= 0 or end - start <= 1:
            return self.entries[start:end]
        size = 0
        stop = start
        while stop < end:
            size += len(self.entries[stop].data) + 16
            stop += 1
            if size >= max_bytes:
                break
        return self.entries[start:stop]

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """The largest index <= `index` whose term is <= `term` (etcd's fast backtracking).

        A rejecting follower uses it to skip a whole term of mismatching entries in one
        round trip; the leader uses it on the follower's hint the same way.
        """
        index = min(index, self.last_index())
        while index > self.offset:
            t = self.entries[index - self.offset - 1].term
            if t <= term:
                break
            index -= 1
        return index

    def conf_entries_after(self, index: int) -> list[Entry]:
        start = max(index - self.offset, 0)
        return [e for e in self.entries[start:] if e.type == EntryType.CONF_CHANGE]

    # -- writing -----------------------------------------------------------

    def append(self, entries: list[Entry]) -> None:
        """Append entries whose first index is <= last+1, truncating any conflicting suffix."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.offset or first > self.last_index() + 1:
            raise ValueError(f"append at {first} outside ({self.offset}, {self.last_index() + 1}]")
        if first <= self.committed:
            raise AssertionError(f"truncating committed entry {first} <= {self.committed}")
        del self.entries[first - self.offset - 1:]
        self.entries.extend(entries)
        if first <= self.stable:
            self.stable = first - 1
        self.unstable_from = min(self.unstable_from, first)

    def maybe_append(self, prev_index: int, prev_term: int, entries: list[Entry]) -> int | None:
        """A follower's AppendEntries: returns the last new index, or None on mismatch."""
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        for i, e in enumerate(entries):
            if e.index <= self.offset:
                continue  # already covered by our snapshot
            t = self.term(e.index)
            if t != e.term:  # first conflict or first new entry: keep everything from here
                self.append(entries[i:])
                break
        return last_new

    def commit_to(self, index: int) -> bool:
        index = min(index, self.last_index())
        if index > self.committed:
            self.committed = index
            return True
        return False

    def unstable_entries(self) -> list[Entry]:
        if self.unstable_from > self.last_index():
            return []
        return self.entries[self.unstable_from - self.offset - 1:]

    def stable_to(self, index: int, term: int) -> None:
        if self.term(index) == term and index >= self.unstable_from - 1:
            self.stable = max(self.stable, index)
            self.unstable_from = index + 1

    def next_committed(self) -> list[Entry]:
        if self.committed <= self.applied:
            return []
        return self.entries[self.applied - self.offset:self.committed - self.offset]

    def applied_to(self, index: int) -> None:
        if index > self.applied:
            self.applied = index

    def compact(self, index: int, term: int) -> None:
        """Drop entries up to `index` (covered by a snapshot the driver has saved)."""
        if index <= self.offset:
            return
        if index > self.applied:
            raise ValueError(f"compacting {index} beyond applied {self.applied}")
        del self.entries[:index - self.offset]
        self.offset, self.offset_term = index, term

    def restore(self, index: int, term: int) -> None:
        """Replace everything with a snapshot received from the leader."""
        self.entries = []
        self.offset = self.committed = self.applied = self.stable = index
        self.offset_term = term
        self.unstable_from = index + 1
