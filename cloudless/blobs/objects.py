"""The object service: buckets, objects and multipart uploads over chunks.

Put streams the body through the chunker; each chunk is hashed and replicated
by a few concurrent workers while the next is being cut, and the manifest is
stored only after every chunk is durable on its replicas — that single step is
what makes the object visible. Get (`copy_range`) fetches a few chunks ahead
in parallel — this node's copy first, else a peer's — verifies each, and
writes them out in order.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence

import msgspec
import trio

from cloudless.blobs.antientropy import DEFAULT_GC_GRACE, collect_garbage, policy_of
from cloudless.blobs.chunking import ChunkDigest, ChunkingParams, ChunkRef, StreamChunker
from cloudless.blobs.chunkstore import ChunkStore
from cloudless.blobs.errors import (
    BadDigest,
    EntityTooSmall,
    IncompleteBody,
    InvalidPart,
    InvalidPartOrder,
    NoSuchUpload,
    single_error,
)
from cloudless.blobs.manifest import (
    AccessKey,
    Bucket,
    ListPage,
    MetadataStore,
    MultipartUpload,
    ObjectManifest,
    UploadPart,
    validate_bucket_name,
    validate_object_key,
)
from cloudless.blobs.peers import ChunkPeers
from cloudless.blobs.placement import StorageMember
from cloudless.blobs.replication import InFlightChunks, Replicator, UploadPins
from cloudless.errors import InvalidInput

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000
DEFAULT_CONTENT_TYPE = "binary/octet-stream"
_READ_BLOCK = 8 << 20

Body = AsyncIterable[bytes] | bytes


def parse_content_md5(value: str) -> bytes:
    """The raw 16-byte MD5 from a Content-MD5 header (base64), or InvalidInput."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise InvalidContentMD5(f"Content-MD5 {value[:40]!r} is not a base64 MD5")
    return raw


class InvalidContentMD5(InvalidInput):
    code = "invalid_content_md5"


def multipart_etag(part_md5_hex: Sequence[str]) -> str:
    """S3's rule: hex MD5 of the concatenated binary part MD5s, dash, part count."""
    joined = b"".join(bytes.fromhex(e) for e in part_md5_hex)
    return f"{hashlib.md5(joined).hexdigest()}-{len(part_md5_hex)}"


async def body_pieces(body: Body) -> AsyncIterator[bytes]:
    if isinstance(body, (bytes, bytearray, memoryview)):
        view = memoryview(body)
        for i in range(0, len(view), _READ_BLOCK):
            yield bytes(view[i : i + _READ_BLOCK])
        return
    async for piece in body:
        yield piece


class _Written(msgspec.Struct):
    size: int
    md5: bytes
    chunks: list[ChunkRef]


class ObjectService:
    def __init__(
        self,
        metadata: MetadataStore,
        chunks: ChunkStore,
        peers: ChunkPeers | None = None,
        members: Callable[[], Sequence[StorageMember]] | None = None,
        *,
        node_id: str = "local",
        replication: int = 2,
        clock: Callable[[], float] = time.time,
        write_workers: int = 3,
        min_part_size: int = MIN_PART_SIZE,
        min_durable: int = 1,
    ) -> None:
        self.metadata = metadata
        self.chunks = chunks
        self.peers = peers
        self.node_id = node_id
        self.replication = replication
        self.clock = clock
        self.min_part_size = min_part_size
        self.in_flight = InFlightChunks()
        self._members = members or self._only_this_node
        self._workers = write_workers
        self._threads = trio.CapacityLimiter(max(2, write_workers + 1))
        self.replicator = Replicator(
            node_id, chunks, peers, self._members, local_threads=self._threads, min_durable=min_durable
        )

    def _only_this_node(self) -> list[StorageMember]:
        capacity, free = self.chunks.capacity()
        return [StorageMember(self.node_id, capacity_bytes=capacity, free_bytes=free)]

    # buckets -------------------------------------------------------------------

    async def create_bucket(
        self,
        name: str,
        *,
        replicas: int | None = None,
        avg_chunk: int | None = None,
        allow_battery: bool = False,
        allow_metered: bool = False,
        owner: str = "",
    ) -> Bucket:
        validate_bucket_name(name)
        params = ChunkingParams(avg_chunk) if avg_chunk else ChunkingParams()
        r = self.replication if replicas is None else replicas
        if not 1 <= r <= 16:
            raise InvalidInput(f"replicas must be in [1, 16], got {r}", field="replicas")
        bucket = Bucket(
            name,
            self.clock(),
            replicas=r,
            avg_chunk=params.avg_size,
            allow_battery=allow_battery,
            allow_metered=allow_metered,
            owner=owner,
        )
        await self.metadata.create_bucket(bucket)
        log.info("bucket.created", extra={"bucket": name, "replicas": r})
        return bucket

    async def head_bucket(self, name: str) -> Bucket:
        return await self.metadata.get_bucket(name)

    async def list_buckets(self) -> list[Bucket]:
        return await self.metadata.list_buckets()

    async def delete_bucket(self, name: str) -> None:
        await self.metadata.delete_bucket(name)
        log.info("bucket.deleted", extra={"bucket": name})

    # writing -------------------------------------------------------------------

    async def _write(self, bucket: Bucket, body: Body, pins: UploadPins, expected_size: int | None) -> _Written:
        """Chunk, hash and replicate `body`; every chunk is durable on return."""
        policy = policy_of(bucket)
        chunker = StreamChunker(ChunkingParams(bucket.avg_chunk))
        md5 = hashlib.md5()
        refs: dict[int, ChunkRef] = {}
        size = 0
        send, receive = trio.open_memory_channel[tuple[int, memoryview]](self._workers)

        async def worker(receive: trio.MemoryReceiveChannel[tuple[int, memoryview]]) -> None:
            async with receive:
                async for offset, data in receive:
                    digest = await trio.to_thread.run_sync(ChunkDigest.of, data, limiter=self._threads)
                    pins.add(digest)
                    await self.replicator.write(digest, data, policy)
                    refs[offset] = ChunkRef(digest, len(data), offset)

        # MD5 (the ETag) is sequential over the whole body: it runs in its own thread task,
        # overlapping the cutting and the per-chunk SHA-256 and writes.
        md5_send, md5_receive = trio.open_memory_channel[bytes](4)

        async def hasher() -> None:
            async with md5_receive:
                async for piece in md5_receive:
                    await trio.to_thread.run_sync(md5.update, piece, limiter=self._threads)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self._workers):
                    nursery.start_soon(worker, receive.clone())
                await receive.aclose()
                nursery.start_soon(hasher)
                async with send, md5_send:
                    async for piece in body_pieces(body):
                        size += len(piece)
                        if expected_size is not None and size > expected_size:
                            raise IncompleteBody(f"body is longer than the declared {expected_size} bytes")
                        await md5_send.send(piece)
                        ready = await trio.to_thread.run_sync(chunker.feed, piece, limiter=self._threads)
                        for item in ready:
                            await send.send(item)
                    for item in await trio.to_thread.run_sync(chunker.finish, limiter=self._threads):
                        await send.send(item)
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        if expected_size is not None and size != expected_size:
            raise IncompleteBody(f"body has {size} bytes, {expected_size} were declared", size=size)
        return _Written(size, md5.digest(), [refs[k] for k in sorted(refs)])

    async def put_object(
        self,
        bucket: str,
        key: str,
        body: Body,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: dict[str, str] | None = None,
        content_md5: bytes | None = None,
        expected_size: int | None = None,
        expected_version: int | None = None,
    ) -> ObjectManifest:
        validate_object_key(key)
        b = await self.metadata.get_bucket(bucket)
        with self.in_flight.pinned() as pins:
            written = await self._write(b, body, pins, expected_size)
            if content_md5 is not None and written.md5 != content_md5:
                raise BadDigest("the Content-MD5 you specified did not match what was received", key=key)
            manifest = ObjectManifest(
                bucket=bucket,
                key=key,
                size=written.size,
                etag=written.md5.hex(),
                content_type=content_type or DEFAULT_CONTENT_TYPE,
                metadata=dict(metadata or {}),
                chunks=written.chunks,
                version=0,
                created=self.clock(),
            )
            stored = await self.metadata.put_manifest(manifest, expected_version)
        log.info("object.put", extra={"bucket": bucket, "key": key, "size": stored.size, "chunks": len(stored.chunks)})
        return stored

    # reading -------------------------------------------------------------------

    async def head_object(self, bucket: str, key: str) -> ObjectManifest:
        return await self.metadata.get_manifest(bucket, key)

    async def read_range(
        self, manifest: ObjectManifest, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes [start, end] (inclusive, clamped) of the object, chunk by chunk, each verified."""
        if manifest.size == 0:
            return
        last = manifest.size - 1 if end is None else min(end, manifest.size - 1)
        bucket = await self.metadata.get_bucket(manifest.bucket)
        policy = policy_of(bucket)
        for ref in manifest.chunks:
            if ref.offset + ref.size <= start:
                continue
            if ref.offset > last:
                break
            data = await self.replicator.read(ref.digest, policy)
            lo = max(start - ref.offset, 0)
            hi = min(last - ref.offset + 1, ref.size)
            yield data if (lo == 0 and hi == len(data)) else data[lo:hi]

    async def copy_range(
        self,
        manifest: ObjectManifest,
        write: Callable[[bytes], Awaitable[None]],
        start: int = 0,
        end: int | None = None,
        *,
        readahead: int = 4,
    ) -> int:
        """Like `read_range` but pushing into `write`, fetching up to `readahead` chunks ahead
        (in parallel, from this node or peers) while earlier ones are written. Returns bytes written."""
        if manifest.size == 0:
            return 0
        last = manifest.size - 1 if end is None else min(end, manifest.size - 1)
        policy = policy_of(await self.metadata.get_bucket(manifest.bucket))
        spans = [
            (ref, max(start - ref.offset, 0), min(last - ref.offset + 1, ref.size))
            for ref in manifest.chunks
            if ref.offset + ref.size > start and ref.offset <= last
        ]
        results: list[bytes | None] = [None] * len(spans)
        ready = [trio.Event() for _ in spans]
        window = trio.Semaphore(max(1, readahead))
        written = 0

        async def fetch(i: int) -> None:
            results[i] = await self.replicator.read(spans[i][0].digest, policy)
            ready[i].set()

        async def launch(nursery: trio.Nursery) -> None:
            for i in range(len(spans)):
                await window.acquire()
                nursery.start_soon(fetch, i)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(launch, nursery)
                for i, (_ref, lo, hi) in enumerate(spans):
                    await ready[i].wait()
                    data, results[i] = results[i], None
                    assert data is not None
                    await write(data if (lo == 0 and hi == len(data)) else data[lo:hi])
                    written += hi - lo
                    window.release()
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        return written

    async def get_object(
        self, bucket: str, key: str, start: int = 0, end: int | None = None
    ) -> tuple[ObjectManifest, AsyncIterator[bytes]]:
        manifest = await self.metadata.get_manifest(bucket, key)
        return manifest, self.read_range(manifest, start, end)

    async def get_bytes(self, bucket: str, key: str) -> bytes:
        manifest = await self.metadata.get_manifest(bucket, key)
        pieces: list[bytes] = []

        async def collect(piece: bytes) -> None:
            pieces.append(piece)

        await self.copy_range(manifest, collect)
        return b"".join(pieces)

    async def delete_object(self, bucket: str, key: str) -> bool:
        """Deleting a missing key is not an error (S3 semantics); chunks go at GC."""
        deleted = await self.metadata.delete_manifest(bucket, key)
        if deleted:
            log.info("object.deleted", extra={"bucket": bucket, "key": key})
        return deleted

    async def list_objects(
        self, bucket: str, prefix: str = "", delimiter: str = "", marker: str = "", max_keys: int = 1000
    ) -> ListPage:
        return await self.metadata.list_manifests(bucket, prefix, delimiter, marker, max_keys)

    # multipart -----------------------------------------------------------------

    async def create_multipart(
        self, bucket: str, key: str, *, content_type: str = DEFAULT_CONTENT_TYPE, metadata: dict[str, str] | None = None
    ) -> MultipartUpload:
        validate_object_key(key)
        await self.metadata.get_bucket(bucket)
        upload = MultipartUpload(
            upload_id=secrets.token_urlsafe(24),
            bucket=bucket,
            key=key,
            initiated=self.clock(),
            content_type=content_type or DEFAULT_CONTENT_TYPE,
            metadata=dict(metadata or {}),
        )
        await self.metadata.create_upload(upload)
        return upload

    async def upload_part(
        self,
        upload_id: str,
        part_number: int,
        body: Body,
        *,
        content_md5: bytes | None = None,
        expected_size: int | None = None,
    ) -> UploadPart:
        if not 1 <= part_number <= MAX_PARTS:
            raise InvalidInput(f"part number must be in [1, {MAX_PARTS}], got {part_number}", field="partNumber")
        upload = await self.metadata.get_upload(upload_id)
        bucket = await self.metadata.get_bucket(upload.bucket)
        with self.in_flight.pinned() as pins:
            written = await self._write(bucket, body, pins, expected_size)
            if content_md5 is not None and written.md5 != content_md5:
                raise BadDigest("the Content-MD5 you specified did not match what was received")
            part = UploadPart(upload_id, part_number, written.size, written.md5.hex(), written.chunks, self.clock())
            # Stored while pinned: from here the part record keeps its chunks from GC.
            await self.metadata.put_part(part)
        return part

    async def complete_multipart(self, upload_id: str, parts: Sequence[tuple[int, str]]) -> ObjectManifest:
        """`parts`: (part number, ETag) as the client lists them, ascending."""
        upload = await self.metadata.get_upload(upload_id)
        if not parts:
            raise InvalidPart("you must specify at least one part")
        stored = {p.part_number: p for p in await self.metadata.list_parts(upload_id)}
        numbers = [n for n, _ in parts]
        if numbers != sorted(numbers) or len(set(numbers)) != len(numbers):
            raise InvalidPartOrder("the list of parts was not in ascending order")
        chosen: list[UploadPart] = []
        for number, etag in parts:
            part = stored.get(number)
            if part is None or part.etag != etag.strip('"').lower():
                raise InvalidPart(f"part {number} was not uploaded or its ETag does not match", part_number=number)
            chosen.append(part)
        for part in chosen[:-1]:
            if part.size < self.min_part_size:
                raise EntityTooSmall(
                    f"part {part.part_number} is {part.size} bytes; all but the last must be at least "
                    f"{self.min_part_size}",
                    part_number=part.part_number,
                    size=part.size,
                )
        chunks: list[ChunkRef] = []
        offset = 0
        for part in chosen:
            chunks.extend(ChunkRef(c.digest, c.size, offset + c.offset) for c in part.chunks)
            offset += part.size
        manifest = ObjectManifest(
            bucket=upload.bucket,
            key=upload.key,
            size=offset,
            etag=multipart_etag([p.etag for p in chosen]),
            content_type=upload.content_type,
            metadata=dict(upload.metadata),
            chunks=chunks,
            version=0,
            created=self.clock(),
            part_count=len(chosen),
        )
        result = await self.metadata.complete_upload(upload_id, manifest)
        log.info("object.put", extra={"bucket": upload.bucket, "key": upload.key, "size": offset, "parts": len(chosen)})
        return result

    async def abort_multipart(self, upload_id: str) -> None:
        await self.metadata.abort_upload(upload_id)

    async def list_uploads(self, bucket: str) -> list[MultipartUpload]:
        return await self.metadata.list_uploads(bucket)

    async def list_parts(self, upload_id: str) -> list[UploadPart]:
        return await self.metadata.list_parts(upload_id)

    async def get_upload(self, upload_id: str, bucket: str | None = None, key: str | None = None) -> MultipartUpload:
        upload = await self.metadata.get_upload(upload_id)
        if (bucket is not None and upload.bucket != bucket) or (key is not None and upload.key != key):
            raise NoSuchUpload(f"no multipart upload {upload_id!r} for {bucket}/{key}", upload_id=upload_id)
        return upload

    # access keys ---------------------------------------------------------------

    async def create_access_key(self, owner: str = "admin", description: str = "") -> AccessKey:
        key = AccessKey(
            access_key="CL" + secrets.token_hex(9).upper(),
            secret_key=secrets.token_urlsafe(30),
            created=self.clock(),
            owner=owner,
            description=description,
        )
        await self.metadata.put_access_key(key)
        log.info("s3.key_created", extra={"access_key": key.access_key, "owner": owner})
        return key

    # maintenance ---------------------------------------------------------------

    async def collect_garbage(self, grace: float = DEFAULT_GC_GRACE) -> list[str]:
        referenced = await self.metadata.referenced_digests()
        now = self.clock()
        return await trio.to_thread.run_sync(
            lambda: collect_garbage(self.chunks, referenced, self.in_flight, now, grace)
        )


def iter_file(path: str, block: int = _READ_BLOCK) -> AsyncIterator[bytes]:
    """A file as an async stream of blocks read in a worker thread."""

    async def gen() -> AsyncIterator[bytes]:
        f = await trio.to_thread.run_sync(open, path, "rb")
        try:
            while True:
                piece = await trio.to_thread.run_sync(f.read, block)
                if not piece:
                    return
                yield piece
        finally:
            f.close()

    return gen()


__all__ = [
    "MIN_PART_SIZE",
    "ObjectService",
    "iter_file",
    "multipart_etag",
    "parse_content_md5",
]
