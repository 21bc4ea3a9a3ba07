"""Container roots: overlayfs over the layer cache when possible, a copy with
whiteouts applied otherwise; both give the same tree; release cleans up."""

import os
import subprocess

import pytest

from cloudless.errors import InvalidInput
from cloudless.sandbox import rootfs as rootfs_mod
from cloudless.sandbox.imagebuild import TarBuilder, build_image, busybox_layer
from cloudless.sandbox.images import ImageInUse, ImageStore
from cloudless.sandbox.rootfs import RootfsBuilder, RootfsError, is_mounted
from cloudless.sandbox.unpack import UnsafeLayer

NAME = "localhost/layered:1"


def layered_image(tmp_path):
    upper = (
        TarBuilder()
        .file("etc/hostname", b"layered\n")
        .file("bin/.wh.ls", b"")  # delete an applet link from the lower layer
        .dir("usr/sbin")
        .file("usr/sbin/.wh..wh..opq", b"")  # hide everything lower layers put here
        .file("usr/sbin/only", b"x", 0o755)
        .bytes()
    )
    return build_image(
        tmp_path / "src",
        [busybox_layer(), upper],
        name=NAME,
        container_config={"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "echo hi"], "WorkingDir": "/tmp"},
    )


def tree(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            out[rel] = (st.st_mode, os.readlink(p) if os.path.islink(p) else st.st_size)
    return out


@pytest.fixture
def store(tmp_path):
    s = ImageStore(tmp_path / "store")
    s.import_path(layered_image(tmp_path))
    return s


def check_layered_root(root):
    assert (root / "etc/hostname").read_text() == "layered\n"
    assert not os.path.lexists(root / "bin/ls")
    assert os.path.lexists(root / "bin/cat")
    assert os.listdir(root / "usr/sbin") == ["only"]


@pytest.mark.root
def test_overlay_root_merges_layers_and_writes_go_to_the_upper_dir(store):
    b = RootfsBuilder(store, mode="overlay")
    p = b.prepare("c1", NAME)
    assert p.mode == "overlay" and is_mounted(p.path)
    assert p.config.entrypoint == ["/bin/sh"] and p.config.working_dir == "/tmp"
    check_layered_root(p.path)
    (p.path / "tmp/written").write_text("mine")
    os.unlink(p.path / "bin/cat")
    lower = store.layer_path(store.get(NAME).diff_ids[0])
    assert not (lower / "tmp/written").exists() and os.path.lexists(lower / "bin/cat")
    with pytest.raises(ImageInUse):
        store.remove(NAME)
    b.release("c1")
    assert not is_mounted(p.path) and not p.path.parent.exists()
    assert store.container_uses() == []
    b.release("c1")  # idempotent


@pytest.mark.root
def test_busybox_runs_in_the_prepared_root(store):
    b = RootfsBuilder(store)
    p = b.prepare("c2", NAME)
    try:
        out = subprocess.run(
            ["chroot", str(p.path), "/bin/sh", "-c", "cat /etc/hostname; ls /usr/sbin"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert out.stdout.split() == ["layered", "only"]
    finally:
        b.release("c2")


def test_copy_root_applies_whiteouts(store):
    b = RootfsBuilder(store, mode="copy")
    p = b.prepare("c3", NAME)
    assert p.mode == "copy" and not is_mounted(p.path)
    check_layered_root(p.path)
    b.release("c3")
    assert not p.path.parent.exists()


@pytest.mark.root
def test_overlay_and_copy_give_the_same_tree(store):
    b_overlay, b_copy = RootfsBuilder(store, mode="overlay"), RootfsBuilder(store, mode="copy")
    a, c = b_overlay.prepare("o", NAME), b_copy.prepare("c", NAME)
    try:
        assert tree(a.path) == tree(c.path)
    finally:
        b_overlay.release("o")
        b_copy.release("c")


@pytest.mark.root
def test_prepare_is_idempotent_and_remounts_after_a_reboot(store):
    b = RootfsBuilder(store)
    p = b.prepare("c4", NAME)
    (p.path / "tmp/state").write_text("kept")
    assert b.prepare("c4", NAME).path == p.path
    rootfs_mod._unmount(p.path)  # what a host reboot does to the mount
    again = RootfsBuilder(ImageStore(store.root)).prepare("c4", NAME)
    assert is_mounted(again.path) and (again.path / "tmp/state").read_text() == "kept"
    b.release("c4")


def test_one_container_id_cannot_switch_images(store, tmp_path):
    store.import_path(build_image(tmp_path / "other", [TarBuilder().file("a", b"1").bytes()], name="localhost/o:1"))
    b = RootfsBuilder(store, mode="copy")
    b.prepare("c5", NAME)
    with pytest.raises(RootfsError, match="already has a root"):
        b.prepare("c5", "localhost/o:1")
    b.release("c5")


@pytest.mark.root
def test_failed_overlay_mount_falls_back_to_copy(store, monkeypatch):
    def broken(*a, **kw):
        raise OSError(22, "overlay not supported here")

    monkeypatch.setattr(rootfs_mod, "_mount_overlay", broken)
    b = RootfsBuilder(store)
    p = b.prepare("c6", NAME)
    assert p.mode == "copy"
    check_layered_root(p.path)
    assert store.container_uses()[0].mode == "copy"
    b.release("c6")
    with pytest.raises(RootfsError, match="overlay mount failed"):
        RootfsBuilder(store, mode="overlay").prepare("c7", NAME)
    assert store.container_uses() == [] and not (store.root / "rootfs/c7").exists()


def test_invalid_container_ids_are_refused(store):
    b = RootfsBuilder(store, mode="copy")
    for bad in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(InvalidInput):
            b.prepare(bad, NAME)


def test_unsafe_layer_found_while_copying_leaves_no_root(tmp_path):
    # Without a layer cache (non-root stores) layers are only hashed at import;
    # the extractor's checks then run when a root is built.
    store = ImageStore(tmp_path / "s", unpack_layers=False)
    evil = TarBuilder().symlink("etc", "/etc").file("etc/evil", b"x").bytes()
    store.import_path(build_image(tmp_path / "src", [evil], name="localhost/evil:1"))
    b = RootfsBuilder(store, mode="copy")
    with pytest.raises(UnsafeLayer):
        b.prepare("c8", "localhost/evil:1")
    assert not (store.root / "rootfs/c8").exists() and store.container_uses() == []
    assert not os.path.exists("/etc/evil")
