"""OCI blobs in the blob store: stored under their digest, verified on the way in."""

from __future__ import annotations

import hashlib
import os

import pytest

from cloudless.blobs.catalog import LocalMetadataStore
from cloudless.blobs.chunkstore import MemoryChunkStore
from cloudless.blobs.errors import BadDigest
from cloudless.blobs.objects import ObjectService
from cloudless.blobs.oci import OCI_BUCKET, OciBlobs
from cloudless.errors import InvalidInput


@pytest.fixture
def oci():
    return OciBlobs(ObjectService(LocalMetadataStore(None), MemoryChunkStore(), replication=1))


async def test_layer_roundtrip_under_its_digest(oci):
    layer = os.urandom(3_000_000)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    assert not await oci.has(digest)
    await oci.put(digest, layer, size=len(layer), media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    assert await oci.has(digest)
    out: list[bytes] = []

    async def collect(piece: bytes) -> None:
        out.append(piece)

    assert await oci.copy_to(digest, collect) == len(layer)
    assert b"".join(out) == layer


async def test_content_that_does_not_match_its_digest_is_not_stored(oci):
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(BadDigest):
        await oci.put(wrong, b"the real content")
    assert not await oci.has(wrong)
    page = await oci.service.list_objects(OCI_BUCKET)
    assert page.objects == []


async def test_digest_syntax_is_checked(oci):
    with pytest.raises(InvalidInput):
        await oci.has("md5:abc")
