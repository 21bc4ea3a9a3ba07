"""Envelope codec: round trips, validation naming the field, version handling, and
robustness against random and mutated input (nothing but WireError escapes)."""

from typing import Any, Literal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudless.errors import InvalidInput
from cloudless.wire import (
    WIRE_VERSION,
    FrameTooLarge,
    Message,
    UnsupportedVersion,
    WireError,
    decoder_for,
    encode,
)
from cloudless.wire.bounds import U32, U64, NodeName, ShortText


class Ping(Message):
    seq: U64
    sender: NodeName


class Ack(Message):
    seq: U64
    payload: bytes = b""


class Gossip(Message, tag="gossip.update"):
    members: list[NodeName]
    incarnation: U32
    note: ShortText = ""
    extra: Any = None
    state: Literal["alive", "suspect", "dead"] = "alive"


SampleMessage = Ping | Ack | Gossip
codec = decoder_for(SampleMessage)

names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
u64 = st.integers(0, 2**64 - 1)
json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
messages = st.one_of(
    st.builds(Ping, seq=u64, sender=names),
    st.builds(Ack, seq=u64, payload=st.binary(max_size=64)),
    st.builds(
        Gossip,
        members=st.lists(names, max_size=5),
        incarnation=st.integers(0, 2**32 - 1),
        note=st.text(max_size=256),
        extra=json_like,
        state=st.sampled_from(["alive", "suspect", "dead"]),
    ),
)


def raw(version, body):
    return msgspec.msgpack.encode([version, body])


@given(messages)
def test_round_trip_preserves_every_message(message):
    assert codec.decode(encode(message)) == message
    assert codec.decode(codec.encode(message)) == message


def test_messages_are_frozen_and_tagged_by_t():
    ping = Ping(seq=1, sender="n1")
    with pytest.raises(AttributeError):
        ping.seq = 2  # type: ignore[misc]
    assert msgspec.msgpack.decode(encode(ping)) == [WIRE_VERSION, {"t": "Ping", "seq": 1, "sender": "n1"}]
    assert msgspec.msgpack.decode(encode(Gossip(members=[], incarnation=0)))[1]["t"] == "gossip.update"


@pytest.mark.parametrize(
    "body, path",
    [
        ({"t": "Ping", "seq": -1, "sender": "n1"}, "$.body.seq"),
        ({"t": "Ping", "seq": "1", "sender": "n1"}, "$.body.seq"),
        ({"t": "Ping", "seq": 1, "sender": "N 1"}, "$.body.sender"),
        ({"t": "Ping", "seq": 1}, "$.body"),
        ({"t": "Nope", "seq": 1}, "$.body.t"),
        ({"t": "gossip.update", "members": ["ok", "Not OK"], "incarnation": 1}, "$.body.members[1]"),
        ({"t": "gossip.update", "members": [], "incarnation": 2**32}, "$.body.incarnation"),
        ({"t": "gossip.update", "members": [], "incarnation": 1, "note": "x" * 257}, "$.body.note"),
        ({"t": "gossip.update", "members": [], "incarnation": 1, "state": "zombie"}, "$.body.state"),
    ],
)
def test_invalid_field_raises_wire_error_naming_the_field(body, path):
    with pytest.raises(WireError) as info:
        codec.decode(raw(WIRE_VERSION, body))
    assert info.value.path == path
    assert path in info.value.message
    assert isinstance(info.value, InvalidInput) and info.value.exit_code == 2


def test_missing_field_is_named_in_the_message():
    with pytest.raises(WireError, match="sender"):
        codec.decode(raw(WIRE_VERSION, {"t": "Ping", "seq": 1}))


def test_unknown_version_raises_unsupported_version_even_if_body_is_also_invalid():
    with pytest.raises(UnsupportedVersion) as info:
        codec.decode(raw(WIRE_VERSION + 1, {"t": "Ping", "seq": 1, "sender": "n1"}))
    assert info.value.version == WIRE_VERSION + 1 and info.value.path == "$.version"
    with pytest.raises(UnsupportedVersion):
        codec.decode(raw(99, {"t": "FromTheFuture", "x": [1, 2]}))


def test_a_codec_may_accept_several_versions():
    both = decoder_for(SampleMessage, versions=frozenset({1, 2}))
    assert both.decode(raw(2, {"t": "Ack", "seq": 5})) == Ack(seq=5)


def test_unknown_fields_are_ignored_so_adding_fields_is_compatible():
    assert codec.decode(raw(WIRE_VERSION, {"t": "Ack", "seq": 5, "added_later": True})) == Ack(seq=5)


def test_message_over_the_size_limit_is_refused_before_decoding():
    small = decoder_for(SampleMessage, max_size=64)
    with pytest.raises(FrameTooLarge):
        small.decode(encode(Ack(seq=1, payload=b"x" * 100)))


def test_envelope_that_is_not_an_array_names_the_root():
    with pytest.raises(WireError) as info:
        codec.decode(msgspec.msgpack.encode({"version": 1}))
    assert info.value.path == "$"


def test_deeply_nested_untyped_data_is_a_wire_error_not_a_recursion_error():
    # {"t": "gossip.update", "members": [], "incarnation": 1, "extra": [[[...[None]...]]]}
    body = b"\x84\xa1t\xadgossip.update\xa7members\x90\xabincarnation\x01\xa5extra" + b"\x91" * 200_000 + b"\xc0"
    with pytest.raises(WireError, match="nested too deeply"):
        codec.decode(b"\x92\x01" + body)


def test_huge_declared_lengths_fail_fast_without_allocating():
    # Array/bytes headers claiming 4 GiB with no data behind them.
    for claim in (b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff"):
        data = b"\x92\x01\x83\xa1t\xa3Ack\xa3seq\x01\xa7payload" + claim
        with pytest.raises(WireError):
            codec.decode(data)


@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_wire_error(data):
    try:
        codec.decode(data)
    except WireError:
        pass


@given(messages, st.data())
def test_mutated_messages_decode_or_raise_wire_error(message, data):
    encoded = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        position = data.draw(st.integers(0, max(len(encoded) - 1, 0)))
        if action == "flip" and encoded:
            encoded[position] ^= data.draw(st.integers(1, 255))
        elif action == "truncate":
            del encoded[position:]
        elif action == "insert":
            encoded[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and encoded:
            del encoded[position]
    try:
        decoded = codec.decode(bytes(encoded))
    except WireError:
        return
    # Whatever decodes is a valid member of the union.
    assert isinstance(decoded, (Ping, Ack, Gossip))
