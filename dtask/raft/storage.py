"""One Raft node's durable state: hard state, latest snapshot, and the log.

Layout under data_dir: `hardstate` and `snapshot` (each replaced atomically:
temp file, fsync, rename, fsync directory) and `log/` (a SegmentedLog). Both
files are framed as magic, meta length, data length, CRC32 over meta and data,
then msgpack meta and raw data, so a damaged file is detected, never misread.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib

import msgpack

from dtask.raft.log import CorruptLogError, SegmentedLog, fsync_dir
from dtask.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta

_FRAME = struct.Struct("<4sIQI")  # magic, meta length, data length, crc32(meta + data)
_HS_MAGIC = b"DHS1"
_SNAP_MAGIC = b"DSN1"


class DiskStorage:
    """Hard state, snapshot and log of one node, in one directory."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        segment_bytes: int = 64 << 20,
        logger: logging.Logger | None = None,
    ) -> None:
        self._dir = os.fspath(data_dir)
        self._logger = logger or logging.getLogger(__name__)
        os.makedirs(self._dir, exist_ok=True)
        for name in ("hardstate", "snapshot", "snapshot.fork"):
            # A temp file is a write that crashed before its rename: the old file stands.
            tmp = self._path(name) + ".tmp"
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._snap = self._read_snapshot()
        self._snap_cached = True  # load() uses the copy read here, once
        start = self._snap.meta.index + 1 if self._snap else 1
        self.log = SegmentedLog(
            os.path.join(self._dir, "log"),
            start_index=start,
            segment_bytes=segment_bytes,
            logger=self._logger,
        )

    def load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        """Everything needed to restart: entries are those after the snapshot only."""
        hs = self._read_hard_state()
        # Hand over the copy read at startup rather than pin a large snapshot in memory.
        snap = self._snap if self._snap_cached else self._read_snapshot()
        self._snap, self._snap_cached = None, False
        entries = self.log.read_all()
        if snap is None:
            if self.log.first_index > 1:
                raise CorruptLogError(
                    f"{self.log_dir}: log starts at index {self.log.first_index} "
                    "but there is no snapshot"
                )
            return hs, None, entries
        return hs, snap, self._entries_after(snap, entries)

    def save_hard_state(self, hs: HardState) -> None:
        self._write_atomic("hardstate", _HS_MAGIC, [hs.term, hs.vote], b"")

    def append(self, entries: list[Entry]) -> None:
        self.log.append(entries)

    def sync(self) -> None:
        self.log.sync()

    def save_snapshot(self, snap: Snapshot) -> None:
        self._write_atomic("snapshot", _SNAP_MAGIC, _snap_meta(snap.meta), snap.data)

    def compact(self, upto_index: int) -> None:
        """Drop log segments wholly at or below upto_index (a snapshot covers them)."""
        self.log.compact(upto_index)

    def install_snapshot(self, snap: Snapshot) -> None:
        """A snapshot from the leader replaces the whole log."""
        self.save_snapshot(snap)
        self.log.reset(snap.meta.index + 1)

    def close(self) -> None:
        self.log.close()

    @property
    def log_dir(self) -> str:
        return os.path.join(self._dir, "log")

    # --------------------------------------------------------------- helpers

    def _entries_after(self, snap: Snapshot, entries: list[Entry]) -> list[Entry]:
        index, log = snap.meta.index, self.log
        if log.first_index > index + 1:
            raise CorruptLogError(
                f"{self.log_dir}: log starts at index {log.first_index}, "
                f"after the snapshot at {index} (entries {index + 1}.. are missing)"
            )
        at = index - log.first_index
        stale = log.last_index < index or (at >= 0 and entries[at].term != snap.meta.term)
        if stale:
            # A crash inside install_snapshot, or a log that disagrees with the snapshot
            # at its index: only the snapshot is trustworthy (Raft section 7).
            self._logger.warning(
                "raft storage: log %d..%d does not extend snapshot %d/%d; dropping it",
                log.first_index, log.last_index, index, snap.meta.term,
            )
            log.reset(index + 1)
            return []
        return entries[index + 1 - log.first_index :]

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def _write_atomic(self, name: str, magic: bytes, meta: list, data: bytes) -> None:
        path = self._path(name)
        _write_framed(path + ".tmp", magic, meta, data)
        os.replace(path + ".tmp", path)
        self._sync_dir()

    def _sync_dir(self) -> None:
        fsync_dir(self._dir)

    # --------------------------------------------------------------- forked snapshots

    @property
    def forked_snapshot_path(self) -> str:
        """Where a forked child writes a snapshot before `commit_forked_snapshot`."""
        return self._path("snapshot.fork.tmp")

    @staticmethod
    def write_snapshot_file(path: str, meta: SnapshotMeta, data: bytes) -> None:
        """Write a complete, fsynced snapshot file (runs in a forked child)."""
        _write_framed(path, _SNAP_MAGIC, _snap_meta(meta), data)

    def commit_forked_snapshot(self, meta: SnapshotMeta) -> Snapshot:
        """Make the child's file the snapshot; its data is read lazily from the file."""
        os.replace(self.forked_snapshot_path, self._path("snapshot"))
        self._sync_dir()
        return Snapshot(meta, FileBytes(self._path("snapshot"), meta))

    def _read_framed(self, name: str, magic: bytes) -> tuple[object, bytes] | None:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                buf = f.read()
        except FileNotFoundError:
            return None
        if len(buf) < _FRAME.size:
            raise CorruptLogError(f"{path} at offset 0: file is {len(buf)} bytes, too short")
        fmagic, mlen, dlen, crc = _FRAME.unpack_from(buf)
        if fmagic != magic:
            raise CorruptLogError(f"{path} at offset 0: bad magic {fmagic!r}")
        if _FRAME.size + mlen + dlen != len(buf):
            raise CorruptLogError(f"{path} at offset 0: lengths do not match the file size")
        view = memoryview(buf)[_FRAME.size :]
        if zlib.crc32(view[mlen:], zlib.crc32(view[:mlen])) != crc:
            raise CorruptLogError(f"{path} at offset {_FRAME.size}: CRC mismatch")
        return msgpack.unpackb(view[:mlen]), bytes(view[mlen:])

    def _read_hard_state(self) -> HardState:
        got = self._read_framed("hardstate", _HS_MAGIC)
        if got is None:
            return HardState()
        meta, _ = got
        if not (isinstance(meta, list) and len(meta) == 2 and all(_is_uint(v) for v in meta)):
            raise CorruptLogError(f"{self._path('hardstate')} at offset {_FRAME.size}: bad fields")
        return HardState(term=meta[0], vote=meta[1])

    def _read_snapshot(self) -> Snapshot | None:
        got = self._read_framed("snapshot", _SNAP_MAGIC)
        if got is None:
            return None
        meta, data = got
        try:
            index, term, voters, learners = meta  # type: ignore[misc]
            if not (_is_uint(index) and _is_uint(term)):
                raise ValueError("index and term must be non-negative integers")
            conf = ConfState(tuple(voters), tuple(learners))
        except (TypeError, ValueError) as exc:
            path = self._path("snapshot")
            raise CorruptLogError(f"{path} at offset {_FRAME.size}: bad meta ({exc})") from None
        return Snapshot(SnapshotMeta(index, term, conf), data)


def _is_uint(v: object) -> bool:
    return type(v) is int and v >= 0


def _snap_meta(m: SnapshotMeta) -> list:
    return [m.index, m.term, list(m.conf.voters), list(m.conf.learners)]


def _write_framed(path: str, magic: bytes, meta: list, data: bytes) -> None:
    packed = msgpack.packb(meta, use_bin_type=True)
    crc = zlib.crc32(data, zlib.crc32(packed))
    with open(path, "wb") as f:
        f.write(_FRAME.pack(magic, len(packed), len(data), crc))
        f.write(packed)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class FileBytes:
    """A snapshot's data left in its file: sliced on demand (InstallSnapshot chunks)
    instead of held in memory; the leader rarely needs more than a few chunks."""

    def __init__(self, path: str, meta: SnapshotMeta) -> None:
        # Keep the file open: a newer snapshot replaces the name, not this inode, and
        # a follower may still be receiving this one.
        self.fd = os.open(path, os.O_RDONLY)
        _, mlen, dlen, _ = _FRAME.unpack(os.pread(self.fd, _FRAME.size, 0))
        self.start, self.length = _FRAME.size + mlen, dlen

    def __del__(self) -> None:
        os.close(self.fd)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> bytes:
        lo, hi, _ = key.indices(self.length)
        return os.pread(self.fd, max(0, hi - lo), self.start + lo)

    def __bytes__(self) -> bytes:
        return self[0:self.length]
