"""Build small OCI images for the demo, benchmarks and tests.

The busybox image is made from Debian's static /usr/bin/busybox plus one
symlink per applet, so it runs under runc with no network access at build
time. Output forms:

* ``"layout"``: an OCI image layout directory (oci-layout, index.json, blobs/)
* ``"layout-tar"``: the same layout packed in a tar
* ``"docker-save"``: a ``docker save`` style tarball (manifest.json + layer tars)

Everything is deterministic (fixed mtimes, sorted entries), so the same
inputs give the same digests.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import platform as _platform
import random
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

import zstandard

from cloudless.sandbox import oci

BUSYBOX = Path("/usr/bin/busybox")
MTIME = 1_700_000_000
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_LAYER_MEDIA_TYPES = {"gzip": oci.OCI_LAYER_GZIP, "zstd": oci.OCI_LAYER_ZSTD, "none": oci.OCI_LAYER}


# Layer tars ----------------------------------------------------------------


class TarBuilder:
    """Append entries to an in-memory tar with fixed metadata."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = type_
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.mtime = MTIME
        return ti

    def dir(self, name: str, mode: int = 0o755, **kw) -> TarBuilder:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, **kw))
        return self

    def file(self, name: str, data: bytes, mode: int = 0o644, **kw) -> TarBuilder:
        ti = self._info(name, tarfile.REGTYPE, mode, **kw)
        ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data))
        return self

    def file_from(self, name: str, path: Path, mode: int = 0o755, **kw) -> TarBuilder:
        ti = self._info(name, tarfile.REGTYPE, mode, **kw)
        ti.size = path.stat().st_size
        with open(path, "rb") as f:
            self.tar.addfile(ti, f)
        return self

    def symlink(self, name: str, target: str) -> TarBuilder:
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)
        return self

    def hardlink(self, name: str, target: str) -> TarBuilder:
        ti = self._info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target
        self.tar.addfile(ti)
        return self

    def device(self, name: str, kind: str = "char", major: int = 1, minor: int = 3) -> TarBuilder:
        ti = self._info(name, tarfile.CHRTYPE if kind == "char" else tarfile.BLKTYPE, 0o666)
        ti.devmajor, ti.devminor = major, minor
        self.tar.addfile(ti)
        return self

    def fifo(self, name: str) -> TarBuilder:
        self.tar.addfile(self._info(name, tarfile.FIFOTYPE, 0o644))
        return self

    def raw(self, info: tarfile.TarInfo, data: bytes | None = None) -> TarBuilder:
        self.tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return self

    def bytes(self) -> bytes:
        self.tar.close()
        return self._buf.getvalue()


@functools.lru_cache(maxsize=1)
def busybox_layer() -> bytes:
    """An uncompressed layer tar: static busybox, its applet links, a minimal /etc."""
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX} is missing: install Debian's busybox-static")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    t = TarBuilder()
    dirs = {"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev", "var"}
    for d in sorted(dirs):
        t.dir(d, 0o700 if d == "root" else 0o755)
    t.dir("tmp", 0o1777)
    t.file_from("bin/busybox", BUSYBOX, 0o755)
    for applet in sorted(set(applets)):
        parent = os.path.dirname(applet)
        if applet == "bin/busybox" or parent not in dirs:
            continue
        t.symlink(applet, "/bin/busybox")
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    t.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    t.file("etc/hostname", b"busybox\n")
    return t.bytes()


@functools.lru_cache(maxsize=32)  # tests build the same busybox layer many times
def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def host_architecture() -> str:
    return oci.host_platform(_platform.machine()).architecture


# Images --------------------------------------------------------------------


class BuiltImage:
    """The blobs of one image, before they are written in some form."""

    def __init__(self, layers: list[bytes], compression: str, container_config: dict, name: str) -> None:
        self.name = name
        self.uncompressed = layers
        self.compression = compression
        self.compressed = [compress(layer, compression) for layer in layers]
        self.config = json.dumps(
            {
                "architecture": host_architecture(),
                "os": "linux",
                "created": "2023-11-14T22:13:20Z",
                "config": container_config,
                "rootfs": {"type": "layers", "diff_ids": [_sha(layer) for layer in layers]},
                "history": [{"created_by": "cloudless.sandbox.imagebuild"} for _ in layers],
            },
            sort_keys=True,
        ).encode()
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": oci.OCI_MANIFEST,
                "config": {"mediaType": oci.OCI_CONFIG, "digest": _sha(self.config), "size": len(self.config)},
                "layers": [
                    {"mediaType": _LAYER_MEDIA_TYPES[compression], "digest": _sha(c), "size": len(c)}
                    for c in self.compressed
                ],
            },
            sort_keys=True,
        ).encode()

    @property
    def manifest_digest(self) -> str:
        return _sha(self.manifest)

    @property
    def config_digest(self) -> str:
        return _sha(self.config)

    def blobs(self) -> dict[str, bytes]:
        out = {_sha(self.config): self.config, _sha(self.manifest): self.manifest}
        for c in self.compressed:
            out[_sha(c)] = c
        return out

    def write_layout(self, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        blobs = dest / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        for digest, data in self.blobs().items():
            (blobs / digest.split(":", 1)[1]).write_bytes(data)
        annotations = {}
        if self.name:
            annotations = {
                oci.ANNOTATION_CONTAINERD_NAME: self.name,
                oci.ANNOTATION_REF_NAME: self.name.rsplit(":", 1)[1] if ":" in self.name.split("/")[-1] else "latest",
            }
        index = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": oci.OCI_MANIFEST,
                    "digest": self.manifest_digest,
                    "size": len(self.manifest),
                    "annotations": annotations,
                    "platform": {"architecture": host_architecture(), "os": "linux"},
                }
            ],
        }
        (dest / "index.json").write_text(json.dumps(index, sort_keys=True))
        return dest

    def write_docker_save(self, dest: Path) -> Path:
        """A `docker save` tarball: manifest.json, <config>.json, <id>/layer.tar (uncompressed)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        t = TarBuilder()
        layer_names = []
        for layer in self.uncompressed:
            layer_id = hashlib.sha256(layer).hexdigest()
            t.dir(layer_id)
            t.file(f"{layer_id}/VERSION", b"1.0")
            t.file(f"{layer_id}/layer.tar", layer)
            layer_names.append(f"{layer_id}/layer.tar")
        config_name = self.config_digest.split(":", 1)[1] + ".json"
        t.file(config_name, self.config)
        manifest = [{"Config": config_name, "RepoTags": [self.name] if self.name else None, "Layers": layer_names}]
        t.file("manifest.json", json.dumps(manifest).encode())
        dest.write_bytes(t.bytes())
        return dest

    def write(self, dest_dir: Path, form: str) -> Path:
        dest_dir = Path(dest_dir)
        if form == "layout":
            return self.write_layout(dest_dir / "layout")
        if form == "layout-tar":
            layout = self.write_layout(dest_dir / "layout-src")
            out = dest_dir / "layout.tar"
            with tarfile.open(out, "w") as tar:
                for entry in sorted(os.listdir(layout)):
                    tar.add(layout / entry, arcname=entry)
            return out
        if form == "docker-save":
            return self.write_docker_save(dest_dir / "image.tar")
        raise ValueError(f"unknown image form {form!r}")


def busybox_image(name: str = "docker.io/library/busybox:latest", compression: str = "gzip") -> BuiltImage:
    return BuiltImage([busybox_layer()], compression, {"Env": [DEFAULT_PATH_ENV], "Cmd": ["sh"]}, name)


def build_busybox_image(
    dest_dir: Path, form: str = "layout", *, name: str = "docker.io/library/busybox:latest", compression: str = "gzip"
) -> Path:
    """Write the busybox image under `dest_dir` in `form`; return the file or directory to import."""
    return busybox_image(name, compression).write(Path(dest_dir), form)


def synthetic_image(
    total_bytes: int,
    *,
    layers: int = 4,
    files_per_layer: int = 64,
    compressible: float = 0.5,
    seed: int = 0,
    compression: str = "gzip",
    name: str = "localhost/synthetic:latest",
) -> BuiltImage:
    """Layers of random-sized files; `compressible` is the share of text-like content."""
    rng = random.Random(seed)
    per_layer = max(1, total_bytes // layers)
    out = []
    words = [bytes(rng.choice(b"abcdefghij klmnop\n") for _ in range(4096)) for _ in range(16)]
    for li in range(layers):
        t = TarBuilder()
        t.dir(f"data{li}")
        per_file = max(1, per_layer // files_per_layer)
        for fi in range(files_per_layer):
            if rng.random() < compressible:
                chunks = b"".join(rng.choice(words) for _ in range(per_file // 4096 + 1))[:per_file]
            else:
                chunks = rng.randbytes(per_file)
            t.file(f"data{li}/f{fi:05d}", chunks)
        out.append(t.bytes())
    return BuiltImage(out, compression, {"Cmd": ["sh"]}, name)


def build_image(
    dest_dir: Path,
    layers: Iterable[bytes],
    form: str = "layout",
    *,
    name: str = "localhost/test:latest",
    compression: str = "gzip",
    container_config: dict | None = None,
) -> Path:
    """An image from given uncompressed layer tars (e.g. malicious ones in tests)."""
    img = BuiltImage(list(layers), compression, container_config or {"Cmd": ["sh"]}, name)
    return img.write(Path(dest_dir), form)
