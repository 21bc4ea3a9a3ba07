"""Images through the blob store (issue 7 item 6): a node publishes its local
images and a node missing one fetches it from peers, every digest verified,
before falling back to a registry."""

from __future__ import annotations

import msgspec
import pytest
import trio

from cloudless.agent.containers import ImageRootfs, ImageUnavailable
from cloudless.agent.images_from_peers import IMAGES_BUCKET, ImageNotPublished, PeerImages
from cloudless.blobs.catalog import LocalMetadataStore
from cloudless.blobs.chunkstore import MemoryChunkStore
from cloudless.blobs.objects import ObjectService
from cloudless.blobs.oci import OCI_BUCKET, OciBlobs
from cloudless.errors import CloudlessError
from cloudless.sandbox.imagebuild import build_busybox_image
from cloudless.sandbox.images import ImageNotFound, ImageStore
from tests.harness.waiting import wait_until

BUSYBOX = "docker.io/library/busybox:latest"


@pytest.fixture
def blobs():
    return OciBlobs(ObjectService(LocalMetadataStore(None), MemoryChunkStore(), replication=1))


@pytest.fixture
def source(tmp_path, blobs):
    store = ImageStore(tmp_path / "a", unpack_layers=False)
    store.import_path(build_busybox_image(tmp_path / "src", "layout"))
    return PeerImages(store, lambda: blobs, node_id="a")


@pytest.fixture
def target(tmp_path, blobs):
    return PeerImages(ImageStore(tmp_path / "b", unpack_layers=False), lambda: blobs, node_id="b")


async def test_image_published_on_one_node_is_fetched_by_another(source, target, blobs):
    assert await source.publish_all() == 1
    original = source.store.get("busybox")
    for digest in [original.manifest_digest, original.config_digest, *(layer.digest for layer in original.layers)]:
        assert await blobs.has(digest)
    with pytest.raises(ImageNotFound):
        target.store.get("busybox")
    fetched = await target.fetch("busybox")
    assert fetched.manifest_digest == original.manifest_digest
    assert fetched.id == original.id
    assert target.store.get("busybox").names == [BUSYBOX]
    for layer in original.layers:
        assert target.store.blob_path(layer.digest).read_bytes() == source.store.blob_path(layer.digest).read_bytes()
    assert list(target.store.tmp_dir.iterdir()) == []


async def test_publishing_again_stores_nothing_new(source, blobs):
    assert await source.publish_all() == 1
    assert await source.publish_all() == 0
    page = await blobs.service.list_objects(IMAGES_BUCKET)
    assert [o.key for o in page.objects] == [BUSYBOX]


async def test_unpublished_image_is_reported_as_such(target):
    with pytest.raises(ImageNotPublished):
        await target.fetch("busybox")


async def test_blob_store_not_up_means_nothing_published(tmp_path):
    store = ImageStore(tmp_path / "a", unpack_layers=False)
    store.import_path(build_busybox_image(tmp_path / "src", "layout"))
    peers = PeerImages(store, lambda: None)
    assert not await peers.publish(store.get("busybox"))
    with pytest.raises(ImageNotPublished):
        await peers.fetch("busybox")


async def test_layer_whose_stored_content_is_not_its_digest_is_refused(source, target, blobs):
    await source.publish_all()
    layer = source.store.get("busybox").layers[0]
    # Overwrite the layer object behind OciBlobs' back: the name no longer holds its content.
    await blobs.service.put_object(OCI_BUCKET, layer.digest, b"not the layer")
    with pytest.raises(CloudlessError, match="not " + layer.digest):
        await target.fetch("busybox")
    with pytest.raises(ImageNotFound):
        target.store.get("busybox")
    assert list(target.store.tmp_dir.iterdir()) == []
    assert list(target.store.blob_dir.iterdir()) == []


async def test_rootfs_tries_peers_then_registry_and_names_both(tmp_path, blobs):
    rootfs = ImageRootfs(tmp_path / "images", oci_blobs=lambda: blobs, peer_publish_wait=0.0)
    with pytest.raises(ImageUnavailable) as info:
        await rootfs.prepare("c1", "busybox")
    assert "not on this node" in info.value.message
    assert "from peers: no node has published docker.io/library/busybox:latest" in info.value.message


async def test_rootfs_fetches_missing_image_from_peers(tmp_path, source, blobs):
    await source.publish_all()
    rootfs = ImageRootfs(tmp_path / "images", oci_blobs=lambda: blobs)
    assert await rootfs._from_peers("busybox") is None
    assert rootfs.store.get("busybox").manifest_digest == source.store.get("busybox").manifest_digest


async def test_fetch_waits_for_a_peer_that_is_about_to_publish(source, target):
    async with trio.open_nursery() as nursery:

        async def publish_later() -> None:
            await trio.sleep(1.0)
            await source.publish_all()

        nursery.start_soon(publish_later)
        with trio.fail_after(10):
            fetched = await target.fetch("busybox", wait_for_publish=8.0)
    assert fetched.manifest_digest == source.store.get("busybox").manifest_digest


async def test_publish_loop_publishes_what_another_process_imports(tmp_path, blobs):
    class Events:
        def __init__(self) -> None:
            self.kinds: list[str] = []

        def record(self, kind: str, node: str, message: str, **fields: object) -> None:
            self.kinds.append(kind)

    events = Events()
    peers = PeerImages(ImageStore(tmp_path / "a", unpack_layers=False), lambda: blobs, node_id="a", events=events)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers.publish_loop, 0.05)
        await trio.sleep(0.2)
        assert events.kinds == []
        # `cloudless image import` runs in its own process, with its own ImageStore.
        other = ImageStore(tmp_path / "a", unpack_layers=False)
        await trio.to_thread.run_sync(lambda: other.import_path(build_busybox_image(tmp_path / "src", "layout")))
        with trio.fail_after(10):
            await wait_until(lambda: events.kinds, interval=0.05)
        nursery.cancel_scope.cancel()
    assert events.kinds == ["image.published"]
    assert (await peers.lookup("busybox")).publisher == "a"


async def test_rootfs_waits_for_an_unpublished_bare_name_only_once_in_a_while(tmp_path, blobs, autojump_clock):
    rootfs = ImageRootfs(tmp_path / "images", oci_blobs=lambda: blobs, peer_publish_wait=10.0)
    start = trio.current_time()
    with pytest.raises(ImageUnavailable):
        await rootfs.prepare("c1", "busybox")
    assert trio.current_time() - start >= 10.0
    start = trio.current_time()
    with pytest.raises(ImageUnavailable):
        await rootfs.prepare("c2", "busybox")
    assert trio.current_time() - start < 1.0  # the next replica is not held up again


async def test_a_node_restarting_with_an_older_copy_does_not_override_a_newer_import(tmp_path, source, blobs):
    await source.publish_all()
    newer = source.store.get("busybox")
    old_store = ImageStore(tmp_path / "old", unpack_layers=False)
    old_store.import_path(build_busybox_image(tmp_path / "src-old", "layout", compression="none"))
    older = old_store.get("busybox")
    assert older.manifest_digest != newer.manifest_digest
    # The older copy was recorded before the published one, as on a node that was down.
    stale = msgspec.structs.replace(older, created_at=newer.created_at - 60)
    restarted = PeerImages(old_store, lambda: blobs, node_id="old")
    assert await restarted.publish(stale)
    assert (await restarted.lookup("busybox")).manifest_digest == newer.manifest_digest
    # A newer import of the name does replace it.
    fresh = msgspec.structs.replace(older, created_at=newer.created_at + 60)
    restarted._published.clear()
    await restarted.publish(fresh)
    assert (await restarted.lookup("busybox")).manifest_digest == older.manifest_digest
