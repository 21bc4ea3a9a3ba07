"""The image store: import of OCI layouts and docker-save tarballs with every
digest verified, atomic index, rollback of failed imports, remove and gc."""

import gzip
import json
import logging
import os
import tarfile
from pathlib import Path

import msgspec
import pytest

from cloudless.errors import NotFound
from cloudless.observability.logging import record_fields
from cloudless.sandbox import oci
from cloudless.sandbox.imagebuild import BuiltImage, TarBuilder, build_busybox_image, build_image, busybox_image
from cloudless.sandbox.images import ContainerUse, ImageInUse, ImageNotFound, ImageStore
from cloudless.sandbox.oci import DigestMismatch, InvalidImage
from cloudless.sandbox.unpack import UnsafeLayer

BUSYBOX = "docker.io/library/busybox:latest"


def referenced_blobs(store: ImageStore) -> set[str]:
    out = set()
    for r in store.list():
        out |= {r.manifest_digest.split(":")[1], r.config_digest.split(":")[1]}
        out |= {layer.digest.split(":")[1] for layer in r.layers}
    return out


def assert_nothing_behind(store: ImageStore) -> None:
    """No partial files, no unreferenced blobs or layers after a failed import."""
    assert list(store.tmp_dir.iterdir()) == []
    assert {p.name for p in store.blob_dir.iterdir()} == referenced_blobs(store)
    live_layers = {d.split(":")[1] for r in store.list() for d in r.diff_ids}
    assert {p.name for p in store.layer_dir.iterdir()} <= live_layers


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "store")


@pytest.mark.parametrize("form", ["layout", "layout-tar", "docker-save"])
def test_busybox_imports_from_each_archive_form(tmp_path, store, form):
    path = build_busybox_image(tmp_path / "src", form)
    [rec] = store.import_path(path)
    assert rec.names == [BUSYBOX]
    assert rec.id == busybox_image().config_digest  # docker's image id: the config digest
    assert rec.config.cmd == ["sh"] and rec.config.env[0].startswith("PATH=")
    assert store.get("busybox").id == rec.id
    assert store.get(rec.short_id).id == rec.id
    for blob in referenced_blobs(store):
        assert oci.sha256_digest((store.blob_dir / blob).read_bytes()) == f"sha256:{blob}"
    if store.unpack_layers:
        fs = store.layer_path(rec.diff_ids[0])
        assert (fs / "bin/busybox").stat().st_size > 100_000
        assert os.readlink(fs / "bin/ls") == "/bin/busybox"
    assert_nothing_behind(store)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_layers_in_every_compression_verify_against_diff_ids(tmp_path, store, compression):
    layers = [TarBuilder().file("a", b"1").bytes(), TarBuilder().file("b", b"2").bytes()]
    path = build_image(tmp_path / "src", layers, compression=compression, name="localhost/c:1")
    [rec] = store.import_path(path)
    assert [layer.media_type for layer in rec.layers] == [
        {"none": oci.OCI_LAYER, "gzip": oci.OCI_LAYER_GZIP, "zstd": oci.OCI_LAYER_ZSTD}[compression]
    ] * 2
    assert rec.diff_ids == [oci.sha256_digest(layer) for layer in layers]


def test_import_name_option_tags_an_unnamed_layout(tmp_path, store):
    path = build_image(tmp_path / "src", [TarBuilder().file("a", b"1").bytes()], name="")
    [rec] = store.import_path(path, name="localhost/named:2")
    assert rec.names == ["localhost/named:2"]


def test_reimporting_moves_a_name_and_leaves_the_old_image_untagged(tmp_path, store):
    one = build_image(tmp_path / "a", [TarBuilder().file("v", b"1").bytes()], name="localhost/app:1")
    two = build_image(tmp_path / "b", [TarBuilder().file("v", b"2").bytes()], name="localhost/app:1")
    [first] = store.import_path(one)
    [second] = store.import_path(two)
    assert store.get("localhost/app:1").id == second.id
    assert {r.id: r.names for r in store.list()}[first.id] == []
    result = store.gc()
    assert result.removed_images == [first.id]
    assert [r.id for r in store.list()] == [second.id]
    assert_nothing_behind(store)


def corrupt_layout_layer(layout: Path, img: BuiltImage) -> None:
    layer_digest = oci.sha256_digest(img.compressed[0]).split(":")[1]
    blob = layout / "blobs/sha256" / layer_digest
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


def test_corrupted_layer_blob_is_a_digest_mismatch_and_leaves_nothing(tmp_path, store):
    store.import_path(build_busybox_image(tmp_path / "ok", "layout", name="localhost/other:1"))
    img = BuiltImage([TarBuilder().file("x", b"y" * 5000).bytes()], "gzip", {}, "localhost/bad:1")
    layout = img.write_layout(tmp_path / "bad")
    corrupt_layout_layer(layout, img)
    with pytest.raises(DigestMismatch) as err:
        store.import_path(layout)
    assert "digest mismatch" in err.value.message
    assert [r.names for r in store.list()] == [["localhost/other:1"]]
    assert_nothing_behind(store)


def test_layer_that_does_not_decompress_to_its_diff_id_is_refused(tmp_path, store):
    img = BuiltImage([TarBuilder().file("x", b"1").bytes()], "gzip", {}, "localhost/lie:1")
    # A config claiming another diff_id, with the manifest re-pointed at it.
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"] = [oci.sha256_digest(b"something else")]
    img.config = json.dumps(cfg).encode()
    man = json.loads(img.manifest)
    man["config"] = {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(img.config), "size": len(img.config)}
    img.manifest = json.dumps(man).encode()
    with pytest.raises(DigestMismatch, match="diff_id"):
        store.import_path(img.write_layout(tmp_path / "lie"))
    assert store.list() == []
    assert_nothing_behind(store)


def test_layer_count_must_match_config_diff_ids(tmp_path, store):
    img = BuiltImage([TarBuilder().file("x", b"1").bytes()], "gzip", {}, "localhost/n:1")
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"] = []
    img.config = json.dumps(cfg).encode()
    man = json.loads(img.manifest)
    man["config"] = {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(img.config), "size": len(img.config)}
    img.manifest = json.dumps(man).encode()
    with pytest.raises(InvalidImage, match="diff_ids"):
        store.import_path(img.write_layout(tmp_path / "n"))
    assert_nothing_behind(store)


@pytest.mark.parametrize(
    "layer",
    [
        TarBuilder().file("ok", b"1").raw(tarfile.TarInfo("../../escape")).bytes(),
        TarBuilder().device("dev/sda", "block", 8, 0).bytes(),
        TarBuilder().symlink("etc", "/etc").file("etc/shadow", b"x").bytes(),
    ],
    ids=["path-escape", "device-node", "symlink-escape"],
)
@pytest.mark.parametrize("form", ["layout", "docker-save"])
def test_malicious_layers_fail_import_and_leave_nothing(tmp_path, store, layer, form):
    path = build_image(tmp_path / "evil", [busybox_image().uncompressed[0], layer], form=form, name="localhost/evil:1")
    with pytest.raises(UnsafeLayer) if store.unpack_layers else pytest.raises(InvalidImage):
        store.import_path(path)
        if not store.unpack_layers:  # without a layer cache, unsafety shows when a root is built
            raise InvalidImage("not unpacked")
    assert store.list() == []
    assert_nothing_behind(store)
    assert not (tmp_path / "escape").exists()


def test_manifest_digest_mismatch_in_layout_index_is_refused(tmp_path, store):
    layout = build_busybox_image(tmp_path / "src", "layout")
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:" + "00" * 32
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidImage):
        store.import_path(layout)
    assert_nothing_behind(store)


def test_not_an_image_and_missing_paths_are_clear_errors(tmp_path, store):
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(InvalidImage, match="not a readable tar"):
        store.import_path(tmp_path / "junk.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidImage, match="neither an OCI image layout"):
        store.import_path(tmp_path / "empty")
    with pytest.raises(NotFound):
        store.import_path(tmp_path / "nope.tar")
    assert_nothing_behind(store)


def test_gzipped_docker_save_archive_imports(tmp_path, store):
    path = build_busybox_image(tmp_path / "src", "docker-save")
    gz = tmp_path / "image.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes(), compresslevel=1))
    [rec] = store.import_path(gz)
    assert rec.names == [BUSYBOX]


def test_remove_untags_then_deletes_and_gc_frees_blobs_and_layers(tmp_path, store):
    [rec] = store.import_path(build_busybox_image(tmp_path / "src", "layout"))
    store.import_path(build_busybox_image(tmp_path / "src2", "layout", name="localhost/again:1"))
    assert store.get("localhost/again:1").id == rec.id  # same content, second name
    store.remove("localhost/again:1")
    assert store.get("busybox").names == [BUSYBOX]
    store.remove("busybox")
    with pytest.raises(ImageNotFound):
        store.get("busybox")
    result = store.gc()
    assert result.removed_blobs == 3 and result.freed_bytes > 1_000_000
    assert list(store.blob_dir.iterdir()) == [] and list(store.layer_dir.iterdir()) == []


def test_gc_keeps_what_a_container_root_or_the_runtime_still_uses(tmp_path, store):
    [rec] = store.import_path(build_busybox_image(tmp_path / "src", "layout"))
    store.record_use(ContainerUse("c1", rec.id, rec.diff_ids, "overlay", "/x"))
    with pytest.raises(ImageInUse):
        store.remove("busybox")
    store.remove("busybox", force=True)
    store.gc()
    if store.unpack_layers:
        assert store.layer_path(rec.diff_ids[0]).is_dir()  # the container's lowerdir survives
    store.release_use("c1")
    store.gc()
    assert list(store.layer_dir.iterdir()) == []


def test_untagged_image_in_use_by_runtime_survives_gc(tmp_path, store):
    [rec] = store.import_path(build_image(tmp_path / "a", [TarBuilder().file("v", b"1").bytes()], name="localhost/x:1"))
    store.import_path(build_image(tmp_path / "b", [TarBuilder().file("v", b"2").bytes()], name="localhost/x:1"))
    assert store.gc(in_use_image_ids={rec.id}).removed_images == []
    assert store.get(rec.id).names == []


def test_stale_temporary_files_of_dead_processes_are_removed_on_open(tmp_path):
    root = tmp_path / "store"
    ImageStore(root)
    dead_pid = 2**22 + 1  # above the default pid_max, never alive
    (root / "tmp" / f"{dead_pid}-abc").write_bytes(b"partial")
    (root / "layers" / f".tmp-{dead_pid}-x").mkdir()
    live = root / "tmp" / f"{os.getpid()}-live"
    live.write_bytes(b"in flight")
    ImageStore(root)
    assert [p.name for p in (root / "tmp").iterdir()] == [live.name]
    assert list((root / "layers").iterdir()) == []


def test_index_is_versioned_and_survives_reopen(tmp_path, store):
    [rec] = store.import_path(build_busybox_image(tmp_path / "src", "layout"))
    doc = json.loads(store.index_path.read_bytes())
    assert doc["version"] == 1
    again = ImageStore(store.root)
    assert again.get("busybox") == rec
    doc["version"] = 99
    store.index_path.write_text(json.dumps(doc))
    with pytest.raises(InvalidImage, match="format 99"):
        again.list()


def test_progress_reports_copy_and_unpack(tmp_path, store):
    events = []
    store.import_path(build_busybox_image(tmp_path / "src", "layout"), progress=events.append)
    phases = {e.phase for e in events}
    assert "copy" in phases
    copy = [e for e in events if e.phase == "copy"]
    assert copy[-1].done == copy[-1].total
    if store.unpack_layers:
        assert "unpack" in phases


def test_image_record_round_trips_through_msgspec(tmp_path, store):
    [rec] = store.import_path(build_busybox_image(tmp_path / "src", "layout"))
    assert msgspec.json.decode(msgspec.json.encode(rec), type=type(rec)) == rec


def test_layout_entries_for_other_platforms_are_skipped(tmp_path, store):
    layout = build_busybox_image(tmp_path / "src", "layout")
    index = json.loads((layout / "index.json").read_text())
    foreign = dict(
        index["manifests"][0], digest="sha256:" + "ee" * 32, platform={"os": "linux", "architecture": "s390x"}
    )
    index["manifests"].insert(0, foreign)  # its blobs are absent, as in single-arch exports of multi-arch images
    (layout / "index.json").write_text(json.dumps(index))
    [rec] = store.import_path(layout)
    assert rec.names == [BUSYBOX]
    index["manifests"] = [foreign]
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidImage, match="no manifest for linux/"):
        ImageStore(tmp_path / "other").import_path(layout)


def test_an_unusable_layout_name_is_logged_with_its_name_and_the_import_goes_on(tmp_path, store, caplog):
    # `name` is a reserved LogRecord attribute: this warning used to raise KeyError mid-import.
    path = build_image(tmp_path / "src", [TarBuilder().file("a", b"1").bytes()], name="localhost/Not A Name:1")
    with caplog.at_level(logging.WARNING, logger="cloudless.sandbox.images"):
        [rec] = store.import_path(path)
    assert rec.names == []
    [record] = [r for r in caplog.records if r.getMessage() == "images.bad_layout_name"]
    assert record_fields(record)["name"] == "localhost/Not A Name:1"
