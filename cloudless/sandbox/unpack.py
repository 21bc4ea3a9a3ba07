"""Safe extraction of OCI layer tarballs.

Two modes share one extractor:

* ``mode="layer"`` unpacks one layer into an empty directory, the per-layer
  cache that overlayfs uses as a lowerdir. OCI whiteouts become overlayfs
  whiteouts (a 0/0 character device for ``.wh.<name>``, the
  ``trusted.overlay.opaque=y`` xattr for ``.wh..wh..opq``) when we run as
  root; otherwise they are kept as empty marker files (``whiteouts="marker"``)
  and such a layer can only be used by ``mode="apply"`` consumers.
* ``mode="apply"`` applies a layer on top of an existing tree (the copy
  fallback for rootfs): whiteouts delete what lower layers put there, an
  opaque marker empties the directory of everything lower layers put there.
  Files in the same layer as a whiteout are never hidden by it
  (image-spec layer.md, "Whiteouts").

Safety (layers are untrusted input):

* entry names and hard-link targets with ``..`` components, absolute paths,
  NUL bytes or over-long paths are refused;
* the extractor never follows a symlink: every parent directory is checked
  with lstat. A symlink (or file) left by a *lower* layer where this layer
  needs a directory is replaced by a directory, as overlayfs would show it;
  a symlink created by the *same* layer that a later entry tries to write
  through is refused as symlink traversal;
* character and block devices are refused (the whole layer fails): a device
  node from an image could reach host hardware if the runtime's device
  cgroup were ever misconfigured, and images have no need for them (runc
  creates /dev). FIFOs are harmless and allowed;
* xattrs from the archive are applied only for ``user.*`` and
  ``security.capability``; ``trusted.*`` (which includes overlayfs's own
  control attributes) and others are ignored;
* the decompressed stream and the entry count are bounded (`UnpackLimits`).

Any refusal raises `UnsafeLayer` naming the entry; the caller discards the
partly written directory.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from cloudless.sandbox.oci import InvalidImage

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_ALLOWED_XATTR_PREFIXES = ("user.",)
_ALLOWED_XATTRS = frozenset({"security.capability"})
_CHUNK = 1024 * 1024


class UnsafeLayer(InvalidImage):
    """A layer archive tries something we refuse: escape, device node, bomb."""


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    max_layer_bytes: int = 32 * 1024**3  # decompressed tar stream
    max_entries: int = 2_000_000
    max_path_bytes: int = 4096


@dataclass(slots=True)
class UnpackResult:
    diff_id: str  # sha256 of the decompressed tar stream
    size: int  # bytes of the decompressed tar stream
    entries: int
    warnings: list[str] = field(default_factory=list)


def detect_compression(head: bytes) -> str:
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


class _CountingHasher:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO, limit: int, progress: Callable[[int], None] | None) -> None:
        self._raw = raw
        self._limit = limit
        self._progress = progress
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _CHUNK
        data = self._raw.read(n)
        if data:
            self.count += len(data)
            if self.count > self._limit:
                raise UnsafeLayer(f"layer decompresses to more than {self._limit} bytes", limit=self._limit)
            self.sha.update(data)
            if self._progress is not None:
                self._progress(len(data))
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _decompressed(raw: BinaryIO, compression: str) -> BinaryIO:
    if compression == "auto":
        head = raw.read(4)
        raw.seek(0)
        compression = detect_compression(head)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[return-value]
    if compression == "none":
        return raw
    raise InvalidImage(f"unknown layer compression {compression!r}")


_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)


def hash_layer(
    blob: Path, compression: str, limits: UnpackLimits = UnpackLimits(), progress: Callable[[int], None] | None = None
) -> UnpackResult:
    """diff_id and size of a layer blob without extracting it."""
    with open(blob, "rb") as raw:
        try:
            reader = _CountingHasher(_decompressed(raw, compression), limits.max_layer_bytes, progress)
            reader.drain()
        except _STREAM_ERRORS as exc:
            raise InvalidImage(f"layer {blob.name} is not a valid {compression} stream: {exc}") from None
    return UnpackResult(diff_id="sha256:" + reader.sha.hexdigest(), size=reader.count, entries=0)


def unpack_layer(
    blob: Path,
    compression: str,
    dest: Path,
    *,
    mode: str = "layer",
    whiteouts: str | None = None,
    limits: UnpackLimits = UnpackLimits(),
    progress: Callable[[int], None] | None = None,
) -> UnpackResult:
    """Extract the layer in `blob` into `dest` (which must exist) and return its diff_id.

    `whiteouts` ("overlay" or "marker") applies to mode="layer"; it defaults to
    "overlay" when running as root.
    """
    if mode not in ("layer", "apply"):
        raise ValueError(f"unknown unpack mode {mode!r}")
    if whiteouts is None:
        whiteouts = "overlay" if os.geteuid() == 0 else "marker"
    with open(blob, "rb") as raw:
        reader = _CountingHasher(_decompressed(raw, compression), limits.max_layer_bytes, progress)
        extractor = _Extractor(Path(dest), mode, whiteouts, limits)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    extractor.add(tar, member)
            reader.drain()
        except _STREAM_ERRORS as exc:
            raise InvalidImage(f"layer {blob.name} is not a valid tar stream: {exc}") from None
        extractor.finish()
    return UnpackResult(
        diff_id="sha256:" + reader.sha.hexdigest(),
        size=reader.count,
        entries=extractor.entries,
        warnings=extractor.warnings,
    )


def _clean_name(name: str, limits: UnpackLimits, what: str = "entry") -> tuple[str, ...]:
    if "\x00" in name:
        raise UnsafeLayer(f"{what} name contains a NUL byte", entry=name)
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_path_bytes:
        raise UnsafeLayer(f"{what} path longer than {limits.max_path_bytes} bytes", entry=name[:200])
    if name.startswith("/"):
        raise UnsafeLayer(f"{what} {name!r} is an absolute path", entry=name)
    parts = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            raise UnsafeLayer(f"{what} {name!r} escapes the layer root with '..'", entry=name)
        if len(comp.encode("utf-8", "surrogateescape")) > 255:
            raise UnsafeLayer(f"{what} has a path component longer than 255 bytes", entry=name[:200])
        parts.append(comp)
    return tuple(parts)


class _Extractor:
    def __init__(self, root: Path, mode: str, whiteouts: str, limits: UnpackLimits) -> None:
        self.root = root
        self.mode = mode
        self.whiteouts = whiteouts
        self.limits = limits
        self.is_root = os.geteuid() == 0
        self.entries = 0
        self.warnings: list[str] = []
        # Every path this layer wrote or passed through; lower-layer content is
        # everything else (apply mode), and in layer mode dest started empty.
        self.touched: set[tuple[str, ...]] = set()
        self.dir_meta: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []

    def _path(self, parts: tuple[str, ...]) -> str:
        return os.path.join(self.root, *parts) if parts else str(self.root)

    def _from_this_layer(self, parts: tuple[str, ...]) -> bool:
        return self.mode == "layer" or parts in self.touched

    # -- parents ----------------------------------------------------------

    def _ensure_parents(self, parts: tuple[str, ...], entry: str) -> None:
        for i in range(1, len(parts)):
            prefix = parts[:i]
            path = self._path(prefix)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                self.touched.add(prefix)
                continue
            if stat.S_ISDIR(st.st_mode):
                self.touched.add(prefix)
                continue
            if stat.S_ISLNK(st.st_mode) and self._from_this_layer(prefix):
                raise UnsafeLayer(
                    f"entry {entry!r} would be written through symlink {'/'.join(prefix)!r}",
                    entry=entry,
                )
            if self._from_this_layer(prefix) and not self._is_overlay_whiteout(st):
                raise UnsafeLayer(f"entry {entry!r} has a non-directory parent {'/'.join(prefix)!r}", entry=entry)
            # A lower layer's symlink/file (or a whiteout) where this layer has a
            # directory: the directory wins, as in an overlay merge.
            os.unlink(path)
            os.mkdir(path, 0o755)
            self.touched.add(prefix)

    @staticmethod
    def _is_overlay_whiteout(st: os.stat_result) -> bool:
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

    def _remove_existing(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    # -- entries ----------------------------------------------------------

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise UnsafeLayer(f"layer has more than {self.limits.max_entries} entries")
        parts = _clean_name(m.name, self.limits)
        if not parts:
            return  # the "./" entry describes the root, which we own
        base = parts[-1]
        if any(part.startswith(WHITEOUT_PREFIX) for part in parts[:-1]):
            # A whiteout is a marker, never a directory to put things in.
            raise UnsafeLayer(f"layer entry {m.name!r} lies under a whiteout name", entry=m.name)
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, m)
            return
        if m.ischr() or m.isblk():
            raise UnsafeLayer(
                f"layer contains device node {m.name!r} ({'char' if m.ischr() else 'block'} "
                f"{m.devmajor}:{m.devminor}); device nodes are refused",
                entry=m.name,
            )
        self._ensure_parents(parts, m.name)
        path = self._path(parts)
        if m.isdir():
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(path)
                    os.mkdir(path, 0o755)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
            self.touched.add(parts)
            self.dir_meta.append((parts, m))
            self._xattrs(path, m)
            return
        if m.islnk():
            # A hard link shares its target's inode, metadata included.
            self._hardlink(parts, path, m)
            self.touched.add(parts)
            return
        self._remove_existing(path)
        if m.isreg():
            self._regular(tar, path, m)
        elif m.issym():
            if "\x00" in m.linkname or len(m.linkname) > self.limits.max_path_bytes:
                raise UnsafeLayer(f"symlink {m.name!r} has an invalid target", entry=m.name)
            os.symlink(m.linkname, path)
        elif m.isfifo():
            os.mkfifo(path, 0o600)
        else:
            raise UnsafeLayer(f"layer entry {m.name!r} has unsupported type {m.type!r}", entry=m.name)
        self.touched.add(parts)
        self._owner_mode_time(path, m)
        self._xattrs(path, m)

    def _regular(self, tar: tarfile.TarFile, path: str, m: tarfile.TarInfo) -> None:
        src = tar.extractfile(m)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if src is not None:
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def _hardlink(self, parts: tuple[str, ...], path: str, m: tarfile.TarInfo) -> None:
        target = _clean_name(m.linkname, self.limits, "hard link target")
        if not target:
            raise UnsafeLayer(f"hard link {m.name!r} points at the layer root", entry=m.name)
        # The target's parents must be plain directories: never resolve a link
        # target through a symlink.
        for i in range(1, len(target)):
            try:
                st = os.lstat(self._path(target[:i]))
            except FileNotFoundError:
                raise UnsafeLayer(f"hard link {m.name!r} target {m.linkname!r} does not exist", entry=m.name) from None
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeLayer(
                    f"hard link {m.name!r} target {m.linkname!r} goes through a non-directory", entry=m.name
                )
        target_path = self._path(target)
        try:
            st = os.lstat(target_path)
        except FileNotFoundError:
            raise UnsafeLayer(f"hard link {m.name!r} target {m.linkname!r} does not exist", entry=m.name) from None
        if stat.S_ISDIR(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            raise UnsafeLayer(f"hard link {m.name!r} targets a directory or device", entry=m.name)
        if target == parts:
            return
        self._remove_existing(path)
        os.link(target_path, path, follow_symlinks=False)

    def _whiteout(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        parent = parts[:-1]
        base = parts[-1]
        self._ensure_parents(parts, m.name)
        parent_path = self._path(parent)
        if base == OPAQUE_MARKER:
            if self.mode == "apply":
                self._clear_lower(parent)
            elif self.whiteouts == "overlay":
                os.setxattr(parent_path, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
            else:
                self._marker(self._path(parts))
            self.touched.add(parent)
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", "..") or name.startswith(WHITEOUT_PREFIX):
            raise UnsafeLayer(f"invalid whiteout entry {m.name!r}", entry=m.name)
        hidden = (*parent, name)
        hidden_path = self._path(hidden)
        if self.mode == "apply":
            if hidden not in self.touched:
                self._remove_existing(hidden_path)
            return
        if os.path.lexists(hidden_path):
            return  # same-layer content is not hidden by its own whiteout
        if self.whiteouts == "overlay":
            os.mknod(hidden_path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        else:
            self._marker(self._path(parts))

    def _marker(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def _clear_lower(self, parts: tuple[str, ...]) -> None:
        path = self._path(parts)
        for name in os.listdir(path):
            child = (*parts, name)
            child_path = self._path(child)
            if child in self.touched:
                if os.path.isdir(child_path) and not os.path.islink(child_path):
                    self._clear_lower(child)
            else:
                self._remove_existing(child_path)

    # -- metadata ---------------------------------------------------------

    def _owner_mode_time(self, path: str, m: tarfile.TarInfo) -> None:
        if self.is_root:
            os.chown(path, m.uid, m.gid, follow_symlinks=False)
        if not m.issym():
            # chown clears setuid bits, so mode comes after it.
            os.chmod(path, m.mode & 0o7777)
        try:
            os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
        except (OverflowError, ValueError):
            pass

    def _xattrs(self, path: str, m: tarfile.TarInfo) -> None:
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr.") :]
            if not (name in _ALLOWED_XATTRS or name.startswith(_ALLOWED_XATTR_PREFIXES)):
                log.debug("unpack.xattr_ignored", extra={"entry": m.name, "xattr": name})
                continue
            if name == "security.capability" and not self.is_root:
                continue
            raw = value.encode("utf-8", "surrogateescape")
            try:
                os.setxattr(path, name, raw, follow_symlinks=False)
            except OSError as exc:
                self.warnings.append(f"{m.name}: xattr {name} not applied: {exc.strerror}")

    def finish(self) -> None:
        # Directory modes last (a read-only directory must still receive its
        # children), deepest first.
        for parts, m in sorted(self.dir_meta, key=lambda pm: len(pm[0]), reverse=True):
            if not self._still_a_directory(parts):
                continue  # it or a parent was replaced or whited out later in the layer
            self._owner_mode_time(self._path(parts), m)

    def _still_a_directory(self, parts: tuple[str, ...]) -> bool:
        # Every component, not just the last: a later entry may have turned a
        # parent into a file or into a symlink that leads out of the root.
        for i in range(1, len(parts) + 1):
            try:
                if not stat.S_ISDIR(os.lstat(self._path(parts[:i])).st_mode):
                    return False
            except (FileNotFoundError, NotADirectoryError):
                return False
        return True
