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

`cloudless.blobs.catalog.LocalMetadataStore` applies the catalog's commands
to one RocksDB (raw mode, synced writes) or, with no path, to memory (the
twin); the node's Raft-backed store proposes the same commands and applies
them in its state machine.
"""

from __future__ import annotations

import re
from typing import Protocol

import msgspec

from cloudless.blobs.chunking import DEFAULT_AVG_CHUNK, ChunkRef
from cloudless.blobs.errors import InvalidBucketName, InvalidObjectKey

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
