"""Constrained field types for message schemas, so decoding enforces ranges and sizes.

Use them in vocabulary modules (`term: U64`, `node: NodeName`); a value out of
range fails decoding with a WireError naming the field.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from cloudless.wire.framing import MAX_FRAME_SIZE

U8 = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
U16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
# msgpack integers stop at 64 bits, so ge=0 is the whole bound (msgspec
# cannot express le=2**64-1: its bounds are int64).
U64 = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]

# Same charset as cloudless.pki.identity: node names, cluster ids.
NodeName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=64 * 1024)]
Payload = Annotated[bytes, msgspec.Meta(max_length=MAX_FRAME_SIZE)]
Digest = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]  # SHA-256
