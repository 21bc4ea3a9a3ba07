"""What the gossip core tells its owner: membership events and IO effects."""

from __future__ import annotations

from dataclasses import dataclass

from cloudless.gossip.metadata import Metadata


@dataclass(frozen=True, slots=True)
class MemberJoined:
    name: str
    addr: str
    meta: Metadata


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """Address or metadata of a live member changed."""

    name: str
    addr: str
    meta: Metadata


@dataclass(frozen=True, slots=True)
class MemberSuspect:
    name: str
    incarnation: int
    source: str


@dataclass(frozen=True, slots=True)
class MemberAlive:
    """A suspicion was refuted: the member proved it is alive."""

    name: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberDead:
    name: str
    incarnation: int
    source: str


@dataclass(frozen=True, slots=True)
class MemberLeft:
    name: str


MembershipEvent = MemberJoined | MemberUpdated | MemberSuspect | MemberAlive | MemberDead | MemberLeft


# Effects: IO the driver performs on the core's behalf, then reports back.


@dataclass(frozen=True, slots=True)
class StreamProbe:
    """Ping `target` at `addr` over a reliable stream (fallback when UDP acks are
    lost); report with `GossipCore.stream_probe_result(seq, ok, now)`."""

    addr: str
    target: str
    seq: int


@dataclass(frozen=True, slots=True)
class PushPull:
    """Exchange full state with `addr` over a stream: send `payload`, feed the
    reply (or None on failure) to `GossipCore.stream_exchange_result`."""

    addr: str
    payload: bytes
    join: bool


Effect = StreamProbe | PushPull
