"""The segmented Raft log: round trips, truncation, compaction, recovery, corruption."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtask.raft.log import CorruptLogError, SegmentedLog
from dtask.raft.messages import Entry, EntryType

SMALL = 256  # segment_bytes that gives a new segment every few records


def ents(lo: int, hi: int, term: int = 1) -> list[Entry]:
    """Entries lo..hi inclusive; data encodes index and term so mix-ups show."""
    return [Entry(term, i, EntryType.NORMAL, b"e%dt%d" % (i, term) * 3) for i in range(lo, hi + 1)]


def segs(d: Path) -> list[Path]:
    return sorted(d.glob("*.seg"))


def seg_first(p: Path) -> int:
    return int(p.name.split(".")[0])


def crash_copy(src: Path, dst: Path) -> Path:
    """What a crash right now would leave: the files as they are (unsynced rows are in memory)."""
    shutil.copytree(src, dst)
    return dst


def used_end(p: Path) -> int:
    """End of the written data; segments are zero-filled beyond it. Data never ends in a zero."""
    return len(p.read_bytes().rstrip(b"\0"))


def filled(d: Path, upto: int, batch: int = 3, segment_bytes: int = SMALL) -> SegmentedLog:
    log = SegmentedLog(d, segment_bytes=segment_bytes)
    for lo in range(1, upto + 1, batch):
        log.append(ents(lo, min(lo + batch - 1, upto)))
        log.sync()
    return log


def test_append_and_read_back_across_many_segments(tmp_path: Path) -> None:
    log = filled(tmp_path, 100)
    assert len(segs(tmp_path)) > 10
    assert (log.first_index, log.last_index) == (1, 100)
    assert log.read_all() == ents(1, 100)
    log.close()
    reopened = SegmentedLog(tmp_path, segment_bytes=SMALL)
    assert (reopened.first_index, reopened.last_index) == (1, 100)
    assert reopened.read_all() == ents(1, 100)
    # Segment names state their first index, in order.
    firsts = [seg_first(p) for p in segs(tmp_path)]
    assert firsts[0] == 1 and firsts == sorted(firsts)
    reopened.close()


def test_empty_log_starts_at_start_index(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, start_index=42)
    assert (log.first_index, log.last_index) == (42, 41)
    assert log.read_all() == []
    with pytest.raises(ValueError):
        log.append(ents(1, 1))
    log.append(ents(42, 43))
    log.close()
    assert SegmentedLog(tmp_path, start_index=7).read_all() == ents(42, 43)


def test_append_rejects_gaps_and_non_consecutive_entries(tmp_path: Path) -> None:
    log = filled(tmp_path, 5)
    with pytest.raises(ValueError):
        log.append(ents(7, 8))
    with pytest.raises(ValueError):
        log.append([Entry(1, 6), Entry(1, 8)])
    assert log.last_index == 5 and log.read_all() == ents(1, 5)


def test_unsynced_entries_are_lost_by_a_crash_but_close_syncs(tmp_path: Path) -> None:
    log = filled(tmp_path / "a", 10)
    log.append(ents(11, 20))
    assert log.read_all() == ents(1, 20)  # visible before they are durable
    crashed = SegmentedLog(crash_copy(tmp_path / "a", tmp_path / "b"), segment_bytes=SMALL)
    assert crashed.read_all() == ents(1, 10)
    log.close()
    assert SegmentedLog(tmp_path / "a", segment_bytes=SMALL).read_all() == ents(1, 20)


def test_truncate_mid_segment_then_append(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path)  # one big segment
    log.append(ents(1, 30))
    log.sync()
    log.append(ents(15, 18, term=2))
    log.sync()
    assert log.last_index == 18
    assert log.read_all() == ents(1, 14) + ents(15, 18, term=2)
    log.append(ents(19, 22, term=2))
    log.sync()
    log.close()
    log = SegmentedLog(tmp_path)
    assert log.read_all() == ents(1, 14) + ents(15, 22, term=2)
    assert len(segs(tmp_path)) == 1


def test_truncate_unsynced_suffix(tmp_path: Path) -> None:
    log = filled(tmp_path, 10)
    log.append(ents(11, 20))
    log.append(ents(16, 17, term=3))
    assert log.read_all() == ents(1, 15) + ents(16, 17, term=3)
    log.close()
    assert SegmentedLog(tmp_path).read_all() == ents(1, 15) + ents(16, 17, term=3)


def test_truncate_across_segments_then_append(tmp_path: Path) -> None:
    log = filled(tmp_path, 60)
    log.append(ents(10, 11, term=2))
    # Segments wholly above the truncation point are gone at once.
    assert all(seg_first(p) <= 10 for p in segs(tmp_path))
    log.sync()
    log.append(ents(12, 40, term=2))  # enough to roll new segments again
    log.sync()
    want = ents(1, 9) + ents(10, 40, term=2)
    assert log.read_all() == want
    log.append(ents(11, 11, term=4))  # truncate again, into the overlay written above
    log.sync()
    want = ents(1, 9) + ents(10, 10, term=2) + ents(11, 11, term=4)
    assert log.read_all() == want
    log.close()
    reopened = SegmentedLog(tmp_path, segment_bytes=SMALL)
    assert reopened.read_all() == want
    assert reopened.last_index == 11


def test_truncate_whole_log(tmp_path: Path) -> None:
    log = filled(tmp_path, 30)
    log.append(ents(1, 2, term=5))
    log.close()
    assert SegmentedLog(tmp_path, segment_bytes=SMALL).read_all() == ents(1, 2, term=5)


def test_crash_after_truncation_leaves_a_prefix_of_the_old_log(tmp_path: Path) -> None:
    log = filled(tmp_path / "a", 60)
    log.append(ents(20, 21, term=2))
    got = SegmentedLog(crash_copy(tmp_path / "a", tmp_path / "b"), segment_bytes=SMALL).read_all()
    assert len(got) >= 19
    assert got == ents(1, 60)[: len(got)]


def test_compact_deletes_only_whole_old_segments(tmp_path: Path) -> None:
    log = filled(tmp_path, 60)
    before = {seg_first(p) for p in segs(tmp_path)}
    log.compact(25)
    after = {seg_first(p) for p in segs(tmp_path)}
    assert after < before
    assert log.first_index in after and log.first_index <= 26
    assert min(after) == log.first_index
    # Each deleted segment ended at or below 25: the next segment starts at or below 26.
    ordered = sorted(before)
    for first in before - after:
        assert ordered[ordered.index(first) + 1] <= 26
    got = log.read_all()
    assert got == ents(log.first_index, 60)
    log.compact(1000)  # the tail segment always stays
    assert len(segs(tmp_path)) == 1 and log.last_index == 60
    log.close()
    reopened = SegmentedLog(tmp_path, segment_bytes=SMALL)
    assert reopened.read_all() == ents(reopened.first_index, 60)
    assert reopened.read_all()[-1].index == 60


def test_reset(tmp_path: Path) -> None:
    log = filled(tmp_path, 30)
    log.append(ents(31, 35))  # unsynced: dropped too
    log.reset(1000)
    assert (log.first_index, log.last_index) == (1000, 999)
    assert [p.name for p in segs(tmp_path)] == ["00000000000000001000.seg"]
    assert log.read_all() == []
    log.append(ents(1000, 1002))
    log.close()
    reopened = SegmentedLog(tmp_path)
    assert reopened.read_all() == ents(1000, 1002)
    assert reopened.first_index == 1000


def test_reset_below_existing_segments(tmp_path: Path) -> None:
    log = filled(tmp_path, 30)
    log.reset(5)
    log.append(ents(5, 6, term=9))
    log.close()
    assert SegmentedLog(tmp_path).read_all() == ents(5, 6, term=9)


def test_crash_inside_reset_discards_segments_before_the_new_base(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = filled(tmp_path / "a", 30)
    log.close()
    old = {p.name: p.read_bytes() for p in segs(tmp_path / "a")}
    log = SegmentedLog(tmp_path / "a")
    log.reset(500)
    log.close()
    for name, data in old.items():  # as if the crash came before they were unlinked
        (tmp_path / "a" / name).write_bytes(data)
    with caplog.at_level(logging.WARNING):
        log = SegmentedLog(tmp_path / "a")
    assert (log.first_index, log.read_all()) == (500, [])
    assert [p.name for p in segs(tmp_path / "a")] == ["00000000000000000500.seg"]
    assert "superseded by a reset" in caplog.text


def _last_record_span(tmp_path: Path) -> tuple[Path, int, int]:
    """A log whose last segment ends with a known record; returns (file, start, end)."""
    log = SegmentedLog(tmp_path)
    log.append(ents(1, 10))
    log.sync()
    tail = segs(tmp_path)[-1]
    start = used_end(tail)
    log.append(ents(11, 15))
    log.sync()
    log.close()
    return tail, start, used_end(tail)


def test_torn_tail_at_every_offset_recovers_last_whole_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tail, start, end = _last_record_span(tmp_path / "orig")
    data = tail.read_bytes()
    for cut in range(start + 1, end):
        for how, torn in (("short", data[:cut]), ("zeroed", data[:cut] + bytes(len(data) - cut))):
            d = tmp_path / f"{how}{cut}"
            d.mkdir()
            (d / tail.name).write_bytes(torn)
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                log = SegmentedLog(d)
            assert log.read_all() == ents(1, 10), (how, cut)
            assert log.last_index == 10
            warned = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warned) == 1 and tail.name in warned[0].getMessage()
            assert f"offset {start}" in warned[0].getMessage()
            log.close()
            shutil.rmtree(d)


def test_torn_tail_is_repaired_and_appending_continues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tail, start, end = _last_record_span(tmp_path)
    data = bytearray(tail.read_bytes())
    data[end : end + 40] = os.urandom(39) + b"!"  # garbage after the last record, then zeros
    tail.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        log = SegmentedLog(tmp_path)
    assert f"offset {end}: dropped 40 bytes" in caplog.text
    assert log.read_all() == ents(1, 15)
    log.append(ents(16, 16))
    log.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        log = SegmentedLog(tmp_path)
    assert log.read_all() == ents(1, 16)
    assert caplog.text == ""  # the garbage was cleared, not just skipped


def test_crc_flip_in_a_middle_segment_raises(tmp_path: Path) -> None:
    filled(tmp_path, 60).close()
    victim = segs(tmp_path)[len(segs(tmp_path)) // 2]
    data = bytearray(victim.read_bytes())
    data[used_end(victim) - 2] ^= 0x01  # inside the last record's payload
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError) as err:
        SegmentedLog(tmp_path, segment_bytes=SMALL)
    msg = str(err.value)
    assert victim.name in msg and "offset" in msg and "\n" not in msg


def test_bad_record_followed_by_valid_ones_in_last_segment_raises(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path)
    log.append(ents(1, 5))
    log.sync()
    first_end = used_end(segs(tmp_path)[0])
    for lo in range(6, 20, 2):
        log.append(ents(lo, lo + 1))
        log.sync()
    log.close()
    p = segs(tmp_path)[0]
    data = bytearray(p.read_bytes())
    data[first_end - 3] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match=rf"{p.name} at offset \d+"):
        SegmentedLog(tmp_path)


def test_gap_between_segments_raises(tmp_path: Path) -> None:
    filled(tmp_path, 60).close()
    files = segs(tmp_path)
    files[3].unlink()
    with pytest.raises(CorruptLogError) as err:
        SegmentedLog(tmp_path, segment_bytes=SMALL)
    assert files[4].name in str(err.value)


def test_bad_segment_header_raises(tmp_path: Path) -> None:
    filled(tmp_path, 20).close()
    p = segs(tmp_path)[1]
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match=p.name):
        SegmentedLog(tmp_path, segment_bytes=SMALL)


def test_leftover_segment_temp_file_is_removed(tmp_path: Path) -> None:
    filled(tmp_path, 10).close()
    (tmp_path / "00000000000000000099.seg.tmp").write_bytes(b"half a segment")
    log = SegmentedLog(tmp_path, segment_bytes=SMALL)
    assert log.read_all() == ents(1, 10)
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------ model check

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 8), st.integers(1, 6)),
        st.just(("sync",)),
        st.tuples(st.just("compact"), st.integers(0, 20)),
        st.tuples(st.just("reset"), st.integers(-3, 3)),
        st.just(("reopen",)),
        st.just(("crash",)),
    ),
    max_size=30,
)


class _Model:
    """The log as a Python list, plus what a crash must keep and may show."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.first = 1
        self.synced: dict[int, Entry] = {}
        self.safe_last = 0  # a crash keeps at least entries up to here

    @property
    def last(self) -> int:
        return self.first + len(self.entries) - 1

    def append(self, new: list[Entry]) -> None:
        at = new[0].index
        self.safe_last = min(self.safe_last, at - 1)
        self.entries = self.entries[: at - self.first] + new

    def sync(self) -> None:
        self.synced = {e.index: e for e in self.entries}
        self.safe_last = self.last


def _run_ops(root: Path, ops: list[tuple]) -> None:
    d, gen, term = root / "0", 0, 1
    log, model = SegmentedLog(d, segment_bytes=128), _Model()
    for op in ops:
        if op[0] == "append":
            term += 1
            lo = max(model.first, model.last + 1 - op[1])
            batch = ents(lo, lo + op[2] - 1, term)
            log.append(batch)
            model.append(batch)
        elif op[0] == "sync":
            log.sync()
            model.sync()
        elif op[0] == "compact":
            upto, old_first = model.first + op[1], log.first_index
            log.compact(upto)
            assert old_first <= log.first_index <= max(old_first, upto + 1)
            model.entries = model.entries[log.first_index - model.first :]
            model.first = log.first_index
        elif op[0] == "reset":
            nxt = max(1, model.last + 1 + op[1])
            log.reset(nxt)
            model.entries, model.first = [], nxt
            model.sync()
        elif op[0] == "reopen":
            log.close()
            model.sync()
            log = SegmentedLog(d, segment_bytes=128)
        else:  # crash: continue from what the disk holds
            gen += 1
            d = crash_copy(d, root / str(gen))
            log.close()
            log = SegmentedLog(d, segment_bytes=128)
            got = log.read_all()
            assert log.first_index == model.first
            assert log.last_index >= model.safe_last
            assert all(model.synced[e.index] == e for e in got)
            model.entries, model.synced = got, {e.index: e for e in got}
            model.safe_last = log.last_index
        assert (log.first_index, log.last_index) == (model.first, model.last)
    assert log.read_all() == model.entries
    log.close()
    assert SegmentedLog(d, segment_bytes=128).read_all() == model.entries


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_random_operations_match_a_list_model(ops: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as root:
        _run_ops(Path(root), ops)
