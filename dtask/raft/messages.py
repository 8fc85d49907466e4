"""Raft's records (entries, hard state, snapshots, configurations) and its wire format.

Every Raft RPC is one `Message`, as in etcd's raft: a single record type whose fields
mean slightly different things per message type (documented on each field). One
shape keeps the core's code and the wire encoding small.

Wire format: one ZeroMQ frame holding a msgpack array (see `encode`/`decode`). The
first element is the wire version, so peers of different versions refuse each
other's messages with a clear error instead of misreading them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import msgpack

WIRE_VERSION = 1


class MsgType(IntEnum):
    APPEND = 1  # leader -> follower: entries after (index, log_term)
    APPEND_RESP = 2  # follower -> leader: index = last matching index, or reject + hint
    VOTE = 3  # candidate -> all: (index, log_term) = candidate's last entry
    VOTE_RESP = 4
    PRE_VOTE = 5  # like VOTE, at term + 1, without anyone changing term
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7  # leader -> follower: commit, context = read-index round
    HEARTBEAT_RESP = 8
    SNAPSHOT = 9  # leader -> follower: one chunk of a snapshot
    SNAPSHOT_RESP = 10  # follower -> leader: bytes received so far (or reject)
    TIMEOUT_NOW = 11  # leader -> transferee: campaign now, ignoring the lease


class EntryType(IntEnum):
    NORMAL = 0  # application command (data may be empty: the leader's no-op)
    CONF_CHANGE = 1  # data = encoded ConfChange


class ConfChangeType(IntEnum):
    ADD_LEARNER = 1
    PROMOTE = 2  # learner -> voter
    REMOVE = 3  # voter or learner


@dataclass(slots=True)
class Entry:
    term: int
    index: int
    type: int = EntryType.NORMAL
    data: bytes = b""


@dataclass(slots=True, frozen=True)
class ConfState:
    voters: tuple[int, ...]
    learners: tuple[int, ...] = ()

    def apply(self, cc: ConfChange) -> ConfState:
        voters, learners = set(self.voters), set(self.learners)
        if cc.type == ConfChangeType.ADD_LEARNER:
            if cc.node_id not in voters:
                learners.add(cc.node_id)
        elif cc.type == ConfChangeType.PROMOTE:
            learners.discard(cc.node_id)
            voters.add(cc.node_id)
        elif cc.type == ConfChangeType.REMOVE:
            voters.discard(cc.node_id)
            learners.discard(cc.node_id)
        return ConfState(tuple(sorted(voters)), tuple(sorted(learners)))

    def members(self) -> tuple[int, ...]:
        return self.voters + self.learners

    def to_list(self) -> list:
        return [list(self.voters), list(self.learners)]

    @classmethod
    def from_list(cls, raw: object) -> ConfState:
        if not (isinstance(raw, list) and len(raw) == 2):
            raise ProtocolError("conf state must be [voters, learners]")
        voters, learners = raw
        return cls(_node_ids(voters, "voters"), _node_ids(learners, "learners"))


@dataclass(slots=True, frozen=True)
class ConfChange:
    type: int
    node_id: int
    context: bytes = b""  # opaque to the core; the node driver puts the peer's address here

    def encode(self) -> bytes:
        return msgpack.packb([int(self.type), self.node_id, self.context], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        raw = msgpack.unpackb(data)
        if not (isinstance(raw, list) and len(raw) == 3 and _is_id(raw[1])
                and isinstance(raw[2], bytes)):
            raise ProtocolError("bad conf change")
        return cls(ConfChangeType(raw[0]), raw[1], raw[2])


@dataclass(slots=True)
class HardState:
    """What a node must never forget: its term and whom it voted for in it.

    The commit index is not part of it: it is relearned from the leader after a
    restart, and membership comes from the log itself (the latest configuration
    entry present, committed or not, as in the Raft dissertation).
    """

    term: int = 0
    vote: int = 0  # 0 = voted for nobody this term


@dataclass(slots=True, frozen=True)
class SnapshotMeta:
    index: int
    term: int
    conf: ConfState


@dataclass(slots=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes


@dataclass(slots=True)
class Message:
    type: int
    to: int
    frm: int
    term: int
    # APPEND: term of the entry at `index`. VOTE/PRE_VOTE: term of the last entry.
    # APPEND_RESP reject: term of the follower's entry at `reject_hint`.
    # SNAPSHOT/SNAPSHOT_RESP: the snapshot's term.
    log_term: int = 0
    # APPEND: index preceding `entries`. VOTE: candidate's last index.
    # APPEND_RESP: highest index now known to match (or the rejected index).
    # SNAPSHOT/SNAPSHOT_RESP: the snapshot's index.
    index: int = 0
    entries: list[Entry] = field(default_factory=list)
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0  # APPEND_RESP reject: the follower's guess where logs may match
    # HEARTBEAT(+RESP): read-index round id. VOTE/PRE_VOTE: b"transfer" when the
    # campaign follows a leadership transfer (voters then ignore their leader lease).
    context: bytes = b""
    # SNAPSHOT: conf state at the snapshot, chunk offset, chunk bytes, whether last.
    # SNAPSHOT_RESP: offset = bytes received so far.
    snap_conf: ConfState | None = None
    offset: int = 0
    chunk: bytes = b""
    last_chunk: bool = False


class ProtocolError(ValueError):
    """An inbound frame that is not a valid Raft message."""


CAMPAIGN_TRANSFER = b"transfer"

_packer = msgpack.Packer(use_bin_type=True)


def encode(m: Message) -> bytes:
    """One message to one frame. Entries are [term, index, type, data] arrays."""
    conf = m.snap_conf.to_list() if m.snap_conf is not None else None
    return _packer.pack(
        [
            WIRE_VERSION, int(m.type), m.to, m.frm, m.term, m.log_term, m.index,
            [[e.term, e.index, int(e.type), e.data] for e in m.entries],
            m.commit, m.reject, m.reject_hint, m.context,
            conf, m.offset, m.chunk, m.last_chunk,
        ]
    )


_INT_FIELDS = ("to", "frm", "term", "log_term", "index", "commit", "reject_hint", "offset")


def decode(frame: bytes, max_size: int = 64 << 20) -> Message:
    """Parse and validate one frame; raise ProtocolError on anything malformed."""
    if len(frame) > max_size:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {max_size}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=max_size)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(f"undecodable frame: {exc.__class__.__name__}") from None
    if not isinstance(raw, list) or len(raw) != 16:
        raise ProtocolError("frame is not a 16-element array")
    if raw[0] != WIRE_VERSION:
        raise ProtocolError(f"wire version {raw[0]!r}, expected {WIRE_VERSION}")
    (_, mtype, to, frm, term, log_term, index, raw_entries, commit, reject, reject_hint,
     context, conf, offset, chunk, last_chunk) = raw
    try:
        mtype = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"unknown message type {mtype!r}") from None
    values = (to, frm, term, log_term, index, commit, reject_hint, offset)
    for name, value in zip(_INT_FIELDS, values, strict=True):
        if type(value) is not int or value < 0:
            raise ProtocolError(f"field {name} must be a non-negative integer")
    if not _is_id(frm) or not _is_id(to):
        raise ProtocolError("node ids must be positive integers")
    if not (isinstance(reject, bool) and isinstance(last_chunk, bool)):
        raise ProtocolError("reject and last_chunk must be booleans")
    if not (isinstance(context, bytes) and isinstance(chunk, bytes)):
        raise ProtocolError("context and chunk must be binary")
    if not isinstance(raw_entries, list):
        raise ProtocolError("entries must be an array")
    entries = [_decode_entry(e) for e in raw_entries]
    for prev, nxt in zip(entries, entries[1:], strict=False):
        if nxt.index != prev.index + 1:
            raise ProtocolError("entries must have consecutive indexes")
    if entries and entries[0].index != index + 1:
        raise ProtocolError("first entry must follow the message's index")
    return Message(
        mtype, to, frm, term, log_term, index, entries, commit, reject, reject_hint,
        context, None if conf is None else ConfState.from_list(conf), offset, chunk, last_chunk,
    )


def _decode_entry(raw: object) -> Entry:
    if not (isinstance(raw, list) and len(raw) == 4):
        raise ProtocolError("entry must be [term, index, type, data]")
    term, index, etype, data = raw
    if type(term) is not int or type(index) is not int or term < 1 or index < 1:
        raise ProtocolError("entry term and index must be positive integers")
    if etype not in (0, 1) or not isinstance(data, bytes):
        raise ProtocolError("entry type must be 0 or 1 and data binary")
    return Entry(term, index, etype, data)


def _is_id(value: object) -> bool:
    return type(value) is int and 0 < value < 1 << 63


def _node_ids(raw: object, what: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(_is_id(v) for v in raw):
        raise ProtocolError(f"{what} must be a list of positive integer node ids")
    return tuple(raw)
