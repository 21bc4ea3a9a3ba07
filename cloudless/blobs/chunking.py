"""Content-defined chunking (FastCDC 2020, pyfastcdc) and chunk digests.

Objects are cut where a rolling hash of the content says so, not at fixed
offsets, so an insertion early in a file shifts only the chunks around it and
the rest deduplicate against the previous version. A cut depends only on the
bytes from the chunk's start to at most `max_size` after it, which is what lets
`StreamChunker` cut a stream fed in arbitrary pieces exactly as it would cut the
whole buffer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from typing import Annotated

import msgspec
from pyfastcdc import FastCDC

from cloudless.blobs.errors import InvalidDigest

DEFAULT_AVG_CHUNK = 1 << 20
MIN_AVG_CHUNK = 1 << 12
MAX_AVG_CHUNK = 1 << 21  # max chunk 8 MiB: one chunk always fits one RPC frame (16 MiB)

_HEX64 = re.compile(r"[0-9a-f]{64}")


class ChunkDigest(str):
    """Lower-case hex SHA-256 of a chunk's uncompressed content."""

    __slots__ = ()

    def __new__(cls, value: str) -> ChunkDigest:
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise InvalidDigest(f"not a SHA-256 hex digest: {str(value)[:80]!r}")
        return super().__new__(cls, value)

    @staticmethod
    def of(data: bytes | bytearray | memoryview) -> str:
        """The digest of `data` as a plain str (what manifests and messages carry)."""
        return hashlib.sha256(data).hexdigest()


DigestField = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class ChunkRef(msgspec.Struct, frozen=True, array_like=True):
    """One chunk of an object: its digest, length and offset in the object."""

    digest: DigestField
    size: Annotated[int, msgspec.Meta(ge=0)]
    offset: Annotated[int, msgspec.Meta(ge=0)]


class ChunkingParams(msgspec.Struct, frozen=True):
    avg_size: int = DEFAULT_AVG_CHUNK

    def __post_init__(self) -> None:
        if not MIN_AVG_CHUNK <= self.avg_size <= MAX_AVG_CHUNK or self.avg_size & (self.avg_size - 1):
            raise msgspec.ValidationError(
                f"chunk avg_size must be a power of two in [{MIN_AVG_CHUNK}, {MAX_AVG_CHUNK}], got {self.avg_size}"
            )

    @property
    def min_size(self) -> int:
        return self.avg_size // 4

    @property
    def max_size(self) -> int:
        return self.avg_size * 4

    def chunker(self) -> FastCDC:
        return FastCDC(self.avg_size, min_size=self.min_size, max_size=self.max_size)


class StreamChunker:
    """Cuts a stream fed piece by piece; yields `(offset, chunk)` per chunk.

    Only chunks that end before the buffered tail are final; the tail (which
    may have been cut only because the buffer ended) waits for more data or
    for `finish()`. Chunks are read-only memoryviews over an immutable joined
    buffer, so nothing is copied per chunk.
    """

    def __init__(self, params: ChunkingParams = ChunkingParams(), window: int | None = None) -> None:
        self._cdc = params.chunker()
        # Cut once this much is buffered: a few maximum-size chunks, so all but the tail are final.
        self._window = max(window or 4 * params.max_size, 2 * params.max_size)
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._offset = 0  # object offset of the first pending byte

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, memoryview]]:
        if not data:
            return []
        self._pending.append(bytes(data))
        self._pending_len += len(data)
        if self._pending_len < self._window:
            return []
        return self._cut(final=False)

    def finish(self) -> list[tuple[int, memoryview]]:
        return self._cut(final=True)

    def _cut(self, final: bool) -> list[tuple[int, memoryview]]:
        if not self._pending_len:
            return []
        buf = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        view = memoryview(buf)
        cuts = [(c.offset, c.length) for c in self._cdc.cut_buf(buf)]
        if not final:
            cuts = cuts[:-1]
        out = [(self._offset + off, view[off : off + length]) for off, length in cuts]
        consumed = cuts[-1][0] + cuts[-1][1] if cuts else 0
        self._pending = [buf[consumed:]] if consumed < len(buf) else []
        self._pending_len = len(buf) - consumed
        self._offset += consumed
        return out


def chunk_iter(pieces: Iterable[bytes], params: ChunkingParams = ChunkingParams()) -> Iterator[tuple[int, memoryview]]:
    chunker = StreamChunker(params)
    for piece in pieces:
        yield from chunker.feed(piece)
    yield from chunker.finish()


def chunk_refs(data: bytes, params: ChunkingParams = ChunkingParams()) -> list[ChunkRef]:
    return [ChunkRef(ChunkDigest.of(c), len(c), off) for off, c in chunk_iter([data], params)]
