"""Finished attempts' results, kept until the leader acknowledges them.

A result is never dropped: it is resent after every (re-)registration and
periodically until a `result_ack` for its (task_id, attempt) arrives. The worker stops
taking tasks while the outbox is full, which bounds it (back-pressure, not loss).
"""

from __future__ import annotations

from dataclasses import dataclass

Key = tuple[str, int]


@dataclass(slots=True)
class Pending:
    msg: dict  # the result message, without the per-send fields (id, credits)
    sent_at: float = 0.0  # monotonic; 0.0: not sent yet
    rid: object = None  # request id of the latest send


class Outbox:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: dict[Key, Pending] = {}
        self.by_request: dict[object, Key] = {}  # request id -> key, to match error replies

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def full(self) -> bool:
        return len(self.entries) >= self.limit

    def add(self, key: Key, msg: dict) -> Pending:
        entry = self.entries[key] = Pending(msg)
        return entry

    def sent(self, key: Key, request_id: object, now: float) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            self.by_request.pop(entry.rid, None)
            entry.sent_at, entry.rid = now, request_id
            self.by_request[request_id] = key

    def ack(self, key: Key) -> bool:
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        self.by_request.pop(entry.rid, None)
        return True

    def key_of(self, request_id: object) -> Key | None:
        return self.by_request.get(request_id)

    def due(self, now: float, interval: float) -> list[Key]:
        """Results not (re)sent within `interval`."""
        return [k for k, e in self.entries.items() if now - e.sent_at >= interval]

    def pending_keys(self) -> list[Key]:
        return list(self.entries)
