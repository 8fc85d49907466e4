"""A node's durable state: hard state, snapshot, and the log after the snapshot."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dtask.raft.log import CorruptLogError, SegmentedLog
from dtask.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from dtask.raft.storage import DiskStorage


def ents(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, 0, f"cmd{i}".encode()) for i in range(lo, hi + 1)]


def snap(index: int, term: int = 1, data: bytes = b"state") -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, ConfState((1, 2, 3), (7,))), data)


def test_fresh_directory_loads_empty_state(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path / "n1")
    assert st.load() == (HardState(0, 0), None, [])
    assert (tmp_path / "n1" / "log").is_dir()
    st.close()


def test_hard_state_round_trip_and_overwrite(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path)
    st.save_hard_state(HardState(term=3, vote=2))
    st.save_hard_state(HardState(term=5, vote=0))
    st.close()
    hs, _, _ = DiskStorage(tmp_path).load()
    assert hs == HardState(term=5, vote=0)


def test_snapshot_round_trip(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path)
    big = bytes(range(256)) * 4000
    st.save_snapshot(snap(0, 0))
    st.save_snapshot(snap(0, 0, big))
    st.close()
    st = DiskStorage(tmp_path)
    _, got, _ = st.load()
    assert got == snap(0, 0, big)
    assert got.meta.conf == ConfState((1, 2, 3), (7,))
    assert st.load()[1] == snap(0, 0, big)  # a second load reads it again


def test_entries_are_those_after_the_snapshot(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path, segment_bytes=256)
    for lo in range(1, 51, 5):
        st.append(ents(lo, lo + 4))
        st.sync()
    st.save_snapshot(snap(30))
    st.compact(30)
    assert st.log.first_index > 1  # whole segments went
    st.close()
    st = DiskStorage(tmp_path, segment_bytes=256)
    hs, got_snap, entries = st.load()
    assert got_snap == snap(30)
    assert entries == ents(31, 50)
    st.append(ents(51, 52))
    st.close()
    assert DiskStorage(tmp_path, segment_bytes=256).load()[2] == ents(31, 52)


def test_gap_between_snapshot_and_log_raises(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path, segment_bytes=256)
    for lo in range(1, 61, 5):
        st.append(ents(lo, lo + 4))
        st.sync()
    st.compact(40)
    first = st.log.first_index
    st.save_snapshot(snap(10))  # older than what compaction assumed
    st.close()
    with pytest.raises(CorruptLogError, match=f"starts at index {first}"):
        DiskStorage(tmp_path, segment_bytes=256).load()


def test_log_without_snapshot_must_start_at_one(tmp_path: Path) -> None:
    SegmentedLog(tmp_path / "log", start_index=9).close()
    with pytest.raises(CorruptLogError, match="no snapshot"):
        DiskStorage(tmp_path).load()


def test_install_snapshot_replaces_the_log(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path)
    st.append(ents(1, 20))
    st.sync()
    st.install_snapshot(snap(100, 4))
    assert (st.log.first_index, st.log.last_index) == (101, 100)
    st.append(ents(101, 103, term=4))
    st.sync()
    st.close()
    _, got, entries = DiskStorage(tmp_path).load()
    assert got == snap(100, 4) and entries == ents(101, 103, term=4)


def test_crash_between_snapshot_save_and_log_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    st = DiskStorage(tmp_path)
    st.append(ents(1, 20))
    st.sync()
    st.save_snapshot(snap(100, 4))  # install_snapshot died before log.reset
    st.close()
    st = DiskStorage(tmp_path)
    with caplog.at_level(logging.WARNING):
        _, got, entries = st.load()
    assert got == snap(100, 4) and entries == []
    assert st.log.last_index == 100 and "dropping" in caplog.text
    st.append(ents(101, 101, term=4))
    st.close()
    assert DiskStorage(tmp_path).load()[2] == ents(101, 101, term=4)


def test_log_disagreeing_with_snapshot_at_its_index_is_dropped(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path)
    st.append(ents(1, 20, term=1))
    st.sync()
    st.save_snapshot(snap(10, term=2))  # the leader's entry 10 had term 2, ours term 1
    st.close()
    assert DiskStorage(tmp_path).load()[2] == []


def test_log_agreeing_with_snapshot_keeps_its_suffix(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path)
    st.append(ents(1, 20, term=1))
    st.sync()
    st.save_snapshot(snap(10, term=1))
    st.close()
    assert DiskStorage(tmp_path).load()[2] == ents(11, 20)


def test_leftover_temp_files_are_ignored_and_removed(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path)
    st.save_hard_state(HardState(7, 1))
    st.save_snapshot(snap(0, 0))
    st.close()
    (tmp_path / "hardstate.tmp").write_bytes(b"half-written")
    (tmp_path / "snapshot.tmp").write_bytes(b"\x00" * 10)
    hs, got, _ = DiskStorage(tmp_path).load()
    assert hs == HardState(7, 1) and got == snap(0, 0)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name", ["snapshot", "hardstate"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_state_file_raises(tmp_path: Path, name: str, damage: str) -> None:
    st = DiskStorage(tmp_path)
    st.save_hard_state(HardState(3, 1))
    st.save_snapshot(snap(0, 0, b"x" * 1000))
    st.close()
    p = tmp_path / name
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10
    elif damage == "truncate":
        del data[-5:]
    else:
        data = bytearray()
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError) as err:
        DiskStorage(tmp_path).load()
    assert name in str(err.value) and "\n" not in str(err.value)
