"""Client API for blob storage served by every node: S3 access keys issued
through the cluster (`cloudless s3 keys create` against a client config), and
the object calls `cloudless blob put|get|ls|rm` make (`ClusterObjects`, client side).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio

from cloudless.api.client import ClusterClient
from cloudless.api.routing import PermissionDenied
from cloudless.blobs import errors
from cloudless.blobs.manifest import AccessKey, Bucket, ListPage, MultipartUpload, ObjectManifest, UploadPart
from cloudless.blobs.objects import ObjectService, body_pieces
from cloudless.errors import CloudlessError
from cloudless.transport.rpc import RpcContext, RpcServer


class S3KeyCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    description: str = ""


class S3KeyReply(msgspec.Struct, frozen=True):
    endpoint: str  # "" when no node serves the gateway (start one with `--s3-listen`)
    access_key: str
    secret_key: str
    endpoints: list[str] = []


class S3KeyList(msgspec.Struct, frozen=True):
    access_keys: list[str]


class S3KeyRemove(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    access_key: str


class BlobApi:
    def __init__(self, service: ObjectService, s3_endpoints: Callable[[], list[str]]) -> None:
        self.service = service
        self.s3_endpoints = s3_endpoints  # every gateway gossip knows of, this node's first

    def register(self, server: RpcServer) -> None:
        server.unary("blobs.keys.create", request=S3KeyCreate)(self.keys_create)
        server.unary("blobs.keys.list")(self.keys_list)
        server.unary("blobs.keys.rm", request=S3KeyRemove)(self.keys_rm)
        _register_objects(self, server)

    @staticmethod
    def _require_client(ctx: RpcContext) -> None:
        if ctx.peer.kind != "client":
            raise PermissionDenied("S3 keys are managed by clients")

    async def keys_create(self, ctx: RpcContext, req: S3KeyCreate) -> S3KeyReply:
        self._require_client(ctx)
        key = await self.service.create_access_key(owner=ctx.peer.name or "admin", description=req.description[:200])
        endpoints = self.s3_endpoints()
        return S3KeyReply(endpoints[0] if endpoints else "", key.access_key, key.secret_key, endpoints)

    async def keys_list(self, ctx: RpcContext, body: bytes) -> list:
        self._require_client(ctx)
        keys = await self.service.metadata.list_access_keys()
        return [msgspec.structs.replace(k, secret_key="") for k in keys]  # secrets are shown once, at creation

    async def keys_rm(self, ctx: RpcContext, req: S3KeyRemove) -> S3KeyList:
        self._require_client(ctx)
        await self.service.metadata.delete_access_key(req.access_key)
        return S3KeyList([req.access_key])


# Objects through the cluster (`cloudless blob` with a client config) ------------------

PIECE = 8 << 20  # one RPC frame's worth of object data (frames stop at 16 MiB)


class BucketRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    replicas: int | None = None


class ObjectRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    bucket: str
    key: str


class ObjectList(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    bucket: str
    prefix: str = ""
    delimiter: str = ""
    marker: str = ""
    max_keys: int = 1000


class ObjectPut(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    bucket: str
    key: str
    data: bytes
    content_type: str = "binary/octet-stream"
    metadata: dict[str, str] = {}


class UploadCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    bucket: str
    key: str
    content_type: str = "binary/octet-stream"
    metadata: dict[str, str] = {}


class UploadPartPut(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    upload_id: str
    part_number: int
    data: bytes


class UploadComplete(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    upload_id: str
    parts: list[tuple[int, str]]


class UploadRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    upload_id: str


class Flag(msgspec.Struct, frozen=True):
    value: bool


def _register_objects(api: BlobApi, server: RpcServer) -> None:
    service = api.service

    def handler(name: str, request: object):
        def decorate(fn):
            async def run(ctx: RpcContext, req):
                api._require_client(ctx)
                return await fn(req)

            server.unary(name, request=request)(run)
            return fn

        return decorate

    @handler("blobs.bucket.head", BucketRef)
    async def head_bucket(req: BucketRef) -> Bucket:
        return await service.head_bucket(req.name)

    @handler("blobs.bucket.create", BucketRef)
    async def create_bucket(req: BucketRef) -> Bucket:
        return await service.create_bucket(req.name, replicas=req.replicas)

    @handler("blobs.bucket.list", None)
    async def list_buckets(req: bytes) -> list[Bucket]:
        return await service.list_buckets()

    @handler("blobs.object.head", ObjectRef)
    async def head_object(req: ObjectRef) -> ObjectManifest:
        return await service.head_object(req.bucket, req.key)

    @handler("blobs.object.list", ObjectList)
    async def list_objects(req: ObjectList) -> ListPage:
        return await service.list_objects(req.bucket, req.prefix, req.delimiter, req.marker, min(req.max_keys, 1000))

    @handler("blobs.object.rm", ObjectRef)
    async def delete_object(req: ObjectRef) -> Flag:
        return Flag(await service.delete_object(req.bucket, req.key))

    @handler("blobs.object.put", ObjectPut)
    async def put_object(req: ObjectPut) -> ObjectManifest:
        return await service.put_object(
            req.bucket,
            req.key,
            req.data,
            content_type=req.content_type,
            metadata=req.metadata,
            expected_size=len(req.data),
        )

    @handler("blobs.upload.create", UploadCreate)
    async def create_upload(req: UploadCreate) -> MultipartUpload:
        return await service.create_multipart(req.bucket, req.key, content_type=req.content_type, metadata=req.metadata)

    @handler("blobs.upload.part", UploadPartPut)
    async def upload_part(req: UploadPartPut) -> UploadPart:
        return await service.upload_part(req.upload_id, req.part_number, req.data, expected_size=len(req.data))

    @handler("blobs.upload.complete", UploadComplete)
    async def complete_upload(req: UploadComplete) -> ObjectManifest:
        return await service.complete_multipart(req.upload_id, req.parts)

    @handler("blobs.upload.abort", UploadRef)
    async def abort_upload(req: UploadRef) -> Flag:
        await service.abort_multipart(req.upload_id)
        return Flag(True)

    @server.stream("blobs.object.get", request=ObjectRef)
    async def get_object(ctx: RpcContext, req: ObjectRef) -> None:
        api._require_client(ctx)
        manifest = await service.head_object(req.bucket, req.key)
        buffer = bytearray()

        async def write(piece: bytes) -> None:
            buffer.extend(piece)
            while len(buffer) >= PIECE:
                await ctx.send(bytes(buffer[:PIECE]))
                del buffer[:PIECE]

        await service.copy_range(manifest, write)
        if buffer:
            await ctx.send(bytes(buffer))


class ClusterObjects:
    """The part of `ObjectService` the `cloudless blob` commands use, over the client API.

    Uploads larger than one piece go as a multipart upload (8 MiB parts), so the
    ETag follows S3's multipart rule for them.
    """

    def __init__(self, context) -> None:
        self.context = context  # a client config Context; one connection per call (each CLI
        # command runs its own trio.run, which a pooled connection must not outlive)

    @property
    def metadata(self) -> _ClusterKeys:
        return _ClusterKeys(self.client)

    @property
    def client(self) -> _OneCall:
        return _OneCall(self.context)

    async def head_bucket(self, name: str):
        return await self.client.call("blobs.bucket.head", BucketRef(name), response=Bucket)

    async def create_bucket(self, name: str, *, replicas: int | None = None):
        return await self.client.call("blobs.bucket.create", BucketRef(name, replicas), response=Bucket)

    async def list_buckets(self):
        return await self.client.call("blobs.bucket.list", b"", response=list[Bucket])

    async def head_object(self, bucket: str, key: str):
        return await self.client.call("blobs.object.head", ObjectRef(bucket, key), response=ObjectManifest)

    async def list_objects(
        self, bucket: str, prefix: str = "", delimiter: str = "", marker: str = "", max_keys: int = 1000
    ):
        return await self.client.call(
            "blobs.object.list", ObjectList(bucket, prefix, delimiter, marker, max_keys), response=ListPage
        )

    async def delete_object(self, bucket: str, key: str) -> bool:
        return (await self.client.call("blobs.object.rm", ObjectRef(bucket, key), response=Flag)).value

    async def put_object(
        self,
        bucket: str,
        key: str,
        body,
        *,
        content_type: str = "binary/octet-stream",
        metadata: dict[str, str] | None = None,
        expected_size: int | None = None,
    ):
        meta = dict(metadata or {})
        timeout = 120.0
        pieces = _pieces(body)
        first = await anext(pieces, b"")
        second = await anext(pieces, None) if len(first) == PIECE else None
        if second is None:
            return await self.client.call(
                "blobs.object.put",
                ObjectPut(bucket, key, first, content_type, meta),
                response=ObjectManifest,
                timeout=timeout,
            )
        upload = await self.client.call(
            "blobs.upload.create", UploadCreate(bucket, key, content_type, meta), response=MultipartUpload
        )
        parts: list[tuple[int, str]] = []
        try:

            async def send(data: bytes) -> None:
                part = await self.client.call(
                    "blobs.upload.part",
                    UploadPartPut(upload.upload_id, len(parts) + 1, data),
                    response=UploadPart,
                    timeout=timeout,
                )
                parts.append((part.part_number, part.etag))

            await send(first)
            await send(second)
            async for data in pieces:
                await send(data)
            return await self.client.call(
                "blobs.upload.complete",
                UploadComplete(upload.upload_id, parts),
                response=ObjectManifest,
                timeout=timeout,
            )
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.client.call("blobs.upload.abort", UploadRef(upload.upload_id), response=Flag)
            raise

    async def get_bytes(self, bucket: str, key: str) -> bytes:
        manifest = await self.head_object(bucket, key)
        pieces: list[bytes] = []

        async def collect(piece: bytes) -> None:
            pieces.append(piece)

        await self.copy_range(manifest, collect)
        return b"".join(pieces)

    async def copy_range(self, manifest, write) -> None:
        async with self.client.stream(
            "blobs.object.get", ObjectRef(manifest.bucket, manifest.key), timeout=3600
        ) as items:
            async for piece in items:
                await write(piece)


async def _pieces(body):
    """Re-cut a body (bytes or an async byte stream, as ObjectService takes) into
    PIECE-sized pieces (the last may be shorter)."""
    buffer = bytearray()
    async for data in body_pieces(body):
        buffer.extend(data)
        while len(buffer) >= PIECE:
            yield bytes(buffer[:PIECE])
            del buffer[:PIECE]
    if buffer:
        yield bytes(buffer)


def _blob_errors() -> dict[str, type]:
    found = {}
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, CloudlessError) and value.__module__ == errors.__name__:
            found[str(value.code)] = value
    return found


def _as_blob_error(exc: CloudlessError) -> CloudlessError:
    """A remote blob error as its own class again (the RPC layer rebuilds it by
    exit code only), so `except NoSuchKey` works the same through the cluster."""
    cls = _blob_errors().get(str(exc.code))
    if cls is None or isinstance(exc, cls):
        return exc
    error = cls(exc.message, **exc.context)
    return error


class _OneCall:
    """`ClusterClient.call`/`stream` on a client opened for this call only."""

    def __init__(self, context) -> None:
        self.context = context

    async def call(self, method: str, request, response=None, timeout: float | None = None):
        client = ClusterClient(self.context)
        try:
            return await client.call(method, request, response=response, timeout=timeout)
        except CloudlessError as exc:
            raise _as_blob_error(exc) from None
        finally:
            await client.aclose()

    @asynccontextmanager
    async def stream(self, method: str, request, timeout: float | None = None):
        client = ClusterClient(self.context)
        try:
            items: AsyncIterator[Any]
            async with client.stream(method, request, timeout=timeout) as items:
                yield items
        finally:
            await client.aclose()


class _ClusterKeys:
    """The access-key part of `MetadataStore` `cloudless s3 keys ls|rm` use (no secrets)."""

    def __init__(self, client: _OneCall) -> None:
        self.client = client

    async def list_access_keys(self):
        return await self.client.call("blobs.keys.list", b"", response=list[AccessKey])

    async def delete_access_key(self, access_key: str) -> None:
        await self.client.call("blobs.keys.rm", S3KeyRemove(access_key), response=S3KeyList)
