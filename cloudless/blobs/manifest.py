"""The blob metadata vocabulary (buckets, object manifests, multipart uploads,
access keys) and the `MetadataStore` that holds it.

An object exists exactly when its manifest is stored: the data path writes
every chunk durably first and then puts the manifest in one atomic step, so a
crash mid-upload leaves only unreferenced chunks (which GC reclaims) and never
a partial object. `put_manifest` is a compare-and-set on the manifest version,
which is what the cluster's Raft-backed store implements too.

Access keys hold their secret in the clear: SigV4 verification recomputes the
HMAC from the secret itself, so a hash would not do. The secret is as
sensitive as the metadata store (replicated to coordinators only).

`LocalMetadataStore` keeps everything in one RocksDB (raw mode, synced
writes) or, with no path, in memory (the twin):

    b/<bucket>                 Bucket
    o/<bucket>/<key>           ObjectManifest
    u/<upload id>              MultipartUpload
    p/<upload id>/<part:05d>   UploadPart
    k/<access key>             AccessKey
"""

from __future__ import annotations

import bisect
import re
import threading
from pathlib import Path
from typing import Callable, Iterator, Protocol

import msgspec
import trio

from cloudless.blobs.chunking import DEFAULT_AVG_CHUNK, ChunkRef
from cloudless.blobs.errors import (
    BucketAlreadyExists,
    BucketNotEmpty,
    InvalidBucketName,
    InvalidObjectKey,
    NoSuchAccessKey,
    NoSuchBucket,
    NoSuchKey,
    NoSuchUpload,
    PreconditionFailed,
)

FORMAT_VERSION = 1
MAX_KEY_BYTES = 1024
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_LIKE = re.compile(r"\d+\.\d+\.\d+\.\d+")


def validate_bucket_name(name: str) -> str:
    """S3's bucket naming rules (3-63 chars, lower case, digits, dots, hyphens)."""
    if (
        not isinstance(name, str)
        or not _BUCKET_NAME.fullmatch(name)
        or ".." in name
        or ".-" in name
        or "-." in name
        or _IP_LIKE.fullmatch(name)
    ):
        raise InvalidBucketName(f"invalid bucket name {str(name)[:80]!r}", bucket=name)
    return name


def validate_object_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY_BYTES or "\0" in key:
        raise InvalidObjectKey(f"invalid object key {str(key)[:80]!r}: 1-{MAX_KEY_BYTES} bytes, no NUL", key=key)
    return key


class Bucket(msgspec.Struct, frozen=True):
    name: str
    created: float
    replicas: int = 2
    avg_chunk: int = DEFAULT_AVG_CHUNK
    allow_battery: bool = False
    allow_metered: bool = False
    owner: str = ""
    version: int = FORMAT_VERSION


class ObjectManifest(msgspec.Struct, frozen=True):
    bucket: str
    key: str
    size: int
    etag: str  # hex MD5, or md5(concat(part md5s))-N for multipart objects
    content_type: str
    metadata: dict[str, str]
    chunks: list[ChunkRef]
    version: int  # 1 for the first write of a key, +1 per overwrite (compare-and-set)
    created: float
    part_count: int = 0
    format_version: int = FORMAT_VERSION


class MultipartUpload(msgspec.Struct, frozen=True):
    upload_id: str
    bucket: str
    key: str
    initiated: float
    content_type: str = "binary/octet-stream"
    metadata: dict[str, str] = {}
    format_version: int = FORMAT_VERSION


class UploadPart(msgspec.Struct, frozen=True):
    upload_id: str
    part_number: int
    size: int
    etag: str
    chunks: list[ChunkRef]
    last_modified: float


class AccessKey(msgspec.Struct, frozen=True):
    access_key: str
    secret_key: str  # in the clear: SigV4 needs it (see module docstring)
    created: float
    owner: str = "admin"
    description: str = ""


class ListPage(msgspec.Struct, frozen=True):
    objects: list[ObjectManifest]
    prefixes: list[str]
    truncated: bool
    next_marker: str | None  # last key or common prefix returned, when truncated


class MetadataStore(Protocol):
    async def create_bucket(self, bucket: Bucket) -> None: ...
    async def get_bucket(self, name: str) -> Bucket: ...
    async def list_buckets(self) -> list[Bucket]: ...
    async def delete_bucket(self, name: str) -> None: ...

    async def put_manifest(self, manifest: ObjectManifest, expected_version: int | None = None) -> ObjectManifest:
        """Store atomically; `expected_version` None: unconditional, 0: must not exist, n: current must be n.
        The stored manifest's version is the previous one's plus one."""
        ...

    async def get_manifest(self, bucket: str, key: str) -> ObjectManifest: ...
    async def delete_manifest(self, bucket: str, key: str, expected_version: int | None = None) -> bool: ...
    async def list_manifests(
        self, bucket: str, prefix: str = "", delimiter: str = "", marker: str = "", max_keys: int = 1000
    ) -> ListPage: ...

    async def create_upload(self, upload: MultipartUpload) -> None: ...
    async def get_upload(self, upload_id: str) -> MultipartUpload: ...
    async def put_part(self, part: UploadPart) -> None: ...
    async def list_parts(self, upload_id: str) -> list[UploadPart]: ...
    async def list_uploads(self, bucket: str) -> list[MultipartUpload]: ...
    async def complete_upload(self, upload_id: str, manifest: ObjectManifest) -> ObjectManifest:
        """Store the manifest and drop the upload and its parts, in one atomic step."""
        ...

    async def abort_upload(self, upload_id: str) -> None: ...

    async def put_access_key(self, key: AccessKey) -> None: ...
    async def get_access_key(self, access_key: str) -> AccessKey: ...
    async def list_access_keys(self) -> list[AccessKey]: ...
    async def delete_access_key(self, access_key: str) -> None: ...

    async def referenced_digests(self) -> set[str]:
        """Every digest a manifest or an open upload's part refers to (for GC)."""
        ...


# Ordered key-value backends ---------------------------------------------------


class _MemoryKV:
    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def scan(self, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        i = bisect.bisect_left(self._keys, start)
        keys = self._keys[i:]
        for k in keys:
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


class _RocksKV:
    def __init__(self, path: Path) -> None:
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
        for k, v in self._db.items(from_key=start):
            if not k.startswith(prefix):
                return
            yield k, v

    def write(self, puts: dict[bytes, bytes], deletes: list[bytes]) -> None:
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for k in deletes:
            batch.delete(k)
        for k, v in puts.items():
            batch.put(k, v)
        self._db.write(batch, self._sync)

    def close(self) -> None:
        self._db.close()


_enc = msgspec.msgpack.Encoder()


def _dec(kind: type, raw: bytes):  # type: ignore[no-untyped-def]
    return msgspec.msgpack.decode(raw, type=kind)


def _okey(bucket: str, key: str = "") -> bytes:
    return f"o/{bucket}/{key}".encode()


def _pkey(upload_id: str, part: int | None = None) -> bytes:
    return f"p/{upload_id}/".encode() + (b"" if part is None else f"{part:05d}".encode())


def _after(key: bytes) -> bytes:
    return key + b"\0"


class LocalMetadataStore:
    """`MetadataStore` on one node: RocksDB at `path`, or in memory when `path` is None."""

    def __init__(self, path: Path | None = None) -> None:
        self._kv: _MemoryKV | _RocksKV = _MemoryKV() if path is None else _RocksKV(Path(path))
        self._in_memory = path is None
        # Compare-and-set needs read+write under one lock (writers may be worker threads).
        self._lock = threading.Lock()

    def close(self) -> None:
        self._kv.close()

    async def _run(self, fn: Callable[[], object]):  # type: ignore[no-untyped-def]
        if self._in_memory:
            return fn()
        return await trio.to_thread.run_sync(fn)

    # buckets ---------------------------------------------------------------------

    def _bucket(self, name: str) -> Bucket:
        raw = self._kv.get(f"b/{name}".encode())
        if raw is None:
            raise NoSuchBucket(f"no bucket {name!r}", bucket=name)
        return _dec(Bucket, raw)

    async def create_bucket(self, bucket: Bucket) -> None:
        validate_bucket_name(bucket.name)

        def op() -> None:
            with self._lock:
                if self._kv.get(f"b/{bucket.name}".encode()) is not None:
                    raise BucketAlreadyExists(f"bucket {bucket.name!r} already exists", bucket=bucket.name)
                self._kv.write({f"b/{bucket.name}".encode(): _enc.encode(bucket)}, [])

        await self._run(op)

    async def get_bucket(self, name: str) -> Bucket:
        return self._bucket(name)

    async def list_buckets(self) -> list[Bucket]:
        return [_dec(Bucket, v) for _, v in self._kv.scan(b"b/", b"b/")]

    async def delete_bucket(self, name: str) -> None:
        def op() -> None:
            with self._lock:
                self._bucket(name)
                for _ in self._kv.scan(_okey(name), _okey(name)):
                    raise BucketNotEmpty(f"bucket {name!r} is not empty", bucket=name)
                deletes = [f"b/{name}".encode()]
                for k, v in self._kv.scan(b"u/", b"u/"):
                    upload = _dec(MultipartUpload, v)
                    if upload.bucket == name:
                        deletes.append(k)
                        deletes.extend(pk for pk, _ in self._kv.scan(_pkey(upload.upload_id), _pkey(upload.upload_id)))
                self._kv.write({}, deletes)

        await self._run(op)

    # manifests -------------------------------------------------------------------

    def _check_and_version(self, manifest: ObjectManifest, expected_version: int | None) -> ObjectManifest:
        self._bucket(manifest.bucket)
        raw = self._kv.get(_okey(manifest.bucket, manifest.key))
        current = 0 if raw is None else _dec(ObjectManifest, raw).version
        if expected_version is not None and expected_version != current:
            raise PreconditionFailed(
                f"{manifest.bucket}/{manifest.key} is at version {current}, not {expected_version}",
                current=current,
            )
        return msgspec.structs.replace(manifest, version=current + 1)

    async def put_manifest(self, manifest: ObjectManifest, expected_version: int | None = None) -> ObjectManifest:
        validate_object_key(manifest.key)

        def op() -> ObjectManifest:
            with self._lock:
                stored = self._check_and_version(manifest, expected_version)
                self._kv.write({_okey(manifest.bucket, manifest.key): _enc.encode(stored)}, [])
                return stored

        return await self._run(op)  # type: ignore[return-value]

    async def get_manifest(self, bucket: str, key: str) -> ObjectManifest:
        raw = self._kv.get(_okey(bucket, key))
        if raw is None:
            self._bucket(bucket)
            raise NoSuchKey(f"no object {bucket}/{key}", bucket=bucket, key=key)
        return _dec(ObjectManifest, raw)

    async def delete_manifest(self, bucket: str, key: str, expected_version: int | None = None) -> bool:
        def op() -> bool:
            with self._lock:
                self._bucket(bucket)
                raw = self._kv.get(_okey(bucket, key))
                current = 0 if raw is None else _dec(ObjectManifest, raw).version
                if expected_version is not None and expected_version != current:
                    raise PreconditionFailed(f"{bucket}/{key} is at version {current}, not {expected_version}")
                if raw is None:
                    return False
                self._kv.write({}, [_okey(bucket, key)])
                return True

        return await self._run(op)  # type: ignore[return-value]

    async def list_manifests(
        self, bucket: str, prefix: str = "", delimiter: str = "", marker: str = "", max_keys: int = 1000
    ) -> ListPage:
        self._bucket(bucket)
        base = _okey(bucket)
        start = base + prefix.encode()
        if marker and marker.encode() >= prefix.encode():
            start = max(start, _after(base + marker.encode()))
        objects: list[ObjectManifest] = []
        prefixes: list[str] = []
        last: str | None = None
        truncated = False
        for k, v in self._kv.scan(start, base + prefix.encode()):
            key = k[len(base) :].decode()
            entry_prefix = None
            if delimiter:
                i = key.find(delimiter, len(prefix))
                if i >= 0:
                    entry_prefix = key[: i + len(delimiter)]
            if entry_prefix is not None:
                if entry_prefix == last or (marker and marker.startswith(entry_prefix)):
                    continue  # already reported (this page or before the marker)
                if len(objects) + len(prefixes) >= max_keys:
                    truncated = True
                    break
                prefixes.append(entry_prefix)
                last = entry_prefix
            else:
                if len(objects) + len(prefixes) >= max_keys:
                    truncated = True
                    break
                objects.append(_dec(ObjectManifest, v))
                last = key
        return ListPage(objects, prefixes, truncated, last if truncated else None)

    # multipart -----------------------------------------------------------------------

    async def create_upload(self, upload: MultipartUpload) -> None:
        validate_object_key(upload.key)

        def op() -> None:
            with self._lock:
                self._bucket(upload.bucket)
                self._kv.write({f"u/{upload.upload_id}".encode(): _enc.encode(upload)}, [])

        await self._run(op)

    def _upload(self, upload_id: str) -> MultipartUpload:
        raw = self._kv.get(f"u/{upload_id}".encode())
        if raw is None:
            raise NoSuchUpload(f"no multipart upload {upload_id!r}", upload_id=upload_id)
        return _dec(MultipartUpload, raw)

    async def get_upload(self, upload_id: str) -> MultipartUpload:
        return self._upload(upload_id)

    async def put_part(self, part: UploadPart) -> None:
        def op() -> None:
            with self._lock:
                self._upload(part.upload_id)
                self._kv.write({_pkey(part.upload_id, part.part_number): _enc.encode(part)}, [])

        await self._run(op)

    async def list_parts(self, upload_id: str) -> list[UploadPart]:
        self._upload(upload_id)
        return [_dec(UploadPart, v) for _, v in self._kv.scan(_pkey(upload_id), _pkey(upload_id))]

    async def list_uploads(self, bucket: str) -> list[MultipartUpload]:
        self._bucket(bucket)
        uploads = [_dec(MultipartUpload, v) for _, v in self._kv.scan(b"u/", b"u/")]
        return sorted((u for u in uploads if u.bucket == bucket), key=lambda u: (u.key, u.initiated, u.upload_id))

    async def complete_upload(self, upload_id: str, manifest: ObjectManifest) -> ObjectManifest:
        def op() -> ObjectManifest:
            with self._lock:
                self._upload(upload_id)
                stored = self._check_and_version(manifest, None)
                deletes = [f"u/{upload_id}".encode()]
                deletes.extend(k for k, _ in self._kv.scan(_pkey(upload_id), _pkey(upload_id)))
                self._kv.write({_okey(manifest.bucket, manifest.key): _enc.encode(stored)}, deletes)
                return stored

        return await self._run(op)  # type: ignore[return-value]

    async def abort_upload(self, upload_id: str) -> None:
        def op() -> None:
            with self._lock:
                self._upload(upload_id)
                deletes = [f"u/{upload_id}".encode()]
                deletes.extend(k for k, _ in self._kv.scan(_pkey(upload_id), _pkey(upload_id)))
                self._kv.write({}, deletes)

        await self._run(op)

    # access keys -------------------------------------------------------------------------

    async def put_access_key(self, key: AccessKey) -> None:
        await self._run(lambda: self._kv.write({f"k/{key.access_key}".encode(): _enc.encode(key)}, []))

    async def get_access_key(self, access_key: str) -> AccessKey:
        raw = self._kv.get(f"k/{access_key}".encode())
        if raw is None:
            raise NoSuchAccessKey(f"no access key {access_key[:40]!r}")
        return _dec(AccessKey, raw)

    async def list_access_keys(self) -> list[AccessKey]:
        return [_dec(AccessKey, v) for _, v in self._kv.scan(b"k/", b"k/")]

    async def delete_access_key(self, access_key: str) -> None:
        await self.get_access_key(access_key)
        await self._run(lambda: self._kv.write({}, [f"k/{access_key}".encode()]))

    # GC ----------------------------------------------------------------------------------

    async def referenced_digests(self) -> set[str]:
        def op() -> set[str]:
            out: set[str] = set()
            for _, v in self._kv.scan(b"o/", b"o/"):
                out.update(c.digest for c in _dec(ObjectManifest, v).chunks)
            for _, v in self._kv.scan(b"p/", b"p/"):
                out.update(c.digest for c in _dec(UploadPart, v).chunks)
            return out

        return await self._run(op)  # type: ignore[return-value]
