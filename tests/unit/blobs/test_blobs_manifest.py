"""Metadata store: buckets, compare-and-set manifests, S3 listing semantics, multipart records.

Runs against both the in-memory store and the RocksDB one.
"""

from __future__ import annotations

import pytest

from cloudless.blobs.catalog import LocalMetadataStore
from cloudless.blobs.chunking import ChunkRef
from cloudless.blobs.errors import (
    BucketAlreadyExists,
    BucketNotEmpty,
    InvalidBucketName,
    InvalidObjectKey,
    NoSuchBucket,
    NoSuchKey,
    NoSuchUpload,
    PreconditionFailed,
)
from cloudless.blobs.manifest import (
    AccessKey,
    Bucket,
    MultipartUpload,
    ObjectManifest,
    UploadPart,
    validate_bucket_name,
)

D1, D2 = "1" * 64, "2" * 64


@pytest.fixture(params=["memory", "rocksdb"])
async def meta(request, tmp_path):
    store = LocalMetadataStore(None if request.param == "memory" else tmp_path / "meta")
    await store.create_bucket(Bucket("bkt", 0.0))
    yield store
    store.close()


def manifest(key: str, digests=(D1,), bucket="bkt") -> ObjectManifest:
    return ObjectManifest(bucket, key, 1, "etag", "text/plain", {}, [ChunkRef(d, 1, 0) for d in digests], 0, 1.0)


async def test_bucket_rules(meta):
    with pytest.raises(BucketAlreadyExists):
        await meta.create_bucket(Bucket("bkt", 0.0))
    for bad in ("ab", "UPPER", "-lead", "trail-", "a..b", "192.168.1.1", "x" * 64, "under_score"):
        with pytest.raises(InvalidBucketName):
            validate_bucket_name(bad)
    with pytest.raises(NoSuchBucket):
        await meta.get_bucket("nope")
    await meta.put_manifest(manifest("k"))
    with pytest.raises(BucketNotEmpty):
        await meta.delete_bucket("bkt")
    await meta.delete_manifest("bkt", "k")
    await meta.delete_bucket("bkt")
    assert await meta.list_buckets() == []


async def test_put_manifest_is_compare_and_set_on_version(meta):
    first = await meta.put_manifest(manifest("k"), expected_version=0)
    assert first.version == 1
    with pytest.raises(PreconditionFailed):
        await meta.put_manifest(manifest("k"), expected_version=0)
    second = await meta.put_manifest(manifest("k"), expected_version=1)
    assert second.version == 2
    third = await meta.put_manifest(manifest("k"))  # unconditional
    assert third.version == 3
    with pytest.raises(PreconditionFailed):
        await meta.delete_manifest("bkt", "k", expected_version=2)
    assert await meta.delete_manifest("bkt", "k", expected_version=3) is True
    with pytest.raises(NoSuchKey):
        await meta.get_manifest("bkt", "k")


async def test_manifest_needs_existing_bucket_and_valid_key(meta):
    with pytest.raises(NoSuchBucket):
        await meta.put_manifest(manifest("k", bucket="nope"))
    with pytest.raises(InvalidObjectKey):
        await meta.put_manifest(manifest("x" * 1025))
    with pytest.raises(InvalidObjectKey):
        await meta.put_manifest(manifest(""))


async def test_listing_prefix_delimiter_marker(meta):
    keys = ["a", "b/1", "b/2", "b/c/3", "bz", "c/4"]
    for k in keys:
        await meta.put_manifest(manifest(k))
    page = await meta.list_manifests("bkt", delimiter="/")
    assert [m.key for m in page.objects] == ["a", "bz"] and page.prefixes == ["b/", "c/"]
    page = await meta.list_manifests("bkt", prefix="b/", delimiter="/")
    assert [m.key for m in page.objects] == ["b/1", "b/2"] and page.prefixes == ["b/c/"]
    page = await meta.list_manifests("bkt", max_keys=2)
    assert [m.key for m in page.objects] == ["a", "b/1"] and page.truncated and page.next_marker == "b/1"
    page = await meta.list_manifests("bkt", marker="b/1", max_keys=2)
    assert [m.key for m in page.objects] == ["b/2", "b/c/3"]
    # A marker that is a common prefix skips everything under it.
    page = await meta.list_manifests("bkt", delimiter="/", marker="b/")
    assert [m.key for m in page.objects] == ["bz"] and page.prefixes == ["c/"]
    page = await meta.list_manifests("bkt", delimiter="/", max_keys=2)
    assert page.truncated and page.next_marker == "b/"
    page = await meta.list_manifests("bkt", max_keys=len(keys))
    assert not page.truncated and page.next_marker is None


async def test_complete_upload_is_one_atomic_step(meta):
    await meta.create_upload(MultipartUpload("u1", "bkt", "obj", 1.0))
    await meta.put_part(UploadPart("u1", 1, 1, "e", [ChunkRef(D2, 1, 0)], 1.0))
    assert [p.part_number for p in await meta.list_parts("u1")] == [1]
    assert await meta.referenced_digests() == {D2}
    stored = await meta.complete_upload("u1", manifest("obj", digests=(D2,)))
    assert stored.version == 1
    with pytest.raises(NoSuchUpload):
        await meta.get_upload("u1")
    assert (await meta.get_manifest("bkt", "obj")).chunks[0].digest == D2
    assert await meta.list_uploads("bkt") == []


async def test_abort_drops_parts_and_their_references(meta):
    await meta.create_upload(MultipartUpload("u2", "bkt", "obj", 1.0))
    await meta.put_part(UploadPart("u2", 1, 1, "e", [ChunkRef(D2, 1, 0)], 1.0))
    await meta.abort_upload("u2")
    assert await meta.referenced_digests() == set()
    with pytest.raises(NoSuchUpload):
        await meta.put_part(UploadPart("u2", 2, 1, "e", [], 1.0))


async def test_access_keys(meta):
    await meta.put_access_key(AccessKey("AK1", "secret", 1.0))
    assert (await meta.get_access_key("AK1")).secret_key == "secret"
    assert [k.access_key for k in await meta.list_access_keys()] == ["AK1"]
    await meta.delete_access_key("AK1")
    assert await meta.list_access_keys() == []


async def test_rocksdb_store_survives_reopen(tmp_path):
    store = LocalMetadataStore(tmp_path / "m")
    await store.create_bucket(Bucket("bkt", 0.0))
    await store.put_manifest(manifest("k"))
    store.close()
    again = LocalMetadataStore(tmp_path / "m")
    assert (await again.get_manifest("bkt", "k")).version == 1
    again.close()


def _reference_listing(keys, prefix, delimiter):
    objects, prefixes = [], set()
    for k in sorted(keys):
        if not k.startswith(prefix):
            continue
        i = k.find(delimiter, len(prefix)) if delimiter else -1
        if i >= 0:
            prefixes.add(k[: i + len(delimiter)])
        else:
            objects.append(k)
    return objects, sorted(prefixes)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_KEY = st.text(alphabet="ab/.", min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keys=st.sets(_KEY, max_size=25),
    prefix=st.sampled_from(["", "a", "a/", "b", "/"]),
    delimiter=st.sampled_from(["", "/", "."]),
    page=st.integers(min_value=1, max_value=7),
)
def test_paginated_listing_matches_the_reference_model(keys, prefix, delimiter, page):
    """Pages of max_keys, each resumed from the previous page's marker, list exactly what one
    unbounded listing would: every key and common prefix once, in order (S3 ListObjects semantics)."""

    async def scenario() -> None:
        meta = LocalMetadataStore(None)
        await meta.create_bucket(Bucket("bkt", 0.0))
        for k in keys:
            await meta.put_manifest(manifest(k))
        objects, prefixes, marker = [], [], ""
        for _ in range(100):
            p = await meta.list_manifests("bkt", prefix, delimiter, marker, page)
            assert len(p.objects) + len(p.prefixes) <= page
            objects += [m.key for m in p.objects]
            prefixes += p.prefixes
            if not p.truncated:
                break
            marker = p.next_marker
        assert (objects, prefixes) == _reference_listing(keys, prefix, delimiter)

    import trio

    trio.run(scenario)
