"""ObjectService on one node (memory twins): ranges, ETags, validation, access keys."""

from __future__ import annotations

import hashlib
import random

import pytest

from cloudless.blobs.catalog import LocalMetadataStore
from cloudless.blobs.chunkstore import MemoryChunkStore
from cloudless.blobs.errors import BadDigest, IncompleteBody, InvalidObjectKey, NoSuchBucket, NoSuchKey
from cloudless.blobs.objects import ObjectService, multipart_etag, parse_content_md5
from cloudless.errors import InvalidInput


@pytest.fixture
async def service():
    svc = ObjectService(LocalMetadataStore(None), MemoryChunkStore(), replication=1)
    await svc.create_bucket("bkt", avg_chunk=4096)
    return svc


async def test_every_range_reads_back_the_same_bytes_both_ways(service):
    rng = random.Random(5)
    data = rng.randbytes(100_000)
    m = await service.put_object("bkt", "obj", data)
    assert len(m.chunks) > 5
    for _ in range(40):
        a = rng.randrange(len(data))
        b = rng.randrange(a, len(data) + 50)
        streamed = b"".join([p async for p in service.read_range(m, a, b)])
        pushed: list[bytes] = []

        async def collect(piece: bytes, pushed: list[bytes] = pushed) -> None:
            pushed.append(piece)

        n = await service.copy_range(m, collect, a, b, readahead=rng.randint(1, 6))
        assert streamed == b"".join(pushed) == data[a : b + 1]
        assert n == len(streamed)


async def test_etag_is_md5_and_content_md5_is_checked(service):
    m = await service.put_object("bkt", "k", b"hello")
    assert m.etag == hashlib.md5(b"hello").hexdigest()
    with pytest.raises(BadDigest):
        await service.put_object("bkt", "k2", b"hello", content_md5=hashlib.md5(b"other").digest())
    with pytest.raises(NoSuchKey):
        await service.head_object("bkt", "k2")
    with pytest.raises(InvalidInput):
        parse_content_md5("bm90IGFuIG1kNQ==")  # base64 of 10 bytes


async def test_declared_size_must_match_the_body(service):
    with pytest.raises(IncompleteBody):
        await service.put_object("bkt", "short", b"12345", expected_size=6)
    with pytest.raises(IncompleteBody):
        await service.put_object("bkt", "long", b"1234567", expected_size=6)
    with pytest.raises(NoSuchKey):
        await service.head_object("bkt", "short")


async def test_put_validates_bucket_and_key(service):
    with pytest.raises(NoSuchBucket):
        await service.put_object("nope", "k", b"x")
    with pytest.raises(InvalidObjectKey):
        await service.put_object("bkt", "", b"x")


def test_multipart_etag_rule():
    parts = [b"a" * 10, b"b" * 3]
    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-2"
    assert multipart_etag([hashlib.md5(p).hexdigest() for p in parts]) == expected


async def test_access_keys_are_unique_and_stored(service):
    a = await service.create_access_key()
    b = await service.create_access_key()
    assert a.access_key != b.access_key and len(a.access_key) == 20 and len(a.secret_key) >= 40
    assert (await service.metadata.get_access_key(a.access_key)).secret_key == a.secret_key
