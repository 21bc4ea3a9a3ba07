"""The Raft vocabulary: log entries, persistent state, snapshots and messages.

Everything here is a frozen `msgspec.Struct`, so the same types are what the
core produces, what storage persists and what the transport carries.
`encode_message` / `decode_message` are the wire form; decoding validates and
raises `InvalidRaftMessage` naming what was wrong.

Node ids are `str`. Every message carries `frm`, `to` and the sender's
`term` (a pre-vote request carries the term the sender *would* campaign in).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated

import msgspec

from cloudless.errors import InvalidInput

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class InvalidRaftMessage(InvalidInput):
    """Bytes from a peer did not decode to a well-formed Raft message."""


class EntryKind(IntEnum):
    NORMAL = 0  # a leader's no-op is a NORMAL entry with empty data
    CONF_CHANGE = 1  # data is an encoded ConfChange


class Entry(msgspec.Struct, frozen=True, array_like=True):
    term: NonNegative
    index: NonNegative
    kind: NonNegative
    data: bytes


class HardState(msgspec.Struct, frozen=True):
    term: int = 0
    vote: str = ""
    commit: int = 0


class ConfState(msgspec.Struct, frozen=True):
    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()
    # Reserved for joint consensus; this core makes single-server changes
    # (see core.py) and always leaves these empty.
    voters_outgoing: tuple[str, ...] = ()
    learners_next: tuple[str, ...] = ()
    auto_leave: bool = False


class SnapshotMeta(msgspec.Struct, frozen=True):
    index: NonNegative
    term: NonNegative
    conf_state: ConfState


class Snapshot(msgspec.Struct, frozen=True):
    meta: SnapshotMeta
    data: bytes


EMPTY_SNAPSHOT = Snapshot(SnapshotMeta(0, 0, ConfState()), b"")

# Per-entry overhead counted against byte limits (index, term, kind, framing),
# so that a batch of empty entries is still bounded.
ENTRY_OVERHEAD = 24


def entry_size(entry: Entry) -> int:
    return len(entry.data) + ENTRY_OVERHEAD


# ---------------------------------------------------------------------------
# Configuration changes (the data of a CONF_CHANGE entry)


class ConfChangeType(IntEnum):
    ADD_VOTER = 0  # also promotes an existing learner
    ADD_LEARNER = 1  # also demotes an existing voter
    REMOVE_NODE = 2


class ConfChange(msgspec.Struct, frozen=True, array_like=True):
    type: NonNegative
    node_id: str


def encode_conf_change(change: ConfChange) -> bytes:
    return msgspec.msgpack.encode(change)


def decode_conf_change(data: bytes) -> ConfChange:
    try:
        change = msgspec.msgpack.decode(data, type=ConfChange)
    except msgspec.DecodeError as exc:
        raise InvalidRaftMessage(f"bad conf change: {exc}") from exc
    if change.type not in ConfChangeType.__members__.values() or not change.node_id:
        raise InvalidRaftMessage("bad conf change", type=change.type, node_id=change.node_id)
    return change


# ---------------------------------------------------------------------------
# Messages (Raft paper §5, thesis §3.10, §4, §6.4, §9.6)


class AppendEntries(msgspec.Struct, frozen=True, tag="app"):
    """Replicate `entries` after (prev_index, prev_term); also carries commit."""

    frm: str
    to: str
    term: NonNegative
    prev_index: NonNegative
    prev_term: NonNegative
    entries: tuple[Entry, ...]
    commit: NonNegative


class AppendResponse(msgspec.Struct, frozen=True, tag="app_resp"):
    """Success: the follower's log matches the leader's up to `index`.

    Reject: the entry at `index` (the request's prev_index) did not match;
    (hint_index, hint_term) is the follower's best guess of where the logs
    can match, for the fast back-off (thesis §5.3, etcd's findConflictByTerm).
    """

    frm: str
    to: str
    term: NonNegative
    index: NonNegative
    reject: bool = False
    hint_index: NonNegative = 0
    hint_term: NonNegative = 0


class RequestVote(msgspec.Struct, frozen=True, tag="vote"):
    """A vote request; with pre_vote, a poll that changes no state (thesis §9.6)."""

    frm: str
    to: str
    term: NonNegative
    last_index: NonNegative
    last_term: NonNegative
    pre_vote: bool = False
    # Set when a leader handed over with TimeoutNow: voters then ignore
    # their leader lease (thesis §3.10).
    transfer: bool = False


class VoteResponse(msgspec.Struct, frozen=True, tag="vote_resp"):
    frm: str
    to: str
    term: NonNegative
    granted: bool
    pre_vote: bool = False


class Heartbeat(msgspec.Struct, frozen=True, tag="hb"):
    """Leader liveness; `commit` is capped at what the follower is known to hold.

    `ctx` is echoed back so the leader can confirm a ReadIndex round (§8).
    """

    frm: str
    to: str
    term: NonNegative
    commit: NonNegative
    ctx: bytes = b""


class HeartbeatResponse(msgspec.Struct, frozen=True, tag="hb_resp"):
    frm: str
    to: str
    term: NonNegative
    ctx: bytes = b""


class InstallSnapshot(msgspec.Struct, frozen=True, tag="snap"):
    """One chunk of a snapshot's data, starting at byte `offset` (Raft paper §7)."""

    frm: str
    to: str
    term: NonNegative
    meta: SnapshotMeta
    offset: NonNegative
    data: bytes
    done: bool


class SnapshotResponse(msgspec.Struct, frozen=True, tag="snap_resp"):
    """The follower holds bytes [0, next_offset) of the snapshot at `index`."""

    frm: str
    to: str
    term: NonNegative
    index: NonNegative
    next_offset: NonNegative


class TimeoutNow(msgspec.Struct, frozen=True, tag="timeout_now"):
    """Leader transfer: campaign immediately, ignoring leases (thesis §3.10)."""

    frm: str
    to: str
    term: NonNegative


class ReadIndexRequest(msgspec.Struct, frozen=True, tag="read_index"):
    """A follower asks the leader for a read index on behalf of `ctx` (thesis §6.4)."""

    frm: str
    to: str
    term: NonNegative
    ctx: bytes


class ReadIndexResponse(msgspec.Struct, frozen=True, tag="read_index_resp"):
    """`index` is safe to read at once applied; reject means ask again later."""

    frm: str
    to: str
    term: NonNegative
    index: NonNegative
    ctx: bytes
    reject: bool = False


Message = (
    AppendEntries
    | AppendResponse
    | RequestVote
    | VoteResponse
    | Heartbeat
    | HeartbeatResponse
    | InstallSnapshot
    | SnapshotResponse
    | TimeoutNow
    | ReadIndexRequest
    | ReadIndexResponse
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode_message(message: Message) -> bytes:
    return _encoder.encode(message)


def decode_message(data: bytes) -> Message:
    try:
        message = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidRaftMessage(f"bad raft message: {exc}") from exc
    if not message.frm or not message.to:
        raise InvalidRaftMessage("raft message without sender or recipient", kind=type(message).__name__)
    if isinstance(message, AppendEntries):
        expected = message.prev_index + 1
        for entry in message.entries:
            if entry.index != expected:
                raise InvalidRaftMessage("append entries are not contiguous", index=entry.index, expected=expected)
            if entry.term > message.term or entry.kind not in (EntryKind.NORMAL, EntryKind.CONF_CHANGE):
                raise InvalidRaftMessage("bad entry in append", index=entry.index, term=entry.term, kind=entry.kind)
            expected += 1
    return message
