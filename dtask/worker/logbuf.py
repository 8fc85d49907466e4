"""One attempt's output: bounded, with a truncation marker, streamed in chunks."""

from __future__ import annotations

MARKER_RESERVE = 64  # room kept for the marker, so the whole log fits in the bound


def marker(kept: int) -> bytes:
    return f"\n[dtask: output truncated after {kept} bytes]\n".encode()


class LogBuffer:
    """The first `limit` bytes of output (marker included); the rest is counted only.

    `unsent()` hands out what has not been streamed yet; offsets are positions in the
    final log, so a follower can stitch chunks and the final copy together.
    """

    __slots__ = ("buf", "cap", "limit", "dropped", "truncated", "sent")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cap = max(0, limit - MARKER_RESERVE)
        self.buf = bytearray()
        self.dropped = 0
        self.truncated = False
        self.sent = 0

    def write(self, data: bytes) -> None:
        if self.truncated:
            self.dropped += len(data)
            return
        room = self.cap - len(self.buf)
        if len(data) <= room:
            self.buf += data
            return
        self.buf += data[:room]
        self.dropped += len(data) - room
        self.truncated = True
        self.buf += marker(self.cap)[: self.limit - len(self.buf)]

    def pending(self) -> int:
        return len(self.buf) - self.sent

    def unsent(self) -> tuple[int, bytes]:
        """(offset, data) not streamed yet; marks it as streamed."""
        offset = self.sent
        self.sent = len(self.buf)
        return offset, bytes(self.buf[offset:])

    def value(self) -> bytes:
        return bytes(self.buf)
