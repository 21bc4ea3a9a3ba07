"""Blob storage inside a running node: the Raft-backed `MetadataStore`, storage
members from gossip, and `BlobStorage` (built by `Node`, run in its nursery).

    RaftMetadataStore  writes: catalog commands proposed through Raft, applied by the
                       state machine's `Catalog` (a refusal comes back as `Rejected`
                       carrying the blob error's code and is re-raised as that type);
                       reads: the local Catalog after a ReadIndex, or the leader's when
                       this node is outside the Raft configuration
    storage_members    live gossip members, with the blob capacity each one advertises
    BlobStorage        chunk RPC service, ObjectService, GC on every node,
                       anti-entropy on the leader, the S3 gateway (`--s3-listen`)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import trio

from cloudless.api.blobs import BlobApi
from cloudless.blobs import errors as blob_errors
from cloudless.blobs.antientropy import AntiEntropyLoop, GarbageCollectionLoop
from cloudless.blobs.chunkstore import LocalChunkStore
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
    encode_command,
)
from cloudless.blobs.manifest import (
    AccessKey,
    Bucket,
    ListPage,
    MultipartUpload,
    ObjectManifest,
    UploadPart,
)
from cloudless.blobs.objects import ObjectService
from cloudless.blobs.placement import StorageMember
from cloudless.blobs.rpc import RpcChunkPeers, register_chunk_service
from cloudless.blobs.s3.app import S3Gateway
from cloudless.blobs.s3.server import issue_gateway_certificate, serve_gateway
from cloudless.durable import write_atomic
from cloudless.errors import CloudlessError, Conflict, InvalidInput, NotFound, Unavailable
from cloudless.gossip.events import MemberDead, MemberJoined
from cloudless.pki.ca import ClusterCA
from cloudless.ports import ClusterView, EventRecorder, Proposer
from cloudless.state.commands import BlobCatalogCommand, BlobResult, Rejected
from cloudless.transport.rpc import RpcClient, RpcContext, RpcServer

log = logging.getLogger(__name__)

# Gossip label carrying a node's S3 endpoint, so any node can tell a client where the gateways are.
S3_LABEL = "s3-endpoint"
# Free space is advertised in coarse steps: every change re-gossips the node's metadata.
FREE_SPACE_STEP = 64 << 20


_BLOB_ERRORS: dict[str, type[CloudlessError]] = {
    cls.code: cls
    for cls in (
        blob_errors.NoSuchBucket,
        blob_errors.NoSuchKey,
        blob_errors.NoSuchUpload,
        blob_errors.NoSuchAccessKey,
        blob_errors.BucketAlreadyExists,
        blob_errors.BucketNotEmpty,
        blob_errors.PreconditionFailed,
        blob_errors.InvalidBucketName,
        blob_errors.InvalidObjectKey,
        blob_errors.InvalidPart,
        blob_errors.ChunkMissing,
        InvalidBlobCommand,
    )
}
_BY_KIND: dict[str, type[CloudlessError]] = {
    "conflict": Conflict,
    "not_found": NotFound,
    "invalid": InvalidInput,
    "unavailable": Unavailable,
}


def blob_error(code: str, message: str) -> CloudlessError:
    """The blob error type a `Rejected` result or a remote failure names by its code."""
    cls = _BLOB_ERRORS.get(code) or _BY_KIND.get(code, CloudlessError)
    error = cls(message)
    error.code = code
    return error


class CatalogRead(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    method: str
    args: list[Any] = []


# Reads a node outside the Raft configuration asks the leader for, with the type each returns.
_READS: dict[str, Any] = {
    "get_bucket": Bucket,
    "list_buckets": list[Bucket],
    "get_manifest": ObjectManifest,
    "list_manifests": ListPage,
    "get_upload": MultipartUpload,
    "list_parts": list[UploadPart],
    "list_uploads": list[MultipartUpload],
    "get_access_key": AccessKey,
    "list_access_keys": list[AccessKey],
    "referenced_digests": set[str],
}


class RaftMetadataStore:
    """`MetadataStore` over the cluster's replicated state (see module docstring)."""

    def __init__(
        self,
        replicated: Proposer,
        address_of: Callable[[str], tuple[str, int] | None],
        rpc: RpcClient,
        *,
        timeout: float = 10.0,
    ) -> None:
        self._replicated = replicated
        self._address_of = address_of
        self._rpc = rpc
        self.timeout = timeout

    async def _write(self, command: BlobCommand) -> object:
        result, _ = await self._replicated.propose(BlobCatalogCommand(encode_command(command)), timeout=self.timeout)
        if isinstance(result, Rejected):
            raise blob_error(result.kind, result.message)
        if isinstance(result, BlobResult):
            return msgspec.msgpack.decode(result.value)
        return None  # applied before the proposer looked (snapshot race): the caller re-reads

    async def _read(self, method: str, *args: Any) -> Any:
        replicated = self._replicated
        if replicated.is_member:
            await replicated.linearizable(timeout=self.timeout)
            return getattr(replicated.fsm.catalog, method)(*args)
        leader = await replicated.wait_leader()
        address = self._address_of(leader)
        if address is None:
            raise Unavailable(f"leader {leader} has no known address")
        try:
            raw = await self._rpc.call(
                address, "blobs.catalog.read", CatalogRead(method, list(args)), timeout=self.timeout
            )
        except CloudlessError as exc:
            raise blob_error(exc.code, exc.message) from None
        return msgspec.msgpack.decode(raw, type=_READS[method])

    async def serve_read(self, ctx: RpcContext, req: CatalogRead) -> bytes:
        if ctx.peer.kind != "node":
            raise InvalidInput("blobs.catalog.read is node-to-node")
        if req.method not in _READS:
            raise InvalidInput(f"unknown catalog read {req.method[:40]!r}")
        replicated = self._replicated
        if not replicated.is_member:
            raise Unavailable("this node holds no copy of the catalog")
        await replicated.linearizable(timeout=self.timeout)
        value = getattr(replicated.fsm.catalog, req.method)(*req.args)
        return msgspec.msgpack.encode(sorted(value) if isinstance(value, set) else value)

    # MetadataStore -----------------------------------------------------------------

    async def create_bucket(self, bucket: Bucket) -> None:
        await self._write(CreateBucket(bucket))

    async def get_bucket(self, name: str) -> Bucket:
        return await self._read("get_bucket", name)

    async def list_buckets(self) -> list[Bucket]:
        return await self._read("list_buckets")

    async def delete_bucket(self, name: str) -> None:
        await self._write(DeleteBucket(name))

    async def put_manifest(self, manifest: ObjectManifest, expected_version: int | None = None) -> ObjectManifest:
        value = await self._write(PutManifest(manifest, expected_version))
        if value is None:
            return await self.get_manifest(manifest.bucket, manifest.key)
        return msgspec.convert(value, ObjectManifest)

    async def get_manifest(self, bucket: str, key: str) -> ObjectManifest:
        return await self._read("get_manifest", bucket, key)

    async def delete_manifest(self, bucket: str, key: str, expected_version: int | None = None) -> bool:
        return bool(await self._write(DeleteManifest(bucket, key, expected_version)))

    async def list_manifests(
        self, bucket: str, prefix: str = "", delimiter: str = "", marker: str = "", max_keys: int = 1000
    ) -> ListPage:
        return await self._read("list_manifests", bucket, prefix, delimiter, marker, max_keys)

    async def create_upload(self, upload: MultipartUpload) -> None:
        await self._write(CreateUpload(upload))

    async def get_upload(self, upload_id: str) -> MultipartUpload:
        return await self._read("get_upload", upload_id)

    async def put_part(self, part: UploadPart) -> None:
        await self._write(PutPart(part))

    async def list_parts(self, upload_id: str) -> list[UploadPart]:
        return await self._read("list_parts", upload_id)

    async def list_uploads(self, bucket: str) -> list[MultipartUpload]:
        return await self._read("list_uploads", bucket)

    async def complete_upload(self, upload_id: str, manifest: ObjectManifest) -> ObjectManifest:
        value = await self._write(CompleteUpload(upload_id, manifest))
        if value is None:
            return await self.get_manifest(manifest.bucket, manifest.key)
        return msgspec.convert(value, ObjectManifest)

    async def abort_upload(self, upload_id: str) -> None:
        await self._write(AbortUpload(upload_id))

    async def put_access_key(self, key: AccessKey) -> None:
        await self._write(PutAccessKey(key))

    async def get_access_key(self, access_key: str) -> AccessKey:
        return await self._read("get_access_key", access_key)

    async def list_access_keys(self) -> list[AccessKey]:
        return await self._read("list_access_keys")

    async def delete_access_key(self, access_key: str) -> None:
        await self._write(DeleteAccessKey(access_key))

    async def referenced_digests(self) -> set[str]:
        return set(await self._read("referenced_digests"))


def storage_members(cluster: ClusterView, store: LocalChunkStore) -> list[StorageMember]:
    """Live gossip members as placement candidates; a member advertising no blob
    capacity (older metadata) is assumed to have what this node has."""
    own_capacity, own_free = store.capacity()
    out: list[StorageMember] = []
    for member in cluster.live_members():
        meta = member.meta
        capacity = meta.capacity.disk_bytes or own_capacity
        free = meta.free.disk_bytes if meta.capacity.disk_bytes else own_free
        out.append(
            StorageMember(
                member.name,
                zone=meta.zone,
                capacity_bytes=capacity,
                free_bytes=free,
                power=meta.power,
                metered=meta.metered,
            )
        )
    return out


def advertised_disk(store: LocalChunkStore) -> tuple[int, int]:
    """Blob capacity and free space as gossip carries them (free space in coarse steps)."""
    capacity, free = store.capacity()
    return capacity, free - free % FREE_SPACE_STEP


def s3_label(endpoint: str) -> dict[str, str]:
    """The gossip label announcing this node's S3 gateway (none without one)."""
    return {S3_LABEL: endpoint} if endpoint else {}


class BlobStorage:
    """Blob storage on this node, built fully by `Node` and run in its nursery:
    the chunk RPC service and the catalog reads it serves peers, the
    ObjectService behind the blob API and the S3 gateway, GC on every node and
    anti-entropy while this node leads (re-triggered when gossip reports a member
    dead or joined)."""

    def __init__(
        self,
        store: LocalChunkStore,
        *,
        root: Path,
        cluster: ClusterView,
        replicated: Proposer,
        rpc: RpcClient,
        server: RpcServer,
        events: EventRecorder,
        signing_ca: Callable[[], ClusterCA],
        region: str = "",
        s3_listen: tuple[str, int] | None = None,
        s3_endpoint: str = "",
    ) -> None:
        self.store = store
        self.root = root
        self.cluster = cluster
        self.replicated = replicated
        self.events = events
        self.signing_ca = signing_ca
        self.region = region
        self.s3_listen = s3_listen
        self.s3_endpoint = s3_endpoint
        peers = RpcChunkPeers(rpc, _address_or_key_error(cluster))
        register_chunk_service(server, store, peers=peers)
        self.metadata = RaftMetadataStore(replicated, cluster.address_of, rpc)
        server.unary("blobs.catalog.read", request=CatalogRead)(self.metadata.serve_read)
        members = functools.partial(storage_members, cluster, store)
        self.service = ObjectService(self.metadata, store, peers, members, node_id=cluster.node_id, replication=2)
        BlobApi(self.service, self.s3_endpoints).register(server)
        self.anti_entropy = AntiEntropyLoop(self.metadata, members, peers)
        self.gc = GarbageCollectionLoop(self.service.collect_garbage)
        cluster.add_member_listener(self._on_member)

    def _on_member(self, event: object) -> None:
        if isinstance(event, (MemberDead, MemberJoined)):
            self.anti_entropy.trigger()

    def s3_endpoints(self) -> list[str]:
        """Every gateway gossip knows of, this node's first."""
        found = [self.s3_endpoint] if self.s3_endpoint else []
        for member in self.cluster.live_members():
            endpoint = member.meta.labels.get(S3_LABEL, "")
            if endpoint and endpoint not in found:
                found.append(endpoint)
        return found

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.gc.run)
            nursery.start_soon(self._anti_entropy_on_leader)
            if self.s3_listen is not None:
                # Not awaited: the certificate needs the cluster CA, which a joining node
                # holds only once it is in the Raft configuration.
                nursery.start_soon(self._serve_s3, self.s3_listen)
            log.info("blobs.ready", extra={"fields": {"node": self.cluster.node_id}})
            task_status.started()

    async def _anti_entropy_on_leader(self) -> None:
        """Run the cluster-wide repair loop while this node leads (rounds are cluster-wide)."""
        replicated = self.replicated
        while True:
            await replicated.wait_leadership(True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.anti_entropy.run)
                self.anti_entropy.trigger()  # a new leader checks at once
                await replicated.wait_leadership(False)
                nursery.cancel_scope.cancel()

    async def _gateway_tls(self, host: str) -> tuple[Path, Path]:
        """A gateway certificate from the cluster CA (replicated to Raft members) for `host`."""
        replicated = self.replicated
        while replicated.fsm.ca is None:
            await replicated.wait_changed()
        ca = self.signing_ca()  # the S3 gateway's server certificate: a coordinator-trusted node only
        hosts = sorted({host, "127.0.0.1", "localhost"} - {"0.0.0.0", "::", ""})
        cert_pem, key_pem = issue_gateway_certificate(ca, hosts, datetime.now(UTC))
        directory = self.root / "gateway"
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "gateway.key", key_pem)
        write_atomic(directory / "gateway.pem", cert_pem, mode=0o644)
        write_atomic(directory / "ca.pem", ca.certificate_pem, mode=0o644)
        return directory / "gateway.pem", directory / "gateway.key"

    async def _serve_s3(self, s3_listen: tuple[str, int]) -> None:
        node_id, endpoint = self.cluster.node_id, self.s3_endpoint
        certfile, keyfile = await self._gateway_tls(s3_listen[0])
        gateway = S3Gateway(self.service, region=self.region or "us-east-1")
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(
                        serve_gateway, gateway, host=s3_listen[0], port=s3_listen[1], certfile=certfile, keyfile=keyfile
                    )
                )
                log.info("blobs.s3_serving", extra={"fields": {"node": node_id, "endpoint": endpoint}})
        except* OSError as group:
            # A taken port must not take the rest of the node (Raft, storage) down with it.
            exc: BaseException = group
            while isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0]
            log.error("blobs.s3_failed", extra={"fields": {"node": node_id, "endpoint": endpoint, "error": str(exc)}})
            self.events.record("blobs.s3_failed", node_id, f"S3 gateway on {endpoint} failed: {exc}")


def _address_or_key_error(cluster: ClusterView) -> Callable[[str], tuple[str, int]]:
    # RpcChunkPeers reports an unknown node as PeerUnavailable when address_of raises KeyError.
    def address_of(node_id: str) -> tuple[str, int]:
        address = cluster.address_of(node_id)
        if address is None:
            raise KeyError(node_id)
        return address

    return address_of
