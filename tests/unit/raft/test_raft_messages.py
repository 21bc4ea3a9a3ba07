"""The Raft wire vocabulary round-trips and rejects malformed input with a typed error."""

import msgspec
import pytest

from cloudless.errors import InvalidInput
from cloudless.raft.messages import (
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryKind,
    Heartbeat,
    InstallSnapshot,
    InvalidRaftMessage,
    ReadIndexResponse,
    RequestVote,
    SnapshotMeta,
    TimeoutNow,
    decode_conf_change,
    decode_message,
    encode_conf_change,
    encode_message,
)


@pytest.mark.parametrize(
    "message",
    [
        AppendEntries("a", "b", 3, 4, 2, (Entry(3, 5, EntryKind.NORMAL, b"x"), Entry(3, 6, 1, b"")), 4),
        AppendResponse("b", "a", 3, 6, reject=True, hint_index=2, hint_term=1),
        RequestVote("a", "b", 4, 6, 3, pre_vote=True),
        Heartbeat("a", "b", 3, 2, b"ctx"),
        InstallSnapshot("a", "b", 3, SnapshotMeta(9, 2, ConfState(voters=("a", "b"))), 0, b"data", True),
        TimeoutNow("a", "b", 3),
        ReadIndexResponse("a", "b", 3, 7, b"r1"),
    ],
)
def test_messages_round_trip(message):
    assert decode_message(encode_message(message)) == message


def test_garbage_is_a_typed_invalid_input():
    with pytest.raises(InvalidRaftMessage) as info:
        decode_message(b"\x93garbage")
    assert isinstance(info.value, InvalidInput)


def test_negative_term_is_rejected():
    raw = msgspec.msgpack.encode({"type": "hb", "frm": "a", "to": "b", "term": -1, "commit": 0})
    with pytest.raises(InvalidRaftMessage):
        decode_message(raw)


def test_unknown_tag_is_rejected():
    raw = msgspec.msgpack.encode({"type": "nope", "frm": "a", "to": "b", "term": 1})
    with pytest.raises(InvalidRaftMessage):
        decode_message(raw)


def test_non_contiguous_append_is_rejected():
    bad = AppendEntries("a", "b", 3, 4, 2, (Entry(3, 5, 0, b""), Entry(3, 7, 0, b"")), 4)
    with pytest.raises(InvalidRaftMessage, match="contiguous"):
        decode_message(encode_message(bad))


def test_entry_from_a_future_term_is_rejected():
    bad = AppendEntries("a", "b", 3, 4, 2, (Entry(9, 5, 0, b""),), 4)
    with pytest.raises(InvalidRaftMessage):
        decode_message(encode_message(bad))


def test_message_without_recipient_is_rejected():
    with pytest.raises(InvalidRaftMessage):
        decode_message(encode_message(TimeoutNow("a", "", 3)))


def test_conf_change_round_trip_and_validation():
    change = ConfChange(ConfChangeType.ADD_LEARNER, "d")
    assert decode_conf_change(encode_conf_change(change)) == change
    with pytest.raises(InvalidRaftMessage):
        decode_conf_change(encode_conf_change(ConfChange(9, "d")))
    with pytest.raises(InvalidRaftMessage):
        decode_conf_change(b"\xff")
