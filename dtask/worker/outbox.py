"""Finished attempts' results, kept until the leader acknowledges them.

A result is never dropped: it is resent after every (re-)registration and
periodically until an acknowledgement for its (task_id, attempt) arrives. The worker
stops taking tasks while the outbox is full, which bounds it (back-pressure, not loss).

Results travel together in `results` messages when the leader takes them. The outbox
keeps the order in which they are to go (`unsent`) and the one batch in flight: while
it waits for that batch's acknowledgement (about one quorum round), results that finish
meanwhile queue up and go together in the next batch. Under load a worker then sends
one message, and the leader writes one log entry, per quorum round instead of per task;
an idle link is never waited for.
"""

from __future__ import annotations

from dataclasses import dataclass

Key = tuple[str, int]

BATCH_RESULTS = 500  # results per `results` message (the protocol allows MAX_RESULTS)
BATCH_BYTES = 1 << 20  # result, log and error bytes per message; a bigger result goes alone
# A batch unacknowledged this long no longer holds the next one back (the leader may be
# slow to commit, or gone: re-registration and the resend timer take it from there).
ACK_WAIT = 0.25


@dataclass(slots=True)
class Pending:
    msg: dict  # the result's fields, task_id to finished_us: a `results` item
    sent_at: float = 0.0  # monotonic; 0.0: not sent yet
    rid: object = None  # request id of the latest send
    alone: bool = False  # refused inside a batch: it travels in a `result` of its own
    batched: bool = False  # the latest send was a `results` message


class Outbox:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: dict[Key, Pending] = {}
        self.unsent: dict[Key, None] = {}  # to go in the next batch, in the order they finished
        self.unsent_alone: dict[Key, None] = {}  # to go each in a `result` of its own
        self.by_request: dict[object, set[Key]] = {}  # request id -> keys, for error replies
        self.batch_rid: object = None  # the batch in flight, if any
        self.batch_sent_at = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def full(self) -> bool:
        return len(self.entries) >= self.limit

    def add(self, key: Key, msg: dict) -> Pending:
        entry = self.entries[key] = Pending(msg)
        self.unsent[key] = None
        return entry

    def sent(self, keys: list[Key], request_id: object, now: float, *, batched: bool = False,
             window: bool = False) -> None:
        """`keys` left in one message with this request id (a `results` one if batched;
        window: the batch that holds the next ones back until it is answered)."""
        for key in keys:
            entry = self.entries.get(key)
            if entry is not None:
                self._forget_request(entry.rid, key)
                entry.sent_at, entry.rid, entry.batched = now, request_id, batched
                self.unsent.pop(key, None)
                self.unsent_alone.pop(key, None)
        self.by_request[request_id] = set(keys)
        if window:
            self.batch_rid, self.batch_sent_at = request_id, now

    def resend_alone(self, key: Key) -> None:
        """A batch carrying `key` was refused: from now on it goes in a `result` of its
        own (whose refusal the worker knows how to handle), at the next flush."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.alone, entry.sent_at = True, 0.0
            self.unsent.pop(key, None)
            self.unsent_alone[key] = None

    def _forget_request(self, rid: object, key: Key) -> None:
        keys = self.by_request.get(rid)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_request[rid]

    def ack(self, key: Key) -> bool:
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        self.unsent.pop(key, None)
        self.unsent_alone.pop(key, None)
        self._forget_request(entry.rid, key)
        return True

    def answered(self, request_id: object) -> None:
        """The leader answered this request (ack or error): it no longer holds batches back."""
        if request_id == self.batch_rid and request_id is not None:
            self.batch_rid = None

    def waiting_for_ack(self, now: float) -> bool:
        """A batch is in flight and recent: the next results wait for its ack."""
        return self.batch_rid is not None and now - self.batch_sent_at < ACK_WAIT

    def hold_until(self) -> float:
        """When held results go regardless of the batch in flight."""
        return self.batch_sent_at + ACK_WAIT

    def reset_window(self) -> None:
        self.batch_rid = None

    def keys_of(self, request_id: object) -> list[Key]:
        return list(self.by_request.get(request_id, ()))

    def due(self, now: float, interval: float) -> list[Key]:
        """Results sent but not acknowledged within `interval` (unsent ones go with the
        next batch)."""
        return [k for k, e in self.entries.items() if e.sent_at and now - e.sent_at >= interval]

    def pending_keys(self) -> list[Key]:
        return list(self.entries)


def batches(outbox: Outbox, keys: list[Key]) -> list[list[Key]]:
    """`keys` (not alone) cut into message-sized batches, in order."""
    out: list[list[Key]] = []
    size = 0
    for key in keys:
        msg = outbox.entries[key].msg
        n = len(msg["result"]) + len(msg["log"]) + len(msg["error"])
        if not out or len(out[-1]) >= BATCH_RESULTS or size + n > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(key)
        size += n
    return out
