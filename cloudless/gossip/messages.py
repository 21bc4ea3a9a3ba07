"""Gossip wire vocabulary: one tagged union, msgpack arrays, compact.

A plaintext packet is a msgpack array of messages (a compound packet: one
probe message plus as many piggybacked updates as fit). The keyring seals that
payload; the payload itself never crosses the network unsealed except in tests
and simulations (`PLAIN_PREFIX`).

Addresses are "host:port" strings so the core can treat them as opaque keys.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from cloudless.errors import InvalidInput
from cloudless.gossip.metadata import Metadata

# A sealed datagram must fit 1,200 bytes (QUIC's minimum path MTU); the keyring
# adds SEAL_OVERHEAD bytes, so the core packs payloads up to this size.
MAX_DATAGRAM = 1200
SEAL_OVERHEAD = 49
MAX_PAYLOAD = MAX_DATAGRAM - SEAL_OVERHEAD

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Addr = Annotated[str, msgspec.Meta(min_length=3, max_length=80)]
Seq = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
MAX_INCARNATION = 2**63 - 1
Incarnation = Annotated[int, msgspec.Meta(ge=0, le=MAX_INCARNATION)]
# A self-claim's signature (claims.py): raw P-256 r||s, or empty when unsigned.
Signature = Annotated[bytes, msgspec.Meta(max_length=64)]


class MalformedPacket(InvalidInput):
    """A gossip payload did not decode as the vocabulary below."""


class Ping(msgspec.Struct, frozen=True, array_like=True, tag=1, gc=False):
    seq: Seq
    target: Name  # a node answering on a reused address must not ack for another
    source: Name
    source_addr: Addr


class IndirectPing(msgspec.Struct, frozen=True, array_like=True, tag=2, gc=False):
    seq: Seq
    target: Name
    target_addr: Addr
    source: Name
    source_addr: Addr
    nack: bool  # Lifeguard §4.1: ask the relay to report a missing ack


class Ack(msgspec.Struct, frozen=True, array_like=True, tag=3, gc=False):
    seq: Seq


class Nack(msgspec.Struct, frozen=True, array_like=True, tag=4, gc=False):
    seq: Seq


class Alive(msgspec.Struct, frozen=True, array_like=True, tag=5, gc=False):
    incarnation: Incarnation
    node: Name
    addr: Addr
    meta_version: Annotated[int, msgspec.Meta(ge=0)]
    meta: Metadata
    sig: Signature = b""  # by `node` itself: only it may say it is alive


class Suspect(msgspec.Struct, frozen=True, array_like=True, tag=6, gc=False):
    incarnation: Incarnation
    node: Name
    source: Name  # who suspects: distinct sources are Lifeguard confirmations


class Dead(msgspec.Struct, frozen=True, array_like=True, tag=7, gc=False):
    incarnation: Incarnation
    node: Name
    source: Name  # source == node: a graceful leave
    sig: Signature = b""  # a leave is signed by `node`; others' observations are not


Message = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead


class MemberRecord(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One row of a push-pull state exchange."""

    node: Name
    addr: Addr
    incarnation: Incarnation
    state: Annotated[int, msgspec.Meta(ge=0, le=3)]
    meta_version: Annotated[int, msgspec.Meta(ge=0)]
    meta: Metadata
    sig: Signature = b""  # the member's own signature of its alive or left claim


class PushPullState(msgspec.Struct, frozen=True, array_like=True):
    join: bool
    sender: Name
    members: list[MemberRecord]


_encoder = msgspec.msgpack.Encoder()
_packet_decoder = msgspec.msgpack.Decoder(list[Message])
_state_decoder = msgspec.msgpack.Decoder(PushPullState)

encode = _encoder.encode
encode_into = _encoder.encode_into


def decode_packet(payload: bytes) -> list[Message]:
    try:
        return _packet_decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise MalformedPacket(f"gossip packet does not decode: {exc}", size=len(payload)) from None


def decode_state(payload: bytes) -> PushPullState:
    try:
        return _state_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise MalformedPacket(f"push-pull state does not decode: {exc}", size=len(payload)) from None


def pack(encoded: list[bytes]) -> bytes:
    """A compound packet: msgpack array header, then pre-encoded messages."""
    return _array_header(len(encoded)) + b"".join(encoded)


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    return b"\xdc" + count.to_bytes(2, "big")


ARRAY_HEADER_MAX = 3
