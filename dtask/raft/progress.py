"""What a leader knows about each follower's log, and the quorum arithmetic on it.

A follower is in one of three states (etcd's model):
- PROBE: we don't know where its log matches ours; send one append at a time and
  back off on rejection.
- REPLICATE: its log matches up to `match`; stream appends optimistically
  (pipelining), at most `max_inflight` unacknowledged messages at once.
- SNAPSHOT: it is behind our compacted log; a snapshot is being sent in chunks.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

from .messages import Snapshot

PROBE, REPLICATE, SNAPSHOT = 0, 1, 2


class Role(IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


class Progress:
    __slots__ = ("match", "next", "state", "probe_sent", "inflights", "max_inflight",
                 "recent_active", "is_learner", "snapshot", "snap_offset", "snap_idle_ticks")

    def __init__(self, next_index: int, max_inflight: int, is_learner: bool = False) -> None:
        self.match = 0
        self.next = next_index
        self.state = PROBE
        self.probe_sent = False
        self.inflights: deque[int] = deque()  # last index of each unacknowledged append
        self.max_inflight = max_inflight
        self.recent_active = False
        self.is_learner = is_learner
        self.snapshot: Snapshot | None = None  # the one being sent, in SNAPSHOT state
        self.snap_offset = 0  # bytes of it the follower acknowledged
        self.snap_idle_ticks = 0

    def become_probe(self) -> None:
        if self.state == SNAPSHOT and self.snapshot is not None:
            # The follower installed the snapshot: continue right after it.
            self.next = max(self.match + 1, self.snapshot.meta.index + 1)
        else:
            self.next = self.match + 1
        self._reset(PROBE)

    def become_replicate(self) -> None:
        self.next = self.match + 1
        self._reset(REPLICATE)

    def become_snapshot(self, snap: Snapshot) -> None:
        self._reset(SNAPSHOT)
        self.snapshot = snap

    def _reset(self, state: int) -> None:
        self.state = state
        self.probe_sent = False
        self.inflights.clear()
        self.snapshot = None
        self.snap_offset = 0
        self.snap_idle_ticks = 0

    def maybe_update(self, index: int) -> bool:
        """An acknowledgement up to `index`; False if it tells us nothing new."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        while self.inflights and self.inflights[0] <= index:
            self.inflights.popleft()
        return updated

    def maybe_decr_to(self, rejected: int, hint: int) -> bool:
        """A rejection of the append after `rejected`; False if it is stale."""
        if self.state == REPLICATE:
            if rejected <= self.match:
                return False  # an old rejection, overtaken by a later acceptance
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # not a reply to our latest probe
        # Never below match + 1: a delayed rejection must not undo a known match.
        self.next = max(min(rejected, hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def paused(self) -> bool:
        if self.state == PROBE:
            return self.probe_sent
        if self.state == REPLICATE:
            return len(self.inflights) >= self.max_inflight
        return True  # SNAPSHOT: chunks are paced by their acknowledgements

    def sent(self, last_index: int) -> None:
        if self.state == REPLICATE:
            self.next = last_index + 1
            self.inflights.append(last_index)
        else:
            self.probe_sent = True


def quorum(n_voters: int) -> int:
    return n_voters // 2 + 1


def committed_index(matches: list[int]) -> int:
    """The largest index that a majority of voters has persisted."""
    ordered = sorted(matches, reverse=True)
    return ordered[quorum(len(ordered)) - 1]
