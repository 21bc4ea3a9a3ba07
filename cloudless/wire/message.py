"""Messages, the versioned envelope and the codec that validates them.

Each subsystem declares its messages in its own vocabulary module as
subclasses of `Message` and a union of them:

    class Ping(Message):
        seq: U64

    GossipMessage = Ping | Ack | ...
    codec = decoder_for(GossipMessage)
    data = codec.encode(Ping(seq=1))      # or wire.encode(Ping(seq=1))
    msg = codec.decode(data)              # WireError naming the field if bad

On the wire a message is the msgpack array `[version, body]`, the body a map
tagged by `"t"` (the class name unless the class sets `tag=`). Fields are
encoded by name, so adding a field with a default is a compatible change;
anything else bumps `WIRE_VERSION`.
"""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar, cast

import msgspec

from cloudless.wire.errors import FrameTooLarge, UnsupportedVersion, WireError
from cloudless.wire.framing import MAX_FRAME_SIZE

WIRE_VERSION = 1
SUPPORTED_VERSIONS: frozenset[int] = frozenset({WIRE_VERSION})

T = TypeVar("T")


class Message(msgspec.Struct, frozen=True, tag=True, tag_field="t"):
    """Base of every message: frozen, and tagged so unions decode by tag.

    The field name `t` is taken by the tag. Tags must be unique within a
    union; give a class `tag="subsystem.name"` when class names could clash.
    """


class Envelope(msgspec.Struct, Generic[T], frozen=True, array_like=True):
    version: int
    body: T


class _Header(msgspec.Struct, array_like=True):
    # Reads only the version, leaving the body undecoded.
    version: int
    body: msgspec.Raw


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(_Header)
_PATH = re.compile(r"at `(\$[^`]*)`")


def encode(message: Any, version: int = WIRE_VERSION) -> bytes:
    """The envelope bytes for `message` (any msgspec-encodable value, normally a Message)."""
    return _encoder.encode(Envelope(version, message))


def _relative_path(raw: str) -> str:
    # msgspec reports array positions; name them after the envelope fields.
    if raw.startswith("$[1]"):
        return "$.body" + raw[4:]
    if raw.startswith("$[0]"):
        return "$.version" + raw[4:]
    return raw


class Codec(Generic[T]):
    """Encodes and validating-decodes messages of one type or tagged union."""

    def __init__(
        self,
        message_type: Any,
        *,
        versions: frozenset[int] = SUPPORTED_VERSIONS,
        max_size: int = MAX_FRAME_SIZE,
    ) -> None:
        self.message_type = message_type
        self.versions = frozenset(versions)
        self.max_size = max_size
        self._decoder = msgspec.msgpack.Decoder(Envelope[message_type])

    def encode(self, message: T, version: int = WIRE_VERSION) -> bytes:
        return _encoder.encode(Envelope(version, message))

    def decode(self, data: bytes) -> T:
        if len(data) > self.max_size:
            raise FrameTooLarge(len(data), self.max_size)
        try:
            envelope = self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            self._check_version(data)
            match = _PATH.search(str(exc))
            path = _relative_path(match.group(1)) if match else "$"
            detail = _PATH.sub(f"at `{path}`", str(exc))
            raise WireError(f"invalid message: {detail}", path=path) from exc
        except msgspec.DecodeError as exc:
            raise WireError(f"malformed message: {exc}") from exc
        except RecursionError as exc:
            # msgspec recurses per nesting level of untyped (Any) data.
            raise WireError("malformed message: nested too deeply") from exc
        if envelope.version not in self.versions:
            raise UnsupportedVersion(envelope.version, self.versions)
        # The decoder validated the body against `message_type`, which is T.
        return cast(T, envelope.body)

    def _check_version(self, data: bytes) -> None:
        """Report an unknown version rather than the body errors it causes."""
        try:
            header = _header_decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            return
        if header.version not in self.versions:
            raise UnsupportedVersion(header.version, self.versions)


def decoder_for(message_type: Any, **options: Any) -> Codec[Any]:
    """A Codec for `message_type` (a Message subclass or a union of them)."""
    return Codec(message_type, **options)
