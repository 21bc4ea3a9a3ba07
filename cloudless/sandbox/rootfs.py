"""Container root filesystems built from images in the `ImageStore`.

API for the runtime (runc.py / supervisor.py):

    from cloudless.sandbox.images import ImageStore
    from cloudless.sandbox.rootfs import RootfsBuilder, PreparedRootfs

    builder = RootfsBuilder(ImageStore(data_dir / "images"))
    prepared = await builder.aprepare(container_id, "busybox:latest")
    prepared.path     # Path: the directory to use as the bundle's root.path
    prepared.config   # ImageConfig: entrypoint, cmd, env, working_dir, user,
                      #   exposed_ports, labels, stop_signal, volumes
    prepared.mode     # "overlay" or "copy"
    prepared.image_id # the image's config digest
    ...
    await builder.arelease(container_id)   # unmount and remove; idempotent

`prepare`/`release` are the blocking forms (for threads and tests).
`prepare` is idempotent per container id: after a node restart it returns the
existing root (remounting the overlay if the host rebooted), so adopted
containers keep their writable layer. While a root exists its image's layers
are held: `ImageStore.gc()` will not delete them and `ImageStore.remove()`
refuses the image.

Modes: with root privileges and layers unpacked in overlay format the root
is an overlayfs mount (lowerdirs = the cached layers, top first, plus a
per-container upper/work dir); if the mount fails (kernel without overlay,
nested overlay, too many layers for the mount options) it falls back to a
copy: the layers are applied in order into a private directory with
whiteouts resolved. `mode="overlay"` or `mode="copy"` forces one.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import trio

from cloudless.errors import CloudlessError, InvalidInput
from cloudless.sandbox import oci
from cloudless.sandbox.images import ContainerUse, ImageStore
from cloudless.sandbox.oci import ImageConfig
from cloudless.sandbox.unpack import detect_compression, unpack_layer

log = logging.getLogger(__name__)

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MNT_DETACH = 2
# The overlay option string must fit in one page.
_MAX_MOUNT_OPTIONS = 4000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class RootfsError(CloudlessError):
    pass


@dataclass(frozen=True, slots=True)
class PreparedRootfs:
    container_id: str
    path: Path
    config: ImageConfig
    image_id: str
    mode: str  # "overlay" or "copy"


def _mount_overlay(target: Path, lowers: list[Path], upper: Path, work: Path) -> None:
    options = f"lowerdir={':'.join(str(p) for p in lowers)},upperdir={upper},workdir={work}"
    if len(options) > _MAX_MOUNT_OPTIONS:
        raise OSError(errno.E2BIG, "overlay mount options longer than a page")
    if _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount overlay on {target}: {os.strerror(err)}")


def _unmount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return  # not mounted
    if err == errno.EBUSY and _libc.umount2(str(target).encode(), _MNT_DETACH) == 0:
        log.warning("rootfs.lazy_unmount", extra={"path": str(target)})
        return
    err = ctypes.get_errno()
    raise RootfsError(f"cannot unmount {target}: {os.strerror(err)}", path=str(target))


def is_mounted(path: Path) -> bool:
    target = str(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == target:
                    return True
    except OSError:
        return False
    return False


def mounts_under(root: Path) -> list[Path]:
    """Mount points strictly below `root`, deepest first (the order to unmount them in)."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    point = fields[4].encode().decode("unicode_escape")
                    if point.startswith(prefix):
                        found.append(Path(point))
    except OSError:
        return []
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount(target: Path) -> None:
    """Unmount `target` (lazily if it is busy); RootfsError if it cannot be."""
    _unmount(target)


class RootfsBuilder:
    def __init__(self, store: ImageStore, *, mode: str = "auto") -> None:
        if mode not in ("auto", "overlay", "copy"):
            raise ValueError(f"unknown rootfs mode {mode!r}")
        self.store = store
        self.mode = mode
        self.base = store.root / "rootfs"
        self.base.mkdir(parents=True, exist_ok=True)

    def _dir(self, container_id: str) -> Path:
        if not isinstance(container_id, str) or not _CONTAINER_ID.match(container_id):
            raise InvalidInput(f"invalid container id {container_id!r}", container_id=container_id)
        return self.base / container_id

    async def aprepare(self, container_id: str, image_ref: str) -> PreparedRootfs:
        return await trio.to_thread.run_sync(self.prepare, container_id, image_ref)

    async def arelease(self, container_id: str) -> None:
        await trio.to_thread.run_sync(self.release, container_id)

    def existing(self) -> list[ContainerUse]:
        """Roots that exist now (for adopting containers after a restart)."""
        return self.store.container_uses()

    def prepare(self, container_id: str, image_ref: str) -> PreparedRootfs:
        cdir = self._dir(container_id)
        record = self.store.get(image_ref)
        for use in self.store.container_uses():
            if use.container_id == container_id:
                if use.image_id != record.id:
                    raise RootfsError(
                        f"container {container_id} already has a root from image {use.image_id}",
                        container_id=container_id,
                    )
                if Path(use.path).is_dir():
                    return self._reuse(use, record.config)
                self.release(container_id)  # its directory vanished; build it again
                break
        # Hold the layers before building, so a concurrent gc() keeps them.
        merged = cdir / "rootfs"
        mode = self._choose_mode(record.diff_ids)
        self.store.record_use(ContainerUse(container_id, record.id, record.diff_ids, mode, str(merged)))
        try:
            if cdir.exists():
                self._remove_dir(cdir)
            merged.mkdir(parents=True)
            if mode == "overlay":
                try:
                    self._overlay(cdir, record.diff_ids)
                except OSError as exc:
                    if self.mode == "overlay":
                        raise RootfsError(f"overlay mount failed: {exc}", container_id=container_id) from None
                    log.warning("rootfs.overlay_fallback", extra={"container": container_id, "reason": str(exc)})
                    mode = "copy"
                    self.store.record_use(ContainerUse(container_id, record.id, record.diff_ids, mode, str(merged)))
            if mode == "copy":
                self._copy(merged, record.layers)
        except BaseException:
            self.release(container_id)
            raise
        log.info("rootfs.prepared", extra={"container": container_id, "image": record.id, "mode": mode})
        return PreparedRootfs(container_id, merged, record.config, record.id, mode)

    def _choose_mode(self, diff_ids: list[str]) -> str:
        if self.mode == "copy":
            return "copy"
        usable = os.geteuid() == 0 and all(
            (info := self.store.layer_info(d)) is not None and info.whiteouts == "overlay" for d in diff_ids
        )
        if not usable:
            if self.mode == "overlay":
                raise RootfsError("overlay needs root and layers unpacked in overlay format")
            return "copy"
        return "overlay"

    def _overlay(self, cdir: Path, diff_ids: list[str]) -> None:
        upper, work = cdir / "upper", cdir / "work"
        upper.mkdir(exist_ok=True)
        work.mkdir(exist_ok=True)
        lowers = [self.store.layer_path(d) for d in reversed(diff_ids)]
        if not lowers:
            empty = cdir / "empty"
            empty.mkdir(exist_ok=True)
            lowers = [empty]
        _mount_overlay(cdir / "rootfs", lowers, upper, work)

    def _copy(self, merged: Path, layers: list) -> None:
        for layer in layers:
            blob = self.store.blob_path(layer.digest)
            compression = oci.LAYER_COMPRESSION[layer.media_type]
            if compression == "none":
                with open(blob, "rb") as f:
                    compression = detect_compression(f.read(4))
            unpack_layer(blob, compression, merged, mode="apply", limits=self.store.limits)

    def _reuse(self, use: ContainerUse, config: ImageConfig) -> PreparedRootfs:
        merged = Path(use.path)
        if use.mode == "overlay" and not is_mounted(merged):
            self._overlay(merged.parent, use.diff_ids)  # the host rebooted; upper/ survived
        return PreparedRootfs(use.container_id, merged, config, use.image_id, use.mode)

    def _remove_dir(self, cdir: Path) -> None:
        merged = cdir / "rootfs"
        if is_mounted(merged):
            _unmount(merged)
        shutil.rmtree(cdir, ignore_errors=False)

    def release(self, container_id: str) -> None:
        cdir = self._dir(container_id)
        if cdir.exists():
            self._remove_dir(cdir)
        self.store.release_use(container_id)
        log.info("rootfs.released", extra={"container": container_id})
