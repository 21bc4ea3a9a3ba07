"""Wire format: tagged msgspec messages in a versioned envelope, and length-prefixed framing."""

from cloudless.wire.errors import FrameTooLarge, TruncatedFrame, UnsupportedVersion, WireError
from cloudless.wire.framing import MAX_FRAME_SIZE, FrameDecoder, encode_frame
from cloudless.wire.message import (
    SUPPORTED_VERSIONS,
    WIRE_VERSION,
    Codec,
    Envelope,
    Message,
    decoder_for,
    encode,
)

__all__ = [
    "MAX_FRAME_SIZE",
    "SUPPORTED_VERSIONS",
    "WIRE_VERSION",
    "Codec",
    "Envelope",
    "FrameDecoder",
    "FrameTooLarge",
    "Message",
    "TruncatedFrame",
    "UnsupportedVersion",
    "WireError",
    "decoder_for",
    "encode",
    "encode_frame",
]
