"""Errors raised on bytes that arrive from outside: all subclasses of WireError."""

from __future__ import annotations

from cloudless.errors import InvalidInput


class WireError(InvalidInput):
    """Bytes from a peer are not a valid frame or message.

    `path` names the offending field where there is one (msgspec's JSON-path
    form, relative to the envelope: `$.body.term`), else "$".
    """

    code = "wire_error"

    def __init__(self, message: str, path: str = "$", **context: object) -> None:
        super().__init__(message, path=path, **context)
        self.path = path


class UnsupportedVersion(WireError):
    """The envelope's format version is one this process does not speak."""

    code = "unsupported_version"

    def __init__(self, version: object, supported: frozenset[int]) -> None:
        super().__init__(
            f"unsupported wire version {version!r}; this node speaks {sorted(supported)}",
            path="$.version",
            version=version,
        )
        self.version = version
        self.supported = supported


class FrameTooLarge(WireError):
    """A frame (or message) is larger than the receiver accepts."""

    code = "frame_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {limit}-byte limit", size=size, limit=limit)
        self.size = size
        self.limit = limit


class TruncatedFrame(WireError):
    """The stream ended inside a frame."""

    code = "truncated_frame"
