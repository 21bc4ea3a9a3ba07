"""The node's local image store: verified content-addressed blobs, unpacked
layer cache, image records, import and garbage collection.

On disk, under `root`:

    blobs/sha256/<hex>        manifests, configs and layer blobs, named by digest
    layers/<diff-id hex>/fs   one unpacked layer (an overlayfs lowerdir)
    layers/<diff-id hex>/layer.json
    containers/<id>.json      which container uses which image (rootfs.py writes)
    rootfs/<id>/              container roots (rootfs.py: overlay upper/work, or a copy)
    index.json                image records (msgspec JSON, format version 1)
    tmp/                      in-flight writes, named <pid>-<random>

Crash safety: a blob is written to tmp/, hashed as it goes, checked against
its digest and size, fsynced and renamed into place (then the directory is
fsynced); a layer is unpacked under layers/.tmp-*, synced (syncfs) and
renamed; the index is replaced atomically the same way. Leftovers of dead
processes in tmp/ and layers/.tmp-* are removed on open and by gc(). A
failed import or pull removes every blob and layer it created, so it leaves
nothing behind.

Concurrency: the index is read-modify-written under an exclusive flock
(`index.lock`); imports and pulls hold a shared flock on `ingest.lock` while
they create blobs that no record references yet, and gc() takes it
exclusively, so gc never deletes a blob an import is about to reference.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import secrets
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec

from cloudless.durable import fsync_directory, write_atomic
from cloudless.errors import Conflict, NotFound
from cloudless.sandbox import oci
from cloudless.sandbox.oci import DigestMismatch, ImageConfig, InvalidImage, check_digest
from cloudless.sandbox.reference import InvalidReference, Reference, parse_reference
from cloudless.sandbox.unpack import UnpackLimits, detect_compression, hash_layer, unpack_layer

log = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
_CHUNK = 1024 * 1024
_MAX_NESTED_INDEX = 4


class ImageNotFound(NotFound):
    pass


class ImageInUse(Conflict):
    pass


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One step of a long transfer. `total` is None when unknown."""

    phase: str  # "download", "copy", "unpack"
    item: str  # a digest (or a short description)
    done: int
    total: int | None


ProgressCallback = Callable[[ProgressEvent], None]


class LayerRecord(msgspec.Struct, frozen=True):
    digest: str  # the blob (possibly compressed)
    media_type: str
    size: int
    diff_id: str  # sha256 of the uncompressed tar


class ImageRecord(msgspec.Struct, frozen=True):
    id: str  # the config digest, as Docker names images
    names: list[str]  # canonical tagged references
    manifest_digest: str
    config_digest: str
    layers: list[LayerRecord]
    size: int  # bytes of config + layer blobs
    config: ImageConfig
    created_at: float  # when this node recorded it (unix seconds)
    repository_digests: list[str] = []  # "registry/repo@sha256:..." for pulled images

    @property
    def short_id(self) -> str:
        return self.id.split(":", 1)[1][:12]

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]


class _Index(msgspec.Struct):
    version: int = INDEX_FORMAT_VERSION
    images: dict[str, ImageRecord] = {}
    # blob digest -> diff_id, for layers whose decompression we have verified
    diff_ids: dict[str, str] = {}


class ContainerUse(msgspec.Struct, frozen=True):
    """A container's hold on an image's layers (written by rootfs.py)."""

    container_id: str
    image_id: str
    diff_ids: list[str]
    mode: str  # "overlay" or "copy"
    path: str  # the container's root filesystem


class LayerInfo(msgspec.Struct, frozen=True):
    diff_id: str
    size: int
    entries: int
    whiteouts: str  # "overlay" or "marker"


@dataclass(frozen=True, slots=True)
class GcResult:
    removed_images: list[str]
    removed_blobs: int
    removed_layers: int
    freed_bytes: int


# fsync helpers -------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(path: Path) -> None:
    """Flush a whole unpacked tree (one syscall, not one fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Blob writes ---------------------------------------------------------------


class BlobWriter:
    """Streams one blob into the store; nothing is visible until commit()."""

    def __init__(self, store: ImageStore, expected_digest: str | None, expected_size: int | None) -> None:
        if expected_digest is not None:
            check_digest(expected_digest)
        self.store = store
        self.expected_digest = expected_digest
        self.expected_size = expected_size
        self.tmp = store._tmp_path()
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._sha = hashlib.sha256()
        self.written = 0
        self.digest: str | None = None

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.expected_size is not None and self.written > self.expected_size:
            self.abort()
            raise DigestMismatch(
                f"blob {self.expected_digest} is longer than its descriptor's {self.expected_size} bytes",
                digest=self.expected_digest,
            )
        self._sha.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def commit(self) -> tuple[str, bool]:
        """Verify, fsync and publish; returns (digest, created). Aborts on mismatch."""
        actual = "sha256:" + self._sha.hexdigest()
        if self.expected_size is not None and self.written != self.expected_size:
            self.abort()
            raise DigestMismatch(
                f"blob {self.expected_digest} is {self.written} bytes, descriptor says {self.expected_size}",
                digest=self.expected_digest,
            )
        if self.expected_digest is not None and actual != self.expected_digest:
            self.abort()
            raise DigestMismatch(
                f"blob digest mismatch: expected {self.expected_digest}, got {actual}",
                expected=self.expected_digest,
                actual=actual,
            )
        self.digest = actual
        dest = self.store.blob_path(actual)
        if dest.exists():
            self.abort()
            return actual, False
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.rename(self.tmp, dest)
        fsync_directory(dest.parent)
        return actual, True

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


# Import sources ------------------------------------------------------------


class _Source:
    """Read-only access to named files in an image layout dir or archive."""

    def exists(self, name: str) -> bool: ...

    def open(self, name: str) -> BinaryIO: ...

    def read(self, name: str, limit: int = oci.MAX_DOCUMENT_BYTES) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidImage(f"{name} is larger than {limit} bytes")
        return data

    def close(self) -> None:
        pass


def _normalise(name: str) -> str:
    parts = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise InvalidImage(f"archive path {name!r} escapes the archive")
            parts.pop()
            continue
        parts.append(comp)
    return "/".join(parts)


class _DirSource(_Source):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, name: str) -> Path:
        path = (self.root / _normalise(name)).resolve()
        if path != self.root and self.root not in path.parents:
            raise InvalidImage(f"layout path {name!r} escapes the layout directory")
        return path

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            raise InvalidImage(f"image layout is missing {name}") from None


class _TarSource(_Source):
    def __init__(self, path: Path) -> None:
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = {_normalise(m.name): m for m in self.tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidImage(f"{path} is not a readable tar archive: {exc}") from None

    def _member(self, name: str) -> tarfile.TarInfo:
        key = _normalise(name)
        for _ in range(8):  # docker save links duplicate layers to one copy
            m = self.members.get(key)
            if m is None:
                raise InvalidImage(f"archive is missing {name}")
            if m.issym():
                key = _normalise(os.path.join(os.path.dirname(key), m.linkname))
            elif m.islnk():
                key = _normalise(m.linkname)
            elif m.isreg():
                return m
            else:
                raise InvalidImage(f"archive entry {name} is not a regular file")
        raise InvalidImage(f"archive entry {name} has too many link hops")

    def exists(self, name: str) -> bool:
        try:
            self._member(name)
            return True
        except InvalidImage:
            return False

    def open(self, name: str) -> BinaryIO:
        f = self.tar.extractfile(self._member(name))
        assert f is not None
        return f  # type: ignore[return-value]

    def close(self) -> None:
        self.tar.close()


# The store -----------------------------------------------------------------


class _Ingest:
    """What one import/pull created, so a failure can take it all back."""

    def __init__(self) -> None:
        self.blobs: list[str] = []
        self.layers: list[Path] = []


class ImageStore:
    def __init__(
        self,
        root: Path,
        *,
        limits: UnpackLimits = UnpackLimits(),
        unpack_layers: bool | None = None,
        machine: str | None = None,
    ) -> None:
        """`unpack_layers` (default: when root) keeps an unpacked copy of each
        layer for overlayfs; without it layers are only hashed on import."""
        self.root = Path(root)
        self.limits = limits
        self.unpack_layers = os.geteuid() == 0 if unpack_layers is None else unpack_layers
        self.platform = oci.host_platform(machine or platform.machine())
        self.blob_dir = self.root / "blobs" / "sha256"
        self.layer_dir = self.root / "layers"
        self.container_dir = self.root / "containers"
        self.tmp_dir = self.root / "tmp"
        self.index_path = self.root / "index.json"
        for d in (self.blob_dir, self.layer_dir, self.container_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_stale_tmp()

    # -- paths and locks ---------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / check_digest(digest).split(":", 1)[1]

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def layer_path(self, diff_id: str) -> Path:
        """The unpacked layer's root directory (an overlayfs lowerdir)."""
        return self.layer_dir / check_digest(diff_id).split(":", 1)[1] / "fs"

    def layer_info(self, diff_id: str) -> LayerInfo | None:
        meta = self.layer_dir / check_digest(diff_id).split(":", 1)[1] / "layer.json"
        try:
            return msgspec.json.decode(meta.read_bytes(), type=LayerInfo)
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def _tmp_path(self) -> Path:
        return self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}"

    @contextmanager
    def _flock(self, name: str, kind: int) -> Iterator[None]:
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)

    def _clean_stale_tmp(self) -> None:
        for entry in list(self.tmp_dir.iterdir()) + [p for p in self.layer_dir.glob(".tmp-*")]:
            pid_text = entry.name.removeprefix(".tmp-").split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)):
                continue
            log.info("images.stale_tmp_removed", extra={"path": str(entry)})
            _remove_tree(entry)

    # -- index -------------------------------------------------------------

    def _load(self) -> _Index:
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            return _Index()
        idx = msgspec.json.decode(data, type=_Index)
        if idx.version != INDEX_FORMAT_VERSION:
            raise InvalidImage(f"image index format {idx.version} is not supported", path=str(self.index_path))
        return idx

    def _save(self, idx: _Index) -> None:
        write_atomic(self.index_path, msgspec.json.encode(idx), 0o644)

    # -- queries -----------------------------------------------------------

    def list(self) -> list[ImageRecord]:
        return sorted(self._load().images.values(), key=lambda r: (r.names[:1], r.id))

    def get(self, ref: str) -> ImageRecord:
        return _resolve(self._load(), ref)

    def container_uses(self) -> list[ContainerUse]:
        out = []
        for path in sorted(self.container_dir.glob("*.json")):
            try:
                out.append(msgspec.json.decode(path.read_bytes(), type=ContainerUse))
            except (FileNotFoundError, msgspec.DecodeError):
                continue
        return out

    # -- container holds (rootfs.py) ---------------------------------------

    def record_use(self, use: ContainerUse) -> None:
        write_atomic(self.container_dir / f"{use.container_id}.json", msgspec.json.encode(use), 0o644)

    def release_use(self, container_id: str) -> None:
        try:
            os.unlink(self.container_dir / f"{container_id}.json")
        except FileNotFoundError:
            pass

    # -- mutations ---------------------------------------------------------

    def remove(self, ref: str, *, force: bool = False) -> ImageRecord:
        """Untag `ref`; the image record goes when its last name does (or when
        `ref` is an id). Blobs and layers are freed by gc()."""
        with self._flock("index.lock", fcntl.LOCK_EX):
            idx = self._load()
            rec = _resolve(idx, ref)
            name = _as_name(ref)
            if name is not None and name in rec.names and len(rec.names) > 1:
                idx.images[rec.id] = msgspec.structs.replace(rec, names=[n for n in rec.names if n != name])
                self._save(idx)
                return rec
            users = [u.container_id for u in self.container_uses() if u.image_id == rec.id]
            if users and not force:
                raise ImageInUse(f"image {rec.short_id} is used by container(s) {', '.join(users)}", image=rec.id)
            del idx.images[rec.id]
            self._save(idx)
            log.info("images.removed", extra={"image": rec.id, "names": rec.names})
            return rec

    def gc(self, in_use_image_ids: set[str] | frozenset[str] = frozenset(), *, prune_untagged: bool = True) -> GcResult:
        """Drop untagged images nobody uses (unless `prune_untagged` is False),
        then every blob and unpacked layer no image record and no container
        root references. `in_use_image_ids` are images the runtime still runs."""
        with self._flock("ingest.lock", fcntl.LOCK_EX), self._flock("index.lock", fcntl.LOCK_EX):
            self._clean_stale_tmp()
            idx = self._load()
            uses = self.container_uses()
            keep_ids = set(in_use_image_ids) | {u.image_id for u in uses}
            removed_images = [i for i, r in idx.images.items() if prune_untagged and not r.names and i not in keep_ids]
            for i in removed_images:
                del idx.images[i]
            live_blobs: set[str] = set()
            live_layers: set[str] = set()
            for r in idx.images.values():
                live_blobs.update({r.manifest_digest, r.config_digest, *(layer.digest for layer in r.layers)})
                live_layers.update(r.diff_ids)
            for u in uses:
                live_layers.update(u.diff_ids)
            idx.diff_ids = {b: d for b, d in idx.diff_ids.items() if b in live_blobs}
            freed = 0
            removed_blobs = 0
            for path in self.blob_dir.iterdir():
                if f"sha256:{path.name}" not in live_blobs:
                    freed += path.stat().st_size
                    path.unlink()
                    removed_blobs += 1
            removed_layers = 0
            for path in self.layer_dir.iterdir():
                if path.name.startswith(".tmp-"):
                    continue
                if f"sha256:{path.name}" not in live_layers:
                    _remove_tree(path)
                    removed_layers += 1
            self._save(idx)
        if removed_blobs or removed_layers:
            fsync_directory(self.blob_dir)
        log.info(
            "images.gc",
            extra={"images": len(removed_images), "blobs": removed_blobs, "layers": removed_layers, "freed": freed},
        )
        return GcResult(removed_images, removed_blobs, removed_layers, freed)

    # -- ingest ------------------------------------------------------------

    @contextmanager
    def ingest(self) -> Iterator[_Ingest]:
        """Scope of one import/pull: on error every blob and layer it created is removed."""
        txn = _Ingest()
        with self._flock("ingest.lock", fcntl.LOCK_SH):
            try:
                yield txn
            except BaseException:
                self._rollback(txn)
                raise

    def _rollback(self, txn: _Ingest) -> None:
        with self._flock("index.lock", fcntl.LOCK_EX):
            idx = self._load()
            live = {d for r in idx.images.values() for d in (r.manifest_digest, r.config_digest)}
            live |= {layer.digest for r in idx.images.values() for layer in r.layers}
            live_layers = {d for r in idx.images.values() for d in r.diff_ids}
            for digest in txn.blobs:
                if digest not in live:
                    try:
                        self.blob_path(digest).unlink()
                    except FileNotFoundError:
                        pass
            for layer in txn.layers:
                if f"sha256:{layer.name}" not in live_layers:
                    _remove_tree(layer)
        log.info("images.ingest_rolled_back", extra={"blobs": len(txn.blobs), "layers": len(txn.layers)})

    def writer(self, txn: _Ingest, digest: str | None, size: int | None) -> BlobWriter:
        return BlobWriter(self, digest, size)

    def commit_blob(self, txn: _Ingest, writer: BlobWriter) -> str:
        digest, created = writer.commit()
        if created:
            txn.blobs.append(digest)
        return digest

    def put_blob(self, txn: _Ingest, data: bytes, digest: str | None = None) -> str:
        w = BlobWriter(self, digest, len(data) if digest else None)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        return self.commit_blob(txn, w)

    def copy_blob(
        self,
        txn: _Ingest,
        src: BinaryIO,
        digest: str | None,
        size: int | None,
        progress: ProgressCallback | None = None,
        phase: str = "copy",
        label: str | None = None,
    ) -> str:
        if digest is not None and self.has_blob(digest):
            if progress and size:
                progress(ProgressEvent(phase, digest, size, size))
            return digest
        w = BlobWriter(self, digest, size)
        try:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                w.write(chunk)
                if progress:
                    progress(ProgressEvent(phase, label or digest or "blob", w.written, size))
        except BaseException:
            w.abort()
            raise
        return self.commit_blob(txn, w)

    def install(
        self,
        txn: _Ingest,
        manifest_bytes: bytes,
        names: list[str],
        *,
        repository_digests: list[str] = (),  # type: ignore[assignment]
        progress: ProgressCallback | None = None,
    ) -> ImageRecord:
        """Record an image whose manifest, config and layer blobs are already
        stored: verify diff_ids (unpacking layers for the cache), then point
        `names` at it. Blocking; run it in a thread from trio."""
        manifest_digest = self.put_blob(txn, manifest_bytes)
        manifest = oci.decode_manifest(manifest_bytes)
        config_bytes = self.blob_path(manifest.config.digest).read_bytes()
        config_doc = oci.decode_config(config_bytes)
        diff_ids = config_doc.rootfs.diff_ids
        if len(diff_ids) != len(manifest.layers):
            raise InvalidImage(
                f"manifest has {len(manifest.layers)} layers but config lists {len(diff_ids)} diff_ids",
                manifest=manifest_digest,
            )
        known = self._load().diff_ids
        layers = []
        for i, (desc, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True)):
            self._verify_layer(txn, i, desc, diff_id, known.get(desc.digest), progress)
            layers.append(LayerRecord(desc.digest, desc.media_type, desc.size, diff_id))
        rec = ImageRecord(
            id=manifest.config.digest,
            names=[],
            manifest_digest=manifest_digest,
            config_digest=manifest.config.digest,
            layers=layers,
            size=manifest.config.size + sum(layer.size for layer in manifest.layers),
            config=ImageConfig.from_doc(config_doc),
            created_at=time.time(),
            repository_digests=list(repository_digests),
        )
        with self._flock("index.lock", fcntl.LOCK_EX):
            idx = self._load()
            old = idx.images.get(rec.id)
            keep_names = list(old.names) if old else []
            keep_repo = list(old.repository_digests) if old else []
            for other_id, other in list(idx.images.items()):
                if other_id != rec.id and set(other.names) & set(names):
                    idx.images[other_id] = msgspec.structs.replace(
                        other, names=[n for n in other.names if n not in names]
                    )
            all_names = keep_names + [n for n in names if n not in keep_names]
            all_repo = keep_repo + [d for d in rec.repository_digests if d not in keep_repo]
            rec = msgspec.structs.replace(
                rec,
                names=all_names,
                repository_digests=all_repo,
                created_at=old.created_at if old else rec.created_at,
            )
            idx.images[rec.id] = rec
            for layer in layers:
                idx.diff_ids[layer.digest] = layer.diff_id
            self._save(idx)
        log.info("images.installed", extra={"image": rec.id, "names": rec.names, "layers": len(layers)})
        return rec

    def _verify_layer(
        self,
        txn: _Ingest,
        i: int,
        desc: oci.Descriptor,
        diff_id: str,
        known: str | None,
        progress: ProgressCallback | None,
    ) -> None:
        if known is not None and known != diff_id:
            raise DigestMismatch(
                f"layer {i} ({desc.digest}) decompresses to {known}, config says {diff_id}",
                expected=diff_id,
                actual=known,
            )
        blob = self.blob_path(desc.digest)
        if not blob.is_file():
            raise InvalidImage(f"layer blob {desc.digest} is not in the store")
        compression = oci.LAYER_COMPRESSION[desc.media_type]
        if compression == "none":
            with open(blob, "rb") as f:
                compression = detect_compression(f.read(4))  # docker save tars are sometimes compressed
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(ProgressEvent("unpack", diff_id, done, None))

        if not self.unpack_layers:
            if known is None:
                result = hash_layer(blob, compression, self.limits, tick)
                _check_diff_id(i, desc.digest, diff_id, result.diff_id)
            return
        if known is not None and self.layer_info(diff_id) is not None:
            return
        final = self.layer_dir / diff_id.split(":", 1)[1]
        work = self.layer_dir / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
        (work / "fs").mkdir(parents=True)
        try:
            result = unpack_layer(blob, compression, work / "fs", mode="layer", limits=self.limits, progress=tick)
            _check_diff_id(i, desc.digest, diff_id, result.diff_id)
            whiteouts = "overlay" if os.geteuid() == 0 else "marker"
            info = LayerInfo(diff_id=diff_id, size=result.size, entries=result.entries, whiteouts=whiteouts)
            (work / "layer.json").write_bytes(msgspec.json.encode(info))
            _syncfs(work)
            if self.layer_info(diff_id) is not None:
                _remove_tree(work)  # another import won the race; same content
                return
            if final.exists():
                _remove_tree(final)  # an incomplete dir without layer.json
            os.rename(work, final)
            fsync_directory(self.layer_dir)
            txn.layers.append(final)
        except BaseException:
            _remove_tree(work)
            raise
        for w in result.warnings:
            log.warning("images.layer_warning", extra={"layer": diff_id, "warning": w})

    # -- import ------------------------------------------------------------

    def import_path(
        self, path: Path, *, name: str | None = None, progress: ProgressCallback | None = None
    ) -> list[ImageRecord]:
        """Import an OCI image layout (directory or tar) or a `docker save`
        tarball. `name` tags the image (required only when the archive names
        none and more than one image is inside). Blocking."""
        path = Path(path)
        if not path.exists():
            raise NotFound(f"{path} does not exist", path=str(path))
        extra_names = [_canonical_name(name)] if name else []
        source: _Source = _DirSource(path) if path.is_dir() else _TarSource(path)
        try:
            with self.ingest() as txn:
                if source.exists("index.json") and source.exists("oci-layout"):
                    records = self._import_layout(txn, source, extra_names, progress)
                elif source.exists("manifest.json"):
                    records = self._import_docker_save(txn, source, extra_names, progress)
                else:
                    raise InvalidImage(
                        f"{path} is neither an OCI image layout (oci-layout + index.json) "
                        "nor a docker save archive (manifest.json)"
                    )
        finally:
            source.close()
        return records

    def _import_layout(
        self, txn: _Ingest, src: _Source, extra_names: list[str], progress: ProgressCallback | None
    ) -> list[ImageRecord]:
        index = oci.decode_index(src.read("index.json"))
        if not index.manifests:
            raise InvalidImage("image layout index.json lists no manifests")
        # Entries for other platforms (and buildx attestations, "unknown/unknown")
        # are skipped; the blobs of foreign platforms are often not even present.
        entries = [
            d
            for d in index.manifests
            if d.platform is None
            or (d.platform.os == self.platform.os and d.platform.architecture == self.platform.architecture)
        ]
        if not entries:
            oci.select_platform(index, self.platform)  # raises, naming what is available
        records = []
        for top in entries:
            names = _layout_names(top) + extra_names
            desc = top
            data = self._layout_blob(src, desc)
            for _ in range(_MAX_NESTED_INDEX):
                if oci.document_kind(data, desc.media_type) != "index":
                    break
                desc = oci.select_platform(oci.decode_index(data), self.platform)
                data = self._layout_blob(src, desc)
            else:
                raise InvalidImage("image indexes nest too deeply")
            manifest = oci.decode_manifest(data)
            with src.open(_blob_name(manifest.config.digest)) as f:
                self.copy_blob(txn, f, manifest.config.digest, manifest.config.size)
            for layer in manifest.layers:
                if not src.exists(_blob_name(layer.digest)):
                    raise InvalidImage(f"image layout is missing layer blob {layer.digest}")
                with src.open(_blob_name(layer.digest)) as f:
                    self.copy_blob(txn, f, layer.digest, layer.size, progress)
            records.append(self.install(txn, data, names, progress=progress))
        return records

    def _layout_blob(self, src: _Source, desc: oci.Descriptor) -> bytes:
        data = src.read(_blob_name(desc.digest))
        oci.verify_bytes(data, desc.digest, f"manifest {desc.digest}")
        if len(data) != desc.size:
            raise DigestMismatch(f"manifest {desc.digest} is {len(data)} bytes, descriptor says {desc.size}")
        return data

    def _import_docker_save(
        self, txn: _Ingest, src: _Source, extra_names: list[str], progress: ProgressCallback | None
    ) -> list[ImageRecord]:
        entries = oci.decode_docker_save_manifest(src.read("manifest.json"))
        if not entries:
            raise InvalidImage("docker save manifest.json lists no images")
        records = []
        for entry in entries:
            config_bytes = src.read(entry.config)
            config_digest = self.put_blob(txn, config_bytes)
            # A docker save config file is named by its digest; check it when it is.
            stem = os.path.basename(entry.config).removesuffix(".json")
            if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem):
                oci.verify_bytes(config_bytes, f"sha256:{stem}", f"config {entry.config}")
            oci.decode_config(config_bytes)
            layers = []
            for layer_name in entry.layers:
                with src.open(layer_name) as f:
                    head = f.read(4)
                with src.open(layer_name) as f:
                    digest = self.copy_blob(txn, f, None, None, progress, label=layer_name)
                media_type = {
                    "gzip": oci.OCI_LAYER_GZIP,
                    "zstd": oci.OCI_LAYER_ZSTD,
                    "none": oci.OCI_LAYER,
                }[detect_compression(head)]
                layers.append(
                    oci.Descriptor(media_type=media_type, digest=digest, size=self.blob_path(digest).stat().st_size)
                )
            manifest = oci.Manifest(
                schema_version=2,
                media_type=oci.OCI_MANIFEST,
                config=oci.Descriptor(media_type=oci.OCI_CONFIG, digest=config_digest, size=len(config_bytes)),
                layers=layers,
            )
            names = [_canonical_name(t) for t in (entry.repo_tags or [])] + extra_names
            records.append(self.install(txn, oci.encode(manifest), names, progress=progress))
        return records


# helpers of the store (module-private) ---------------------------------------


def _check_diff_id(i: int, blob: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise DigestMismatch(
            f"layer {i} ({blob}) uncompressed digest {actual} does not match config diff_id {expected}",
            expected=expected,
            actual=actual,
        )


def _blob_name(digest: str) -> str:
    algo, hexpart = check_digest(digest).split(":", 1)
    return f"blobs/{algo}/{hexpart}"


def _canonical_name(text: str) -> str:
    ref = parse_reference(text)
    if ref.tag is None:
        raise InvalidReference(f"{text!r} has no tag to name an image by", reference=text)
    return f"{ref.name}:{ref.tag}"


def _layout_names(desc: oci.Descriptor) -> list[str]:
    for key in (oci.ANNOTATION_CONTAINERD_NAME, oci.ANNOTATION_REF_NAME):
        value = desc.annotations.get(key)
        # A bare ref.name is just a tag ("latest"), which names nothing alone.
        if value and ("/" in value or ":" in value):
            try:
                return [_canonical_name(value)]
            except InvalidReference:
                log.warning("images.bad_layout_name", extra={"name": value})
    return []


def _as_name(ref: str) -> str | None:
    try:
        r = parse_reference(ref)
    except InvalidReference:
        return None
    return f"{r.name}:{r.tag}" if r.tag and not r.digest else None


def _resolve(idx: _Index, ref: str) -> ImageRecord:
    if not ref:
        raise InvalidReference("image reference is empty")
    text = ref.removeprefix("sha256:")
    if ref.startswith("sha256:") or (len(text) >= 6 and all(c in "0123456789abcdef" for c in text)):
        matches = [r for i, r in idx.images.items() if i.split(":", 1)[1].startswith(text)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidReference(f"image id prefix {ref!r} is ambiguous", reference=ref)
        if ref.startswith("sha256:"):
            raise ImageNotFound(f"no image with id {ref}", reference=ref)
    parsed: Reference = parse_reference(ref)
    if parsed.digest:
        for r in idx.images.values():
            if parsed.digest == r.manifest_digest and (
                any(n.rsplit(":", 1)[0] == parsed.name for n in r.names)
                or any(d == f"{parsed.name}@{parsed.digest}" for d in r.repository_digests)
            ):
                return r
        raise ImageNotFound(f"image {ref} is not in the local store", reference=ref)
    name = f"{parsed.name}:{parsed.tag}"
    for r in idx.images.values():
        if name in r.names:
            return r
    raise ImageNotFound(f"image {parsed.familiar} is not in the local store", reference=ref)


def _remove_tree(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
