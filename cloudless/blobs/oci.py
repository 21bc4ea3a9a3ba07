"""OCI content (image layers, configs, manifests) kept in the blob store, so a
node that needs an image can fetch its blobs from peers before any registry.

Blobs live in the `cloudless-oci` bucket under their OCI digest
(`sha256:<hex>`). The digest is checked while the content streams in, and a
mismatch fails before the manifest is stored, so a name always holds what it
says. Chunk-level dedup applies as everywhere: layers that share content share
chunks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable

from cloudless.blobs.errors import BadDigest, BucketAlreadyExists, NoSuchBucket, NoSuchKey
from cloudless.blobs.manifest import ObjectManifest
from cloudless.blobs.objects import Body, ObjectService, body_pieces
from cloudless.errors import InvalidInput

OCI_BUCKET = "cloudless-oci"
_OCI_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _OCI_DIGEST.fullmatch(digest):
        raise InvalidInput(f"not an OCI sha256 digest: {str(digest)[:80]!r}", field="digest")
    return digest


class OciBlobs:
    def __init__(self, service: ObjectService, *, replicas: int | None = None) -> None:
        self.service = service
        self.replicas = replicas

    async def _ensure_bucket(self) -> None:
        try:
            await self.service.head_bucket(OCI_BUCKET)
        except NoSuchBucket:
            try:
                await self.service.create_bucket(OCI_BUCKET, replicas=self.replicas)
            except BucketAlreadyExists:
                pass

    async def put(self, digest: str, body: Body, *, size: int | None = None, media_type: str = "") -> ObjectManifest:
        """Store `body` as `digest`; BadDigest (and nothing stored) if the content hashes otherwise."""
        _check_digest(digest)
        await self._ensure_bucket()

        async def verified() -> AsyncIterator[bytes]:
            sha = hashlib.sha256()
            async for piece in body_pieces(body):
                sha.update(piece)
                yield piece
            if "sha256:" + sha.hexdigest() != digest:
                raise BadDigest(f"content hashes to sha256:{sha.hexdigest()}, not {digest}", digest=digest)

        return await self.service.put_object(
            OCI_BUCKET, digest, verified(), content_type=media_type or "application/octet-stream", expected_size=size
        )

    async def has(self, digest: str) -> bool:
        _check_digest(digest)
        try:
            await self.service.head_object(OCI_BUCKET, digest)
        except (NoSuchKey, NoSuchBucket):
            return False
        return True

    async def copy_to(self, digest: str, write: Callable[[bytes], Awaitable[None]]) -> int:
        """Stream the blob into `write` (chunks verified on the way); returns its size."""
        _check_digest(digest)
        manifest = await self.service.head_object(OCI_BUCKET, digest)
        return await self.service.copy_range(manifest, write)
