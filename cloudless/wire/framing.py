"""Length-prefixed framing for byte streams: a 4-byte big-endian length, then the payload.

The decoder refuses an oversize frame as soon as its header arrives, so a peer
cannot make us buffer more than `max_frame_size` bytes of one frame.
"""

from __future__ import annotations

import struct

from cloudless.wire.errors import FrameTooLarge, TruncatedFrame

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_FRAME_SIZE = 16 * 1024 * 1024
# The 4-byte header cannot express more.
FRAME_SIZE_CEILING = (1 << 32) - 1


def encode_frame(payload: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    size = len(payload)
    if size > max_frame_size:
        raise FrameTooLarge(size, max_frame_size)
    return HEADER.pack(size) + payload


class FrameDecoder:
    """Incremental decoder: `feed` bytes as they arrive, get back whole payloads.

    After FrameTooLarge the stream is out of sync; the decoder stays failed and
    the caller must close the stream.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not 0 <= max_frame_size <= FRAME_SIZE_CEILING:
            raise ValueError(f"max_frame_size must be in [0, {FRAME_SIZE_CEILING}], got {max_frame_size}")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._expected: int | None = None  # body length of the frame in progress
        self._failed: FrameTooLarge | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self._failed is not None:
            raise self._failed
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        offset = 0
        try:
            while True:
                if self._expected is None:
                    if len(buffer) - offset < HEADER_SIZE:
                        break
                    (size,) = HEADER.unpack_from(buffer, offset)
                    if size > self.max_frame_size:
                        self._failed = FrameTooLarge(size, self.max_frame_size)
                        raise self._failed
                    offset += HEADER_SIZE
                    self._expected = size
                end = offset + self._expected
                if end > len(buffer):
                    break
                frames.append(bytes(buffer[offset:end]))
                offset = end
                self._expected = None
        finally:
            if self._failed is not None:
                buffer.clear()
            elif offset:
                del buffer[:offset]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress (at most max_frame_size + header)."""
        return len(self._buffer)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending: a clean place for the stream to end."""
        return self._failed is None and not self._buffer and self._expected is None

    def end(self) -> None:
        """Call at end of stream; raises TruncatedFrame if a frame was cut off."""
        if self._failed is not None:
            raise self._failed
        if not self.at_boundary:
            pending = self._expected if self._expected is not None else "header"
            raise TruncatedFrame(
                f"stream ended inside a frame ({len(self._buffer)} bytes buffered, expecting {pending})",
                buffered=len(self._buffer),
            )
