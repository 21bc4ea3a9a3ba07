"""The blob catalog: buckets, manifests, uploads and access keys as a
deterministic state machine over an ordered key-value map.

Every change is a `BlobCommand` (msgspec, tagged, validated on decode) applied
by `Catalog.apply`, so the same code runs in `LocalMetadataStore` (commands
applied locally, RocksDB or memory) and in the cluster's Raft state machine
(commands proposed, committed, then applied on every replica). Commands carry
everything that varies (times, upload ids, versions expected), nothing is
read from the environment during apply, and a command whose precondition
fails raises a blob error and changes nothing.

Key layout (byte order = listing order):

    b/<bucket>                 Bucket
    o/<bucket>/<key>           ObjectManifest
    u/<upload id>              MultipartUpload
    p/<upload id>/<part:05d>   UploadPart
    k/<access key>             AccessKey
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypeVar, cast

import msgspec
import trio

from cloudless.blobs.commands import (
    AbortUpload,
    BlobCommand,
    CompleteUpload,
    CreateBucket,
    CreateUpload,
    DeleteAccessKey,
    DeleteBucket,
    DeleteManifest,
    InvalidBlobCommand,
    PutAccessKey,
    PutManifest,
    PutPart,
)
from cloudless.blobs.errors import (
    BucketAlreadyExists,
    BucketNotEmpty,
    NoSuchAccessKey,
    NoSuchBucket,
    NoSuchKey,
    NoSuchUpload,
    PreconditionFailed,
)
from cloudless.blobs.manifest import (
    AccessKey,
    Bucket,
    ListPage,
    MultipartUpload,
    ObjectManifest,
    UploadPart,
    validate_bucket_name,
    validate_object_key,
)

_enc = msgspec.msgpack.Encoder()


# Ordered key-value maps ----------------------------------------------------------


class OrderedKV(Protocol):
    def get(self, key: bytes) -> bytes | None: ...
    def scan(self, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Pairs with key >= start, in key order, while the key starts with `prefix`."""
        ...

    def write(self, puts: dict[bytes, bytes], deletes: list[bytes]) -> None:
        """One atomic (and, where the map is durable, synced) batch."""
        ...


class MemoryKV:
    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def scan(self, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        i = bisect.bisect_left(self._keys, start)
        for k in self._keys[i:]:
            if not k.startswith(prefix):
                return
            v = self._data.get(k)
            if v is not None:
                yield k, v

    def write(self, puts: dict[bytes, bytes], deletes: list[bytes]) -> None:
        for k in deletes:
            if self._data.pop(k, None) is not None:
                del self._keys[bisect.bisect_left(self._keys, k)]
        for k, v in puts.items():
            if k not in self._data:
                bisect.insort(self._keys, k)
            self._data[k] = v

    def close(self) -> None:
        pass


class RocksKV:
    """RocksDB (rocksdict raw mode); every batch is written with sync=True (durable when acknowledged)."""

    def __init__(self, path: Path) -> None:
        # Loaded when a store opens: most importers (the CLI, simulators) never open one.
        from rocksdict import Options, Rdict, WriteOptions

        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = Rdict(str(path), options=options)
        self._sync = WriteOptions()
        self._sync.sync = True

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def scan(self, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        # A raw_mode database holds bytes keys and values; rocksdict types them as any key type.
        items = cast(Iterator[tuple[bytes, bytes]], self._db.items(from_key=start))
        for k, v in items:
            if not k.startswith(prefix):
                return
            yield k, v

    def write(self, puts: dict[bytes, bytes], deletes: list[bytes]) -> None:
        from rocksdict import WriteBatch  # loaded already: __init__ opened the store

        batch = WriteBatch(raw_mode=True)
        for k in deletes:
            batch.delete(k)
        for k, v in puts.items():
            batch.put(k, v)
        self._db.write(batch, self._sync)

    def close(self) -> None:
        self._db.close()


# The state machine ------------------------------------------------------------------


_T = TypeVar("_T")


def _dec(kind: type[_T], raw: bytes) -> _T:
    return msgspec.msgpack.decode(raw, type=kind)


def _bkey(name: str) -> bytes:
    return f"b/{name}".encode()


def _okey(bucket: str, key: str = "") -> bytes:
    return f"o/{bucket}/{key}".encode()


def _ukey(upload_id: str) -> bytes:
    return f"u/{upload_id}".encode()


def _pkey(upload_id: str, part: int | None = None) -> bytes:
    return f"p/{upload_id}/".encode() + (b"" if part is None else f"{part:05d}".encode())


def _kkey(access_key: str) -> bytes:
    return f"k/{access_key}".encode()


class Catalog:
    """Blob metadata over an `OrderedKV`: `apply(command)` changes it, the rest reads it.

    Not thread-safe: callers serialise `apply` (the Raft apply loop does; the
    local store holds a lock).
    """

    def __init__(self, kv: OrderedKV) -> None:
        self.kv = kv

    # writes --------------------------------------------------------------------

    def apply(self, command: BlobCommand) -> object:
        """Apply one command; returns the stored manifest (puts), a bool (deletes) or None."""
        handler = getattr(self, "_apply_" + type(command).__name__)
        return handler(command)

    def _apply_CreateBucket(self, c: CreateBucket) -> None:
        validate_bucket_name(c.bucket.name)
        if self.kv.get(_bkey(c.bucket.name)) is not None:
            raise BucketAlreadyExists(f"bucket {c.bucket.name!r} already exists", bucket=c.bucket.name)
        self.kv.write({_bkey(c.bucket.name): _enc.encode(c.bucket)}, [])

    def _apply_DeleteBucket(self, c: DeleteBucket) -> None:
        self.get_bucket(c.name)
        for _ in self.kv.scan(_okey(c.name), _okey(c.name)):
            raise BucketNotEmpty(f"bucket {c.name!r} is not empty", bucket=c.name)
        deletes = [_bkey(c.name)]
        for k, v in self.kv.scan(b"u/", b"u/"):
            upload = _dec(MultipartUpload, v)
            if upload.bucket == c.name:
                deletes.append(k)
                deletes.extend(pk for pk, _ in self.kv.scan(_pkey(upload.upload_id), _pkey(upload.upload_id)))
        self.kv.write({}, deletes)

    def _versioned(self, manifest: ObjectManifest, expected_version: int | None) -> ObjectManifest:
        validate_object_key(manifest.key)
        self.get_bucket(manifest.bucket)
        raw = self.kv.get(_okey(manifest.bucket, manifest.key))
        current = 0 if raw is None else _dec(ObjectManifest, raw).version
        if expected_version is not None and expected_version != current:
            raise PreconditionFailed(
                f"{manifest.bucket}/{manifest.key} is at version {current}, not {expected_version}", current=current
            )
        return msgspec.structs.replace(manifest, version=current + 1)

    def _apply_PutManifest(self, c: PutManifest) -> ObjectManifest:
        stored = self._versioned(c.manifest, c.expected_version)
        self.kv.write({_okey(stored.bucket, stored.key): _enc.encode(stored)}, [])
        return stored

    def _apply_DeleteManifest(self, c: DeleteManifest) -> bool:
        self.get_bucket(c.bucket)
        raw = self.kv.get(_okey(c.bucket, c.key))
        current = 0 if raw is None else _dec(ObjectManifest, raw).version
        if c.expected_version is not None and c.expected_version != current:
            raise PreconditionFailed(f"{c.bucket}/{c.key} is at version {current}, not {c.expected_version}")
        if raw is None:
            return False
        self.kv.write({}, [_okey(c.bucket, c.key)])
        return True

    def _apply_CreateUpload(self, c: CreateUpload) -> None:
        validate_object_key(c.upload.key)
        self.get_bucket(c.upload.bucket)
        if self.kv.get(_ukey(c.upload.upload_id)) is not None:
            raise InvalidBlobCommand(f"upload id {c.upload.upload_id!r} is taken")
        self.kv.write({_ukey(c.upload.upload_id): _enc.encode(c.upload)}, [])

    def _apply_PutPart(self, c: PutPart) -> None:
        self.get_upload(c.part.upload_id)
        self.kv.write({_pkey(c.part.upload_id, c.part.part_number): _enc.encode(c.part)}, [])

    def _upload_keys(self, upload_id: str) -> list[bytes]:
        return [_ukey(upload_id)] + [k for k, _ in self.kv.scan(_pkey(upload_id), _pkey(upload_id))]

    def _apply_CompleteUpload(self, c: CompleteUpload) -> ObjectManifest:
        self.get_upload(c.upload_id)
        stored = self._versioned(c.manifest, None)
        self.kv.write({_okey(stored.bucket, stored.key): _enc.encode(stored)}, self._upload_keys(c.upload_id))
        return stored

    def _apply_AbortUpload(self, c: AbortUpload) -> None:
        self.get_upload(c.upload_id)
        self.kv.write({}, self._upload_keys(c.upload_id))

    def _apply_PutAccessKey(self, c: PutAccessKey) -> None:
        self.kv.write({_kkey(c.key.access_key): _enc.encode(c.key)}, [])

    def _apply_DeleteAccessKey(self, c: DeleteAccessKey) -> None:
        self.get_access_key(c.access_key)
        self.kv.write({}, [_kkey(c.access_key)])

    # reads ---------------------------------------------------------------------

    def get_bucket(self, name: str) -> Bucket:
        raw = self.kv.get(_bkey(name))
        if raw is None:
            raise NoSuchBucket(f"no bucket {name!r}", bucket=name)
        return _dec(Bucket, raw)

    def list_buckets(self) -> list[Bucket]:
        return [_dec(Bucket, v) for _, v in self.kv.scan(b"b/", b"b/")]

    def get_manifest(self, bucket: str, key: str) -> ObjectManifest:
        raw = self.kv.get(_okey(bucket, key))
        if raw is None:
            self.get_bucket(bucket)
            raise NoSuchKey(f"no object {bucket}/{key}", bucket=bucket, key=key)
        return _dec(ObjectManifest, raw)

    def list_manifests(
        self, bucket: str, prefix: str = "", delimiter: str = "", marker: str = "", max_keys: int = 1000
    ) -> ListPage:
        """S3 listing: keys after `marker` under `prefix`, keys sharing the part up to the next
        `delimiter` rolled into one common prefix; at most `max_keys` entries (keys + prefixes)."""
        self.get_bucket(bucket)
        base = _okey(bucket)
        start = base + prefix.encode()
        if marker and marker.encode() >= prefix.encode():
            start = max(start, base + marker.encode() + b"\0")
        objects: list[ObjectManifest] = []
        prefixes: list[str] = []
        last: str | None = None
        truncated = False
        for k, v in self.kv.scan(start, base + prefix.encode()):
            key = k[len(base) :].decode()
            rolled = None
            if delimiter:
                i = key.find(delimiter, len(prefix))
                if i >= 0:
                    rolled = key[: i + len(delimiter)]
            if rolled is not None and (rolled == last or (marker and marker.startswith(rolled))):
                continue  # already reported, on this page or before the marker
            if len(objects) + len(prefixes) >= max_keys:
                truncated = True
                break
            if rolled is not None:
                prefixes.append(rolled)
                last = rolled
            else:
                objects.append(_dec(ObjectManifest, v))
                last = key
        return ListPage(objects, prefixes, truncated, last if truncated else None)

    def get_upload(self, upload_id: str) -> MultipartUpload:
        raw = self.kv.get(_ukey(upload_id))
        if raw is None:
            raise NoSuchUpload(f"no multipart upload {upload_id!r}", upload_id=upload_id)
        return _dec(MultipartUpload, raw)

    def list_parts(self, upload_id: str) -> list[UploadPart]:
        self.get_upload(upload_id)
        return [_dec(UploadPart, v) for _, v in self.kv.scan(_pkey(upload_id), _pkey(upload_id))]

    def list_uploads(self, bucket: str) -> list[MultipartUpload]:
        self.get_bucket(bucket)
        uploads = [_dec(MultipartUpload, v) for _, v in self.kv.scan(b"u/", b"u/")]
        return sorted((u for u in uploads if u.bucket == bucket), key=lambda u: (u.key, u.initiated, u.upload_id))

    def get_access_key(self, access_key: str) -> AccessKey:
        raw = self.kv.get(_kkey(access_key))
        if raw is None:
            raise NoSuchAccessKey(f"no access key {access_key[:40]!r}")
        return _dec(AccessKey, raw)

    def list_access_keys(self) -> list[AccessKey]:
        return [_dec(AccessKey, v) for _, v in self.kv.scan(b"k/", b"k/")]

    def referenced_digests(self) -> set[str]:
        out: set[str] = set()
        for _, v in self.kv.scan(b"o/", b"o/"):
            out.update(c.digest for c in _dec(ObjectManifest, v).chunks)
        for _, v in self.kv.scan(b"p/", b"p/"):
            out.update(c.digest for c in _dec(UploadPart, v).chunks)
        return out

    # snapshots (for a Raft state machine holding the catalog in a MemoryKV) --------

    def export(self) -> bytes:
        return _enc.encode([(k, v) for k, v in self.kv.scan(b"", b"")])

    @classmethod
    def restore(cls, data: bytes) -> Catalog:
        kv = MemoryKV()
        kv.write({bytes(k): bytes(v) for k, v in msgspec.msgpack.decode(data, type=list[tuple[bytes, bytes]])}, [])
        return cls(kv)


class LocalMetadataStore:
    """`MetadataStore` on one node: the `Catalog` over RocksDB at `path`, or in memory when `path` is None.

    Changes are `BlobCommand`s applied under a lock (compare-and-set needs the
    read and the write together); RocksDB batches are synced before returning.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._kv = MemoryKV() if path is None else RocksKV(Path(path))
        self.catalog = Catalog(self._kv)
        self._in_memory = path is None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._kv.close()

    async def apply(self, command: object) -> object:
        def op() -> object:
            with self._lock:
                return self.catalog.apply(command)  # type: ignore[arg-type]

        if self._in_memory:
            return op()
        return await trio.to_thread.run_sync(op)

    async def create_bucket(self, bucket: Bucket) -> None:
        await self.apply(CreateBucket(bucket))

    async def get_bucket(self, name: str) -> Bucket:
        return self.catalog.get_bucket(name)

    async def list_buckets(self) -> list[Bucket]:
        return self.catalog.list_buckets()

    async def delete_bucket(self, name: str) -> None:
        await self.apply(DeleteBucket(name))

    async def put_manifest(self, manifest: ObjectManifest, expected_version: int | None = None) -> ObjectManifest:
        return await self.apply(PutManifest(manifest, expected_version))  # type: ignore[return-value]

    async def get_manifest(self, bucket: str, key: str) -> ObjectManifest:
        return self.catalog.get_manifest(bucket, key)

    async def delete_manifest(self, bucket: str, key: str, expected_version: int | None = None) -> bool:
        return await self.apply(DeleteManifest(bucket, key, expected_version))  # type: ignore[return-value]

    async def list_manifests(
        self, bucket: str, prefix: str = "", delimiter: str = "", marker: str = "", max_keys: int = 1000
    ) -> ListPage:
        return self.catalog.list_manifests(bucket, prefix, delimiter, marker, max_keys)

    async def create_upload(self, upload: MultipartUpload) -> None:
        await self.apply(CreateUpload(upload))

    async def get_upload(self, upload_id: str) -> MultipartUpload:
        return self.catalog.get_upload(upload_id)

    async def put_part(self, part: UploadPart) -> None:
        await self.apply(PutPart(part))

    async def list_parts(self, upload_id: str) -> list[UploadPart]:
        return self.catalog.list_parts(upload_id)

    async def list_uploads(self, bucket: str) -> list[MultipartUpload]:
        return self.catalog.list_uploads(bucket)

    async def complete_upload(self, upload_id: str, manifest: ObjectManifest) -> ObjectManifest:
        return await self.apply(CompleteUpload(upload_id, manifest))  # type: ignore[return-value]

    async def abort_upload(self, upload_id: str) -> None:
        await self.apply(AbortUpload(upload_id))

    async def put_access_key(self, key: AccessKey) -> None:
        await self.apply(PutAccessKey(key))

    async def get_access_key(self, access_key: str) -> AccessKey:
        return self.catalog.get_access_key(access_key)

    async def list_access_keys(self) -> list[AccessKey]:
        return self.catalog.list_access_keys()

    async def delete_access_key(self, access_key: str) -> None:
        await self.apply(DeleteAccessKey(access_key))

    async def referenced_digests(self) -> set[str]:
        if self._in_memory:
            return self.catalog.referenced_digests()
        return await trio.to_thread.run_sync(self.catalog.referenced_digests)
