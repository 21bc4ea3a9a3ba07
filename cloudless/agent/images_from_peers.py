"""Images shared through the blob store: a node publishes the images in its
local ImageStore (manifest, config and layer blobs under their OCI digest via
`OciBlobs`, replicated like any object), and a node missing an image fetches
those blobs from its peers before any registry.

The name index is one small object per image name in the `cloudless-images`
bucket (key: canonical name, body: an `ImagePointer`); the blobs themselves
live in `cloudless-oci` keyed by digest. Both go through ObjectService, so a
name becomes visible atomically when its manifest commits, and only after
every blob it points at is stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from cloudless.blobs.errors import BucketAlreadyExists, NoSuchBucket, NoSuchKey
from cloudless.blobs.oci import OciBlobs
from cloudless.errors import CloudlessError, InvalidInput, NotFound
from cloudless.sandbox import oci
from cloudless.sandbox.images import _as_name

if TYPE_CHECKING:
    from cloudless.sandbox.images import ImageRecord, ImageStore

log = logging.getLogger(__name__)

IMAGES_BUCKET = "cloudless-images"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class ImageNotPublished(NotFound):
    """No node has published an image under this name."""


class BadImagePointer(InvalidInput):
    """The cluster's record for an image name does not decode."""


class ImagePointer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    manifest_digest: str
    manifest_size: int
    media_type: str
    publisher: str = ""  # node id, for logs
    created: float = 0.0  # when the publisher recorded the image; a newer import of the name wins


def canonical_name(image: str) -> str | None:
    """`busybox` → `docker.io/library/busybox:latest`; None for digest references."""
    return _as_name(image)


class PeerImages:
    """Publish local images to, and fetch missing ones from, the cluster's blob store.

    `oci_blobs` returns the node's OciBlobs, or None while the blob store is
    not up (images are then neither published nor fetched)."""

    def __init__(
        self,
        store: ImageStore,
        oci_blobs: Callable[[], OciBlobs | None],
        *,
        node_id: str = "",
        events=None,
    ) -> None:
        """`events` (the node's EventLog, optional) records publishes and fetches
        where `cloudless events` shows them; without it they are only logged."""
        self.store = store
        self.oci_blobs = oci_blobs
        self.node_id = node_id
        self.events = events
        self._published: set[tuple[str, str]] = set()  # (name, manifest digest) known to be in the cluster

    # -- publishing ----------------------------------------------------------

    async def _ensure_images_bucket(self, blobs: OciBlobs) -> None:
        try:
            await blobs.service.head_bucket(IMAGES_BUCKET)
        except NoSuchBucket:
            try:
                await blobs.service.create_bucket(IMAGES_BUCKET, replicas=blobs.replicas)
            except BucketAlreadyExists:
                pass

    async def _put_file(self, blobs: OciBlobs, digest: str, media_type: str) -> None:
        if await blobs.has(digest):
            return  # content-addressed: already there means already right
        path = self.store.blob_path(digest)

        async def pieces():
            f = await trio.to_thread.run_sync(path.open, "rb")
            try:
                while True:
                    piece = await trio.to_thread.run_sync(f.read, 1 << 20)
                    if not piece:
                        return
                    yield piece
            finally:
                f.close()

        await blobs.put(digest, pieces(), size=path.stat().st_size, media_type=media_type)

    async def publish(self, record: ImageRecord) -> bool:
        """Store the image's blobs and point each of its names at its manifest.
        Returns False when the blob store is not up."""
        blobs = self.oci_blobs()
        if blobs is None:
            return False
        todo = []
        for name in dict.fromkeys(record.names):
            if (name, record.manifest_digest) in self._published:
                continue
            current = await self._pointer(blobs, name)
            if current is not None and (
                current.manifest_digest == record.manifest_digest or current.created > record.created_at
            ):
                self._published.add(
                    (name, record.manifest_digest)
                )  # published already, or superseded by a newer import elsewhere
                continue
            todo.append(name)
        if not todo:
            return True
        manifest_bytes = await trio.to_thread.run_sync(self.store.blob_path(record.manifest_digest).read_bytes)
        media_type = json.loads(manifest_bytes).get("mediaType") or OCI_MANIFEST
        await self._put_file(blobs, record.config_digest, "application/vnd.oci.image.config.v1+json")
        for layer in record.layers:
            await self._put_file(blobs, layer.digest, layer.media_type)
        await self._put_file(blobs, record.manifest_digest, media_type)
        await self._ensure_images_bucket(blobs)
        pointer = ImagePointer(record.manifest_digest, len(manifest_bytes), media_type, self.node_id, record.created_at)
        for name in todo:
            await blobs.service.put_object(
                IMAGES_BUCKET, name, msgspec.json.encode(pointer), content_type="application/json"
            )
            self._published.add((name, record.manifest_digest))
            self._record(
                "image.published", f"published {name} to the blob store", image=name, manifest=record.manifest_digest
            )
        return True

    async def publish_all(self) -> int:
        """Publish every local image not yet published from here; returns how many names were published."""
        records = await trio.to_thread.run_sync(self.store.list)
        count = 0
        for record in records:
            before = len(self._published)
            try:
                await self.publish(record)
            except CloudlessError as exc:
                log.warning("images.publish_failed", extra={"fields": {"image": record.names, "error": exc.message}})
            count += len(self._published) - before
        return count

    async def publish_loop(self, poll: float = 0.5, retry: float = 5.0) -> None:
        """Keeps publishing what `cloudless image import/pull` (another process)
        adds to this node's store: a stat of the store's index every `poll`
        seconds, a full round when it changed or `retry` seconds after a round
        that could not publish everything."""
        seen: int | None = None
        next_round = 0.0
        while True:
            try:
                stamp = self.store.index_path.stat().st_mtime_ns
            except FileNotFoundError:
                stamp = 0
            if stamp != seen or trio.current_time() >= next_round:
                try:
                    records = await trio.to_thread.run_sync(self.store.list)
                    await self.publish_all()
                    done = self.oci_blobs() is not None and all(
                        (n, r.manifest_digest) in self._published for r in records for n in r.names
                    )
                except Exception as exc:  # a failed round must not end the node; a later one retries
                    log.warning("images.publish_round_failed", extra={"fields": {"error": repr(exc)}})
                    done = False
                seen = stamp
                next_round = float("inf") if done else trio.current_time() + retry
            await trio.sleep(poll)

    # -- fetching ------------------------------------------------------------

    async def _pointer(self, blobs: OciBlobs, name: str) -> ImagePointer | None:
        try:
            data = await blobs.service.get_bytes(IMAGES_BUCKET, name)
        except (NoSuchKey, NoSuchBucket):
            return None
        try:
            pointer = msgspec.json.decode(data, type=ImagePointer)
            oci.check_digest(pointer.manifest_digest)
        except (msgspec.ValidationError, msgspec.DecodeError, CloudlessError) as exc:
            raise BadImagePointer(f"cluster record for {name} is malformed: {exc}", image=name) from None
        return pointer

    async def lookup(self, image: str) -> ImagePointer:
        blobs = self.oci_blobs()
        name = canonical_name(image)
        if blobs is None or name is None:
            raise ImageNotPublished(f"no cluster record for {image}", image=image)
        pointer = await self._pointer(blobs, name)
        if pointer is None:
            raise ImageNotPublished(f"no node has published {name}", image=image)
        return pointer

    async def _fetch_blob(self, blobs: OciBlobs, digest: str, dest: Path) -> int:
        sha = hashlib.sha256()
        f = await trio.to_thread.run_sync(dest.open, "wb")
        try:

            async def write(piece: bytes) -> None:
                sha.update(piece)
                await trio.to_thread.run_sync(f.write, piece)

            size = await blobs.copy_to(digest, write)
        finally:
            f.close()
        if "sha256:" + sha.hexdigest() != digest:
            raise oci.DigestMismatch(
                f"blob fetched from peers hashes to sha256:{sha.hexdigest()}, not {digest}", digest=digest
            )
        return size

    async def fetch(self, image: str, *, wait_for_publish: float = 0.0) -> ImageRecord:
        """Fetch `image` from peers into the local store; every digest is verified
        here and again by the store's import. `wait_for_publish` seconds are
        given to a peer that has the image but has not published it yet (an
        import just before `cloudless run`)."""
        deadline = trio.current_time() + wait_for_publish
        while True:
            try:
                blobs = self.oci_blobs()
                if blobs is None:
                    raise ImageNotPublished(f"the blob store is not up, cannot fetch {image} from peers", image=image)
                pointer = await self.lookup(image)
                break
            except ImageNotPublished:
                if trio.current_time() >= deadline:
                    raise
                await trio.sleep(0.5)
        name = canonical_name(image)
        assert name is not None
        layout = self.store.tmp_dir / f"peers-{uuid.uuid4().hex}"
        blob_dir = layout / "blobs" / "sha256"
        await trio.to_thread.run_sync(lambda: blob_dir.mkdir(parents=True))
        try:
            mpath = blob_dir / pointer.manifest_digest.split(":", 1)[1]
            await self._fetch_blob(blobs, pointer.manifest_digest, mpath)
            manifest = oci.decode_manifest(mpath.read_bytes())
            total = 0
            for desc in [manifest.config, *manifest.layers]:
                got = await self._fetch_blob(blobs, desc.digest, blob_dir / desc.digest.split(":", 1)[1])
                if got != desc.size:
                    raise oci.DigestMismatch(
                        f"blob {desc.digest} is {got} bytes, manifest says {desc.size}", digest=desc.digest
                    )
                total += got
            index = {
                "schemaVersion": 2,
                "manifests": [
                    {"mediaType": pointer.media_type, "digest": pointer.manifest_digest, "size": pointer.manifest_size}
                ],
            }
            (layout / "index.json").write_text(json.dumps(index))
            (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
            [record] = await trio.to_thread.run_sync(lambda: self.store.import_path(layout, name=name))
        finally:
            await trio.to_thread.run_sync(lambda: shutil.rmtree(layout, ignore_errors=True))
        self._published.add((name, pointer.manifest_digest))
        self._record(
            "image.fetched_from_peers",
            f"fetched {name} ({total} bytes) from peers' blob store",
            image=name,
            manifest=pointer.manifest_digest,
            publisher=pointer.publisher,
        )
        return record

    def _record(self, kind: str, message: str, **fields: str) -> None:
        if self.events is not None:
            self.events.record(kind, self.node_id, message, **fields)  # also logs
        else:
            log.info(kind, extra={"fields": {"message": message, **fields}})
