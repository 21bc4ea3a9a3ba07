"""Chunks at rest: content-addressed files with a small RocksDB index.

    <root>/chunks/ab/cd/<hex digest>   1-byte codec header + payload
    <root>/tmp/                        partial writes (removed at open)
    <root>/index/                      RocksDB (raw mode): digest -> ChunkInfo

A chunk is acknowledged only after its file is fsynced, renamed into place and
its directory fsynced, so an acknowledged chunk survives a crash. The files are
the truth; the index (written after the file) answers `has` and GC questions
without a directory walk, and after an unclean stop (no `clean-shutdown`
marker) opening the store re-adopts files the index lost.
Every read re-hashes the content: a chunk that no longer matches its digest
raises `CorruptChunk` and `replication.repair_chunk()` fetches a good copy from a peer.

zstd is used only when it clearly pays (the compressed form at most 90 % of
the original, judged first on a sample so incompressible data costs little).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, cast

import msgspec
import zstandard

from cloudless.blobs.chunking import ChunkDigest
from cloudless.blobs.errors import ChunkMissing, CorruptChunk, InvalidDigest
from cloudless.durable import fsync_directory

log = logging.getLogger(__name__)

CODEC_RAW = 0
CODEC_ZSTD = 1
_ZSTD_LEVEL = 1
_SAMPLE = 64 * 1024
_WORTH_IT = 0.9
SUMMARY_PREFIX_CHARS = 2  # 256 summary buckets keyed by the digest's first hex byte

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def encode_chunk(data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
    """(codec, payload): zstd only when it saves at least 10 %."""
    n = len(data)
    if n >= 256:
        sample = data[:_SAMPLE]
        if n > _SAMPLE and len(_compressor().compress(sample)) > _WORTH_IT * len(sample):
            return CODEC_RAW, data
        packed = _compressor().compress(data)
        if len(packed) <= _WORTH_IT * n:
            return CODEC_ZSTD, packed
    return CODEC_RAW, data


def decode_chunk(codec: int, payload: bytes | memoryview, size_hint: int = 0) -> bytes:
    if codec == CODEC_RAW:
        return bytes(payload)  # the same object when it is bytes already
    if codec == CODEC_ZSTD:
        try:
            return _decompressor().decompress(payload, max_output_size=size_hint or 0)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"chunk payload does not decompress: {exc}") from None
    raise CorruptChunk(f"unknown chunk codec {codec}")


class ChunkInfo(msgspec.Struct, frozen=True, array_like=True):
    size: int
    stored_size: int
    created: float  # written or last touched (`touch`): the GC grace clock


class BucketSummary(msgspec.Struct, frozen=True, array_like=True):
    count: int
    xor: str  # hex XOR of the digests in the bucket: order-free, incremental


class InventorySummary(msgspec.Struct, frozen=True):
    """Per digest-prefix bucket (count, XOR): equal buckets need no listing."""

    buckets: dict[str, BucketSummary]

    def differing(self, other: InventorySummary) -> list[str]:
        keys = set(self.buckets) | set(other.buckets)
        empty = BucketSummary(0, "0" * 64)
        return sorted(k for k in keys if self.buckets.get(k, empty) != other.buckets.get(k, empty))


def summarize(digests: Iterable[str]) -> InventorySummary:
    counts: dict[str, int] = {}
    xors: dict[str, int] = {}
    for d in digests:
        p = d[:SUMMARY_PREFIX_CHARS]
        counts[p] = counts.get(p, 0) + 1
        xors[p] = xors.get(p, 0) ^ int(d, 16)
    return InventorySummary({p: BucketSummary(counts[p], f"{xors[p]:064x}") for p in counts})


class _SummaryAccumulator:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._xors: dict[str, int] = {}
        self._lock = threading.Lock()

    def toggle(self, digest: str, added: bool) -> None:
        p = digest[:SUMMARY_PREFIX_CHARS]
        with self._lock:
            self._counts[p] = self._counts.get(p, 0) + (1 if added else -1)
            self._xors[p] = self._xors.get(p, 0) ^ int(digest, 16)
            if self._counts[p] == 0:
                del self._counts[p], self._xors[p]

    def snapshot(self) -> InventorySummary:
        with self._lock:
            return InventorySummary({p: BucketSummary(c, f"{self._xors[p]:064x}") for p, c in self._counts.items()})


class ChunkStore(Protocol):
    """A node's chunks. Blocking: async callers run these in a worker thread."""

    def put(self, digest: str, data: bytes | memoryview, *, trusted: bool = False) -> bool:
        """Store durably; False if already held. `trusted` skips re-hashing data the caller just hashed."""
        ...

    def get(self, digest: str) -> bytes: ...

    def has(self, digests: Iterable[str]) -> set[str]: ...

    def touch(self, digests: Iterable[str]) -> set[str]:
        """Like `has`, and restarts the GC grace period of the held ones: a write that
        dedups against an old chunk must not lose it to GC before its manifest commits."""
        ...

    def info(self, digest: str) -> ChunkInfo | None: ...

    def delete(self, digest: str, *, older_than: float | None = None) -> bool:
        """Remove the chunk; with `older_than`, only if it was written or touched before then
        (checked atomically with the delete, so GC cannot race a `touch`)."""
        ...

    def digests(self, prefix: str = "") -> Iterator[str]: ...

    def summary(self) -> InventorySummary: ...

    def capacity(self) -> tuple[int, int]:
        """(capacity bytes, free bytes)."""
        ...


def _check_content(digest: str, data: bytes | memoryview) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise CorruptChunk(f"chunk {digest[:16]}… holds content hashing to {actual[:16]}…", digest=digest)


class LocalChunkStore:
    """Chunk files under `root` with a RocksDB index (see module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        clock: Callable[[], float] = time.time,
        capacity_bytes: int | None = None,
    ) -> None:
        # Loaded when a store opens: most importers (the CLI, simulators) never open one.
        from rocksdict import Options, Rdict, WriteOptions

        self.root = Path(root)
        self._chunks = self.root / "chunks"
        self._tmp = self.root / "tmp"
        self._chunks.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)  # partial writes from before a crash
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._capacity_override = capacity_bytes
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = Rdict(str(self.root / "index"), options=options)
        self._wo = WriteOptions()
        self._summary = _SummaryAccumulator()
        # Index read-modify-writes (summary, used bytes) from concurrent worker threads; file IO stays outside.
        self._index_lock = threading.Lock()
        self._known_dirs: set[Path] = set()
        self._used = 0  # stored bytes, for the capacity a placement sees
        for key, raw in self._raw_items():
            self._summary.toggle(key.decode(), True)
            self._used += msgspec.msgpack.decode(raw, type=ChunkInfo).stored_size
        # A crash between a chunk's rename and its index write leaves a file GC cannot see;
        # after an unclean stop, re-adopt such files (a directory walk, only then).
        clean = self.root / "clean-shutdown"
        if not clean.exists():
            adopted = self.rebuild_index()
            if adopted:
                log.info("chunkstore.adopted", extra={"count": adopted, "root": str(self.root)})
        clean.unlink(missing_ok=True)
        fsync_directory(self.root)

    def close(self) -> None:
        self._db.flush_wal(True)
        self._db.close()
        (self.root / "clean-shutdown").touch()
        fsync_directory(self.root)

    # paths -----------------------------------------------------------------

    def path_of(self, digest: str) -> Path:
        return self._chunks / digest[:2] / digest[2:4] / digest

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        if not directory.exists():
            directory.mkdir(parents=True, exist_ok=True)
            fsync_directory(directory.parent)
            fsync_directory(directory.parent.parent)
        self._known_dirs.add(directory)

    # protocol ----------------------------------------------------------------

    def put(self, digest: str, data: bytes | memoryview, *, trusted: bool = False) -> bool:
        ChunkDigest(digest)
        if not trusted:
            _check_content(digest, data)
        key = digest.encode()
        if self._db.get(key) is not None and self.path_of(digest).exists():
            return False
        codec, payload = encode_chunk(data)
        final = self.path_of(digest)
        self._ensure_dir(final.parent)
        tmp = self._tmp / f"{digest[:16]}.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, bytes((codec,)))
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        fsync_directory(final.parent)
        info = ChunkInfo(len(data), len(payload) + 1, self._clock())
        with self._index_lock:
            previous = self._db.get(key)
            self._db.put(key, msgspec.msgpack.encode(info), self._wo)
            if previous is None:
                self._summary.toggle(digest, True)
            else:
                self._used -= msgspec.msgpack.decode(previous, type=ChunkInfo).stored_size
            self._used += info.stored_size
        return True

    def get(self, digest: str) -> bytes:
        ChunkDigest(digest)
        try:
            with open(self.path_of(digest), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {digest[:16]}… is not held here", digest=digest) from None
        if not raw:
            raise CorruptChunk(f"chunk {digest[:16]}… is an empty file", digest=digest)
        info = self.info(digest)
        data = decode_chunk(raw[0], memoryview(raw)[1:] if raw[0] == CODEC_ZSTD else raw[1:], info.size if info else 0)
        _check_content(digest, data)
        return data

    def has(self, digests: Iterable[str]) -> set[str]:
        return {d for d in digests if self._db.get(d.encode()) is not None}

    def touch(self, digests: Iterable[str]) -> set[str]:
        held = set()
        now = self._clock()
        with self._index_lock:
            for d in digests:
                raw = self._db.get(d.encode())
                if raw is not None:
                    info = msgspec.structs.replace(msgspec.msgpack.decode(raw, type=ChunkInfo), created=now)
                    self._db.put(d.encode(), msgspec.msgpack.encode(info), self._wo)
                    held.add(d)
        return held

    def info(self, digest: str) -> ChunkInfo | None:
        raw = self._db.get(digest.encode())
        return None if raw is None else msgspec.msgpack.decode(raw, type=ChunkInfo)

    def delete(self, digest: str, *, older_than: float | None = None) -> bool:
        ChunkDigest(digest)
        key = digest.encode()
        with self._index_lock:
            previous = self._db.get(key)
            if previous is not None and older_than is not None:
                if msgspec.msgpack.decode(previous, type=ChunkInfo).created >= older_than:
                    return False
            if previous is not None:
                self._used -= msgspec.msgpack.decode(previous, type=ChunkInfo).stored_size
                self._summary.toggle(digest, False)
            # Index first: a crash between the two leaves a file the next open re-adopts,
            # never an entry without a file.
            self._db.delete(key, self._wo)
            self.path_of(digest).unlink(missing_ok=True)
        return previous is not None

    def _raw_items(self, from_key: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        # A raw_mode database holds bytes keys and values; rocksdict types them as any key type.
        items = self._db.items() if from_key is None else self._db.items(from_key=from_key)
        return cast(Iterator[tuple[bytes, bytes]], items)

    def digests(self, prefix: str = "") -> Iterator[str]:
        for key, _ in self._raw_items(prefix.encode() if prefix else None):
            d = key.decode()
            if not d.startswith(prefix):
                break
            yield d

    def summary(self) -> InventorySummary:
        return self._summary.snapshot()

    def capacity(self) -> tuple[int, int]:
        st = os.statvfs(self.root)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        if self._capacity_override is not None:
            return self._capacity_override, max(0, min(free, self._capacity_override - self._used))
        return total, free

    @property
    def used_bytes(self) -> int:
        return self._used

    def rebuild_index(self) -> int:
        """Re-adopt chunk files the index lost (crash between rename and index write). Returns how many."""
        added = 0
        for path in self._chunks.glob("*/*/*"):
            d = path.name
            if len(d) != 64 or self._db.get(d.encode()) is not None:
                continue
            try:
                data = self.get(d)
            except (CorruptChunk, ChunkMissing, InvalidDigest):
                path.unlink(missing_ok=True)
                continue
            st = path.stat()
            self._db.put(d.encode(), msgspec.msgpack.encode(ChunkInfo(len(data), st.st_size, st.st_mtime)), self._wo)
            self._summary.toggle(d, True)
            self._used += st.st_size
            added += 1
        return added


class MemoryChunkStore:
    """In-memory twin of `LocalChunkStore` (same verification on read)."""

    def __init__(self, *, clock: Callable[[], float] = time.time, capacity_bytes: int = 1 << 40) -> None:
        self._chunks: dict[str, bytes] = {}
        self._info: dict[str, ChunkInfo] = {}
        self._clock = clock
        self._capacity = capacity_bytes
        self._summary = _SummaryAccumulator()
        self._lock = threading.Lock()  # MemoryChunkPeers may call from worker threads
        self.puts = 0  # chunks actually stored, for dedup assertions

    def put(self, digest: str, data: bytes | memoryview, *, trusted: bool = False) -> bool:
        ChunkDigest(digest)
        if not trusted:
            _check_content(digest, data)
        with self._lock:
            if digest in self._chunks:
                return False
            self._chunks[digest] = bytes(data)
            self._info[digest] = ChunkInfo(len(data), len(data), self._clock())
            self._summary.toggle(digest, True)
            self.puts += 1
        return True

    def get(self, digest: str) -> bytes:
        try:
            data = self._chunks[digest]
        except KeyError:
            raise ChunkMissing(f"chunk {digest[:16]}… is not held here", digest=digest) from None
        _check_content(digest, data)
        return data

    def has(self, digests: Iterable[str]) -> set[str]:
        return {d for d in digests if d in self._chunks}

    def touch(self, digests: Iterable[str]) -> set[str]:
        now = self._clock()
        with self._lock:
            held = self.has(digests)
            for d in held:
                self._info[d] = msgspec.structs.replace(self._info[d], created=now)
        return held

    def info(self, digest: str) -> ChunkInfo | None:
        return self._info.get(digest)

    def delete(self, digest: str, *, older_than: float | None = None) -> bool:
        with self._lock:
            info = self._info.get(digest)
            if info is None or (older_than is not None and info.created >= older_than):
                return False
            del self._chunks[digest]
            del self._info[digest]
            self._summary.toggle(digest, False)
        return True

    def digests(self, prefix: str = "") -> Iterator[str]:
        return iter(sorted(d for d in self._chunks if d.startswith(prefix)))

    def summary(self) -> InventorySummary:
        return self._summary.snapshot()

    def capacity(self) -> tuple[int, int]:
        used = sum(len(v) for v in self._chunks.values())
        return self._capacity, max(0, self._capacity - used)

    def flip_byte(self, digest: str, index: int = 0) -> None:
        """Test hook: corrupt a stored chunk in place."""
        data = bytearray(self._chunks[digest])
        data[index % len(data)] ^= 0xFF
        self._chunks[digest] = bytes(data)
