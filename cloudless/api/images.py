"""Client API for the cluster's images: `cloudless image ls|pull` with a client
config (`images.list`, `images.pull`), and the client side of `image import`
(`import_to_cluster`), which publishes through the blob RPCs of `api/blobs.py`.

Images in the cluster are the ones published to the blob store
(`agent/images_from_peers.py`): any node fetches them from its peers when a
workload needs one. The permission table (`authz/table.py`) lets viewers
list and operators pull (as they may import, through blob writes, and run);
a node certificate is refused, here as well as by the table.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
import trio

from cloudless.agent.images_from_peers import IMAGES_BUCKET, BadImagePointer, ImagePointer, PeerImages, canonical_name
from cloudless.api.blobs import ClusterObjects
from cloudless.api.routing import PermissionDenied
from cloudless.blobs.errors import NoSuchBucket, NoSuchKey
from cloudless.blobs.oci import OciBlobs
from cloudless.errors import CloudlessError, InvalidInput, Unavailable
from cloudless.sandbox import oci
from cloudless.sandbox.images import ImageStore
from cloudless.sandbox.reference import parse_reference
from cloudless.sandbox.registry import RegistryClient
from cloudless.transport.rpc import RpcContext, RpcServer

if TYPE_CHECKING:
    from cloudless.api.client_config import Context
    from cloudless.observability.events import EventLog
    from cloudless.sandbox.images import ImageRecord, ProgressCallback

log = logging.getLogger(__name__)

MAX_LISTED = 10_000  # names `images.list` returns at most (it says when it stopped short)
PUBLISHER_CLIENT = "client"


class PublishedImage(msgspec.Struct, frozen=True):
    name: str  # canonical: docker.io/library/busybox:latest
    id: str  # config digest, as `docker images` shows it
    manifest_digest: str
    size: int  # config + layers, compressed as stored
    layers: int
    publisher: str  # node id, or "client" for `image import` from a client
    created: float


class ImageListReply(msgspec.Struct, frozen=True):
    images: list[PublishedImage]
    truncated: bool = False


class ImagePullRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reference: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    insecure_registries: Annotated[
        tuple[Annotated[str, msgspec.Meta(min_length=1, max_length=261)], ...], msgspec.Meta(max_length=16)
    ] = ()
    username: Annotated[str, msgspec.Meta(max_length=256)] = ""
    password: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 30.0


class ImagePullReply(msgspec.Struct, frozen=True):
    image: PublishedImage
    node: str  # the node that pulled it from the registry


class InvalidImageName(InvalidInput):
    """An image cannot be published without a name to find it by."""


def _require_client(ctx: RpcContext) -> None:
    if ctx.peer.kind != "client":
        raise PermissionDenied("cluster images are managed by clients, not nodes")


async def list_published(blobs: OciBlobs, limit: int = MAX_LISTED) -> ImageListReply:
    """Every name in the cluster's image index with what its manifest says."""
    out: list[PublishedImage] = []
    marker = ""
    while True:
        try:
            page = await blobs.service.list_objects(IMAGES_BUCKET, marker=marker, max_keys=1000)
        except NoSuchBucket:
            return ImageListReply([])
        for obj in page.objects:
            if len(out) >= limit:
                return ImageListReply(out, truncated=True)
            try:
                if obj.size > 4096:  # a pointer is ~200 bytes; anything else is not one
                    raise BadImagePointer(f"record for {obj.key} is {obj.size} bytes")
                pointer = msgspec.json.decode(await blobs.service.get_bytes(IMAGES_BUCKET, obj.key), type=ImagePointer)
                oci.check_digest(pointer.manifest_digest)
                if not 0 < pointer.manifest_size <= oci.MAX_DOCUMENT_BYTES:
                    raise BadImagePointer(f"manifest size {pointer.manifest_size} out of range")
                data = bytearray()

                async def collect(piece: bytes, data: bytearray = data) -> None:
                    data.extend(piece)
                    if len(data) > oci.MAX_DOCUMENT_BYTES:
                        raise BadImagePointer("manifest larger than an OCI document may be")

                await blobs.copy_to(pointer.manifest_digest, collect)
                manifest = oci.decode_manifest(bytes(data))
            except (NoSuchKey, msgspec.ValidationError, msgspec.DecodeError, CloudlessError) as exc:
                # One bad or half-deleted record must not hide the others.
                log.warning("images.list_skipped", extra={"fields": {"image": obj.key, "error": str(exc)}})
                continue
            out.append(
                PublishedImage(
                    name=obj.key,
                    id=manifest.config.digest,
                    manifest_digest=pointer.manifest_digest,
                    size=manifest.config.size + sum(layer.size for layer in manifest.layers),
                    layers=len(manifest.layers),
                    publisher=pointer.publisher,
                    created=pointer.created,
                )
            )
        if not page.truncated or not page.next_marker:
            return ImageListReply(out)
        marker = page.next_marker


def published_from_record(record: ImageRecord, name: str, publisher: str) -> PublishedImage:
    return PublishedImage(
        name=name,
        id=record.id,
        manifest_digest=record.manifest_digest,
        size=record.size,
        layers=len(record.layers),
        publisher=publisher,
        created=record.created_at,
    )


class ImageApi:
    """`images.list` and `images.pull`, served by every node.

    `oci_blobs` returns the node's OciBlobs once its blob store is up.
    `local` is the node's own image store and publisher when the node runs
    containers (a pulled image is then kept for its own use too); otherwise a
    pull goes through a temporary store removed afterwards, so a device that
    runs nothing does not keep images on its disk."""

    def __init__(
        self,
        node_id: str,
        oci_blobs: Callable[[], OciBlobs | None],
        scratch: Path,
        *,
        local: PeerImages | None = None,
        events: EventLog | None = None,
    ) -> None:
        self.node_id = node_id
        self.oci_blobs = oci_blobs
        self.scratch = scratch
        self.local = local
        self.events = events

    def register(self, server: RpcServer) -> None:
        server.unary("images.list")(self.list)
        server.unary("images.pull", request=ImagePullRequest)(self.pull)

    def _blobs(self) -> OciBlobs:
        blobs = self.oci_blobs()
        if blobs is None:
            raise Unavailable(f"the blob store is not up on {self.node_id} yet")
        return blobs

    async def list(self, ctx: RpcContext, body: bytes) -> ImageListReply:
        _require_client(ctx)
        return await list_published(self._blobs())

    async def pull(self, ctx: RpcContext, req: ImagePullRequest) -> ImagePullReply:
        # The node the client reached pulls, not the client: a phone or laptop
        # client would download every layer over its own (often metered) link
        # and upload it again, while a node has the bandwidth and is where the
        # blobs must end up. Registry credentials come with this call only and
        # are never stored.

        _require_client(ctx)
        ref = parse_reference(req.reference)
        blobs = self._blobs()
        creds = {ref.registry: (req.username, req.password)} if req.username else {}
        tmp: Path | None = None
        if self.local is not None:
            peers = self.local
        else:
            self.scratch.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="pull-", dir=self.scratch))
            store: ImageStore = await trio.to_thread.run_sync(lambda: ImageStore(tmp, unpack_layers=False))
            peers = PeerImages(store, lambda: blobs, node_id=self.node_id, events=self.events)
        try:
            async with RegistryClient(
                peers.store, insecure_registries=req.insecure_registries, credentials=creds, timeout=req.timeout_s
            ) as client:
                record = await client.pull(ref)
            if not await peers.publish(record):
                raise Unavailable(f"the blob store is not up on {self.node_id} yet")
        finally:
            if tmp is not None:
                await trio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))
        name = canonical_name(str(ref)) or (record.names[0] if record.names else str(ref))
        return ImagePullReply(published_from_record(record, name, self.node_id), self.node_id)


async def import_to_cluster(
    context: Context, path: Path, *, name: str | None = None, progress: ProgressCallback | None = None
) -> list[PublishedImage]:
    """Import an image archive on the client and publish it to the cluster's
    blob store (the data has to leave the client anyway). The archive is
    checked and split into OCI blobs in a temporary store first, with the
    same validation as a node-local import; nothing stays on the client."""
    blobs = OciBlobs(ClusterObjects(context))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="cloudless-import-") as tmp:
        store = await trio.to_thread.run_sync(lambda: ImageStore(Path(tmp), unpack_layers=False))
        records = await trio.to_thread.run_sync(lambda: store.import_path(path, name=name, progress=progress))
        peers = PeerImages(store, lambda: blobs, node_id=PUBLISHER_CLIENT)
        if any(not record.names for record in records):  # checked before anything is published
            raise InvalidImageName(f"{path} holds an image without a name; give one with --name", path=str(path))
        out: list[PublishedImage] = []
        for record in records:
            await peers.publish(record)
            out.extend(published_from_record(record, n, PUBLISHER_CLIENT) for n in dict.fromkeys(record.names))
    return out
