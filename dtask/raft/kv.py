"""A small replicated key-value store: the state machine of the Raft simulator, of the
real-process tests and of `dtask dev` until the scheduler's state machine exists.

Commands are msgpack arrays `[op, key, value]`; `apply` is deterministic.
"""

from __future__ import annotations

import msgpack


class KVStore:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def apply(self, index: int, command: bytes) -> object:
        if not command:
            return None  # a leader's no-op entry
        op, key, value = msgpack.unpackb(command)
        current = self.data.get(key)
        if op == "put":
            self.data[key] = value
            return None
        if op == "append":
            self.data[key] = (current or "") + value
            return None
        if op == "cas":
            expected, new = value
            if current == expected:
                self.data[key] = new
                return True
            return False
        if op == "get":
            return current
        raise ValueError(f"unknown kv op {op!r}")

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def snapshot(self) -> bytes:
        return msgpack.packb(sorted(self.data.items()))

    def restore(self, data: bytes) -> None:
        self.data = dict(msgpack.unpackb(data)) if data else {}


def command(op: str, key: str, value: object = None) -> bytes:
    return msgpack.packb([op, key, value])
