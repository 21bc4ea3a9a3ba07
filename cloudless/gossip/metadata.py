"""What a member offers, spread with its membership.

A member's metadata travels inside its `Alive` announcements. Each change
bumps the member's `meta_version`; receivers keep the highest version they
have seen for the member's current incarnation, so updates spread exactly
like state changes (gossip plus push-pull) and never go backwards.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from cloudless.errors import InvalidInput

# An Alive must leave room for the message header and for other piggybacked
# updates inside one 1,200-byte sealed datagram.
MAX_METADATA_BYTES = 480

# Reserved labels that carry what the scheduler's node attributes `node.arch`,
# `node.class` and the runtime filter read (set by node/device.py's detection).
ARCH_LABEL = "cloudless/arch"
CLASS_LABEL = "cloudless/class"
RUNTIME_LABEL = "cloudless/runtime"
# What a node can run containers with (node/device.py's `Runtime`).
RUNTIMES: tuple[str, ...] = ("runc", "rootless", "memory", "none")

ShortText = Annotated[str, msgspec.Meta(max_length=63)]
LabelKey = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]


class MetadataTooLarge(InvalidInput):
    """Encoded metadata would not fit beside other updates in one datagram."""


class Resources(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    cpu_millis: NonNegative = 0
    memory_bytes: NonNegative = 0
    disk_bytes: NonNegative = 0


class Metadata(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    region: ShortText = ""
    zone: ShortText = ""
    labels: dict[LabelKey, ShortText] = {}
    roles: tuple[ShortText, ...] = ()
    capacity: Resources = Resources()
    free: Resources = Resources()
    power: Literal["ac", "battery"] = "ac"
    battery_percent: Percent | None = None
    charging: bool = False
    network: Literal["wired", "wifi", "cellular"] = "wired"
    metered: bool = False


EMPTY_METADATA = Metadata()

_encoder = msgspec.msgpack.Encoder()


def encoded_size(meta: Metadata) -> int:
    return len(_encoder.encode(meta))


def validate_size(meta: Metadata) -> Metadata:
    size = encoded_size(meta)
    if size > MAX_METADATA_BYTES:
        raise MetadataTooLarge(
            f"member metadata encodes to {size} bytes, the limit is {MAX_METADATA_BYTES}",
            size=size,
            limit=MAX_METADATA_BYTES,
        )
    return meta
