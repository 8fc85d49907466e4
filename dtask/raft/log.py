"""Durable, append-only, segmented Raft log.

A directory of segment files named by the index of their first entry
(`00000000000000000001.seg`), so sorting names sorts the log. A segment is a
20-byte header (magic, version, flags, first index, CRC) followed by records;
a record holds the entries of one `sync()` — a 24-byte header (magic, payload
length, first index, entry count, CRC32 over header and payload) and a msgpack
array of `[term, type, data]` rows (the index is implied by position).

Writes happen only in `sync()`, one record per call, so a crash can tear only
the last record of the last segment; anything bad before that is corruption.
A record whose first index is at or below the previous record's last index
replaces the log from that index on: truncation is itself an append, atomic
under the record's CRC, and never rewrites bytes that were already durable.
Segments are zero-filled ahead of the write position (overwriting written
blocks makes fdatasync about twice as cheap as growing the file).

Not thread-safe: one owner calls every method. An OSError from sync() means
the kernel may have dropped the written pages: stop and recover by reopening.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass

import msgpack

from dtask.raft.messages import Entry

_SEG_HEAD = struct.Struct("<4sHHQI")  # magic, version, flags, first index, crc of the rest
_SEG_MAGIC = b"DTLG"
_VERSION = 1
_BASE = 1  # flag: this segment starts a fresh log (reset); segments before it are stale
_REC_HEAD = struct.Struct("<4sIQII")  # magic, payload length, first index, count, crc
_REC_MAGIC = b"\xd7Rc\x01"
_REC_CRC_AT = _REC_HEAD.size - 4
_PREALLOC = 1 << 20  # zero-fill this far ahead: one size change (metadata sync) per MiB
_MAX_PAYLOAD = (1 << 32) - 1
_SEG_NAME = re.compile(r"^(\d{20})\.seg$")
_fdatasync = getattr(os, "fdatasync", os.fsync)


class CorruptLogError(Exception):
    """The log on disk is damaged somewhere a crash cannot explain."""


@dataclass(slots=True)
class _Segment:
    first: int  # index of its first entry (also in the file name and header)
    path: str
    end: int  # offset where the next record goes
    alloc: int  # file length; bytes from `end` on are zeros


class SegmentedLog:
    """The Raft log on disk. `first_index` and `last_index` are read-only."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        start_index: int = 1,
        segment_bytes: int = 64 << 20,
        logger: logging.Logger | None = None,
    ) -> None:
        self._dir = os.fspath(directory)
        self._seg_bytes = segment_bytes
        self._chunk = max(4096, min(_PREALLOC, segment_bytes))
        self._logger = logger or logging.getLogger(__name__)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._rows: list[list] = []  # appended, not yet written: [term, type, data]
        self._pend_first = 0  # index of self._rows[0]
        self._fd = -1
        os.makedirs(self._dir, exist_ok=True)
        self._segs, last = self._recover()
        if not self._segs:
            self._segs = [self._create_segment(start_index, base=True)]
            last = start_index - 1
        self.first_index: int = self._segs[0].first
        self.last_index: int = last
        self._durable_last = last  # last index written by a finished sync()
        self._open_tail()

    # ----------------------------------------------------------------- public

    def read_all(self) -> list[Entry]:
        """Every entry present, in order, including appended but unsynced ones."""
        out: list[Entry] = []
        for seg in self._segs:
            self._scan(seg, _read(seg.path), out)
        if self._rows:  # they may overlay (truncate) what is on disk
            del out[self._pend_first - self.first_index :]
        out.extend(
            Entry(t, i, ty, d) for i, (t, ty, d) in enumerate(self._rows, self._pend_first)
        )
        return out

    def append(self, entries: list[Entry]) -> None:
        """Buffer contiguous entries, truncating the log from entries[0].index first."""
        if not entries:
            return
        first = entries[0].index
        if first > self.last_index + 1:
            raise ValueError(f"entry {first} would leave a gap after {self.last_index}")
        if first < self.first_index:
            raise ValueError(f"entry {first} is before the log's first index {self.first_index}")
        for i, e in enumerate(entries, first):
            if e.index != i:
                raise ValueError(f"entries must have consecutive indexes: {e.index} at {i}")
        if first <= self.last_index:
            self._truncate(first)
        if not self._rows:
            self._pend_first = first
        self._rows += [[e.term, e.type, e.data] for e in entries]
        self.last_index = first + len(entries) - 1

    def sync(self) -> None:
        """Write everything appended as one record and fdatasync it (group commit)."""
        if not self._rows:
            return
        payload = self._packer.pack(self._rows)
        if len(payload) > _MAX_PAYLOAD:
            raise ValueError(f"{len(self._rows)} entries make a {len(payload)}-byte record")
        first, count = self._pend_first, len(self._rows)
        head = _REC_HEAD.pack(_REC_MAGIC, len(payload), first, count, 0)[:_REC_CRC_AT]
        crc = zlib.crc32(payload, zlib.crc32(head))
        size = _REC_HEAD.size + len(payload)
        tail = self._segs[-1]
        # An overlay (truncating) record must land in the segment it truncates.
        if (
            tail.end > _SEG_HEAD.size
            and tail.end + size > self._seg_bytes
            and first == self._durable_last + 1
        ):
            tail = self._roll(first)
        self._write(tail, [head, struct.pack("<I", crc), payload])
        _fdatasync(self._fd)
        tail.end += size
        self._durable_last = self.last_index
        self._rows = []

    def compact(self, upto_index: int) -> None:
        """Delete whole segments whose entries are all <= upto_index (never the tail)."""
        n = 0
        while n < len(self._segs) - 1 and self._segs[n + 1].first - 1 <= upto_index:
            n += 1
        for seg in self._segs[:n]:
            # Oldest first, each durable, so a crash never leaves a hole in the middle.
            os.unlink(seg.path)
            self._sync_dir()
        del self._segs[:n]
        self.first_index = self._segs[0].first

    def reset(self, next_index: int) -> None:
        """Drop every entry; the next append starts at next_index. Durable on return."""
        self._rows = []
        self._close_fd()
        # Newer segments go first so that a crash leaves a prefix of the old log...
        while self._segs and self._segs[-1].first >= next_index:
            os.unlink(self._segs.pop().path)
            self._sync_dir()
        # ...and the new base segment is the commit point: recovery drops what precedes it.
        new = self._create_segment(next_index, base=True)
        for seg in self._segs:
            os.unlink(seg.path)
        self._sync_dir()
        self._segs = [new]
        self.first_index = next_index
        self.last_index = self._durable_last = next_index - 1
        self._open_tail()

    def close(self) -> None:
        """Sync what was appended, then release the file."""
        if self._fd >= 0:
            self.sync()
            self._close_fd()

    # --------------------------------------------------------------- writing

    def _truncate(self, index: int) -> None:
        if self._rows and index >= self._pend_first:
            del self._rows[index - self._pend_first :]
        else:
            # The next sync writes an overlay record into the segment holding `index`;
            # later segments go now, newest first, so a crash leaves a prefix of the log.
            self._rows = []
            if self._segs[-1].first > index:
                self._close_fd()
                while self._segs[-1].first > index:
                    seg = self._segs.pop()
                    os.unlink(seg.path)
                    self._sync_dir()
                    self._durable_last = seg.first - 1
                self._open_tail()
        self.last_index = index - 1

    def _write(self, seg: _Segment, parts: list[bytes]) -> None:
        end = alloc = seg.end + sum(len(p) for p in parts)
        if end > seg.alloc:
            alloc = -(-end // self._chunk) * self._chunk
            parts.append(bytes(alloc - end))
        if os.pwritev(self._fd, parts, seg.end) != alloc - seg.end:
            raise OSError(f"short write to {seg.path} at offset {seg.end}")
        seg.alloc = max(seg.alloc, alloc)

    def _roll(self, first: int) -> _Segment:
        # Every earlier record was fdatasynced by its own sync(): nothing to flush here.
        seg = self._create_segment(first, base=False)
        self._close_fd()
        self._segs.append(seg)
        self._open_tail()
        return seg

    def _create_segment(self, first: int, *, base: bool) -> _Segment:
        # Built under a temp name and renamed, so a segment never has a torn header.
        path = os.path.join(self._dir, f"{first:020d}.seg")
        head = _SEG_HEAD.pack(_SEG_MAGIC, _VERSION, _BASE if base else 0, first, 0)
        head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
        alloc = self._chunk
        with open(path + ".tmp", "wb") as f:
            f.write(head + bytes(alloc - len(head)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        self._sync_dir()
        return _Segment(first, path, len(head), alloc)

    def _open_tail(self) -> None:
        self._fd = os.open(self._segs[-1].path, os.O_RDWR)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _sync_dir(self) -> None:
        fsync_dir(self._dir)

    # -------------------------------------------------------------- recovery

    def _recover(self) -> tuple[list[_Segment], int]:
        """Validate every segment; repair a torn tail. Returns (segments, last index)."""
        segs = []
        for name in sorted(os.listdir(self._dir)):
            path = os.path.join(self._dir, name)
            if name.endswith(".seg.tmp"):
                os.unlink(path)  # a segment whose creation crashed: never part of the log
            elif m := _SEG_NAME.match(name):
                segs.append((int(m.group(1)), path, _read_head(path, int(m.group(1)))))
        segs.sort()
        bases = [i for i, (_, _, flags) in enumerate(segs) if flags & _BASE]
        if bases and bases[-1] > 0:
            self._drop_stale(segs[: bases[-1]])
            segs = segs[bases[-1] :]
        out, last = [], 0
        for i, (first, path, _) in enumerate(segs):
            if out and first != last + 1:
                raise CorruptLogError(
                    f"{path} at offset 0: segment starts at index {first} "
                    f"but the previous one ends at {last}"
                )
            seg = _Segment(first, path, 0, 0)
            last = self._recover_segment(seg, tail=i == len(segs) - 1)
            out.append(seg)
        return out, last

    def _drop_stale(self, stale: list) -> None:
        # Leftovers of a reset() that crashed after creating its base segment.
        for _, path, _ in stale:
            self._logger.warning("raft log: removing %s, superseded by a reset", path)
            os.unlink(path)
        self._sync_dir()

    def _recover_segment(self, seg: _Segment, *, tail: bool) -> int:
        buf = _read(seg.path)
        last, pos = self._scan(seg, buf, None)
        dirty = pos + len(buf[pos:].rstrip(b"\0"))
        if dirty > pos:
            if not tail or _find_record(buf, pos + 1) is not None:
                raise CorruptLogError(f"{seg.path} at offset {pos}: corrupt record")
            self._logger.warning(
                "raft log: torn tail in %s at offset %d: dropped %d bytes",
                seg.path, pos, dirty - pos,
            )
            _zero_fill(seg.path, pos, dirty - pos)
        seg.end, seg.alloc = pos, len(buf)
        return last

    def _scan(self, seg: _Segment, buf: bytes, out: list[Entry] | None) -> tuple[int, int]:
        """Walk seg's valid records; decode into `out` if given. Returns (last, end)."""
        pos, last = _SEG_HEAD.size, seg.first - 1
        view = memoryview(buf)
        while (rec := _parse_record(view, pos)) is not None:
            first, count, start, end = rec
            if not seg.first <= first <= last + 1:
                raise CorruptLogError(
                    f"{seg.path} at offset {pos}: record starts at index {first}, "
                    f"expected {seg.first}..{last + 1}"
                )
            if out is not None:
                rows = msgpack.unpackb(view[start:end], use_list=False)
                if len(rows) != count:
                    raise CorruptLogError(f"{seg.path} at offset {pos}: entry count mismatch")
                del out[first - self.first_index :]
                out.extend(Entry(t, i, ty, d) for i, (t, ty, d) in enumerate(rows, first))
            last, pos = first + count - 1, end
        return last, pos


def _read_head(path: str, first: int) -> int:
    """Check a segment's header against its name; return its flags."""
    with open(path, "rb") as f:
        head = f.read(_SEG_HEAD.size)
    if len(head) < _SEG_HEAD.size:
        raise CorruptLogError(f"{path} at offset 0: short segment header")
    magic, version, flags, hfirst, crc = _SEG_HEAD.unpack(head)
    if magic != _SEG_MAGIC or crc != zlib.crc32(head[:-4]):
        raise CorruptLogError(f"{path} at offset 0: bad segment header")
    if version != _VERSION:
        raise CorruptLogError(f"{path} at offset 0: unsupported version {version}")
    if hfirst != first:
        raise CorruptLogError(f"{path} at offset 0: header says first index {hfirst}")
    return flags


def _parse_record(view: memoryview, pos: int) -> tuple[int, int, int, int] | None:
    """(first index, count, payload start, end) of a valid record at pos, else None."""
    if pos + _REC_HEAD.size > len(view):
        return None
    magic, length, first, count, crc = _REC_HEAD.unpack_from(view, pos)
    start = pos + _REC_HEAD.size
    end = start + length
    if magic != _REC_MAGIC or end > len(view):
        return None
    if zlib.crc32(view[start:end], zlib.crc32(view[pos : pos + _REC_CRC_AT])) != crc:
        return None
    return first, count, start, end


def _find_record(buf: bytes, pos: int) -> int | None:
    """Offset of the first valid record at or after pos: proof of mid-log damage."""
    view = memoryview(buf)
    while (pos := buf.find(_REC_MAGIC, pos)) >= 0:
        if _parse_record(view, pos) is not None:
            return pos
        pos += 1
    return None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _zero_fill(path: str, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(length), offset)
        _fdatasync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (created, renamed, deleted files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
