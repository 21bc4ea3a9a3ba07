"""OCI image-spec and Docker image vocabulary: media types, descriptors,
manifests, indexes, image configs, and the `ImageConfig` the runtime uses.

Decoding validates (msgspec types plus digest syntax and size caps); invalid
documents raise `InvalidImage` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import re

import msgspec

from cloudless.errors import InvalidInput

# Media types ---------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# Layer media type -> compression ("none", "gzip", "zstd").
LAYER_COMPRESSION = {
    OCI_LAYER: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDIST: "none",
    OCI_LAYER_NONDIST_GZIP: "gzip",
    OCI_LAYER_NONDIST_ZSTD: "zstd",
    DOCKER_LAYER: "none",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_FOREIGN_LAYER_GZIP: "gzip",
}

# Manifests and configs are small; a huge one is an attack or a mistake.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


class InvalidImage(InvalidInput):
    """An image document, blob or archive is malformed or inconsistent."""


class DigestMismatch(InvalidImage):
    """Content does not hash to the digest that names it."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Return `digest` if it is a well-formed sha256 digest, else raise."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidImage(f"unsupported or malformed digest {digest!r}", digest=digest)
    return digest


def verify_bytes(data: bytes, digest: str, what: str) -> None:
    actual = sha256_digest(data)
    if actual != digest:
        raise DigestMismatch(
            f"{what} digest mismatch: expected {digest}, got {actual}",
            expected=digest,
            actual=actual,
        )


# Documents -----------------------------------------------------------------


class Platform(msgspec.Struct, frozen=True, rename={"os_version": "os.version", "os_features": "os.features"}):
    architecture: str = ""
    os: str = ""
    variant: str = ""
    os_version: str = ""
    os_features: list[str] = []


class Descriptor(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    media_type: str
    digest: str
    size: int
    urls: list[str] = []
    annotations: dict[str, str] = {}
    platform: Platform | None = None


class Manifest(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    schema_version: int
    config: Descriptor
    layers: list[Descriptor]
    media_type: str = ""
    annotations: dict[str, str] = {}


class Index(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    schema_version: int
    manifests: list[Descriptor]
    media_type: str = ""
    annotations: dict[str, str] = {}


class _MediaTypeProbe(msgspec.Struct, rename="camel"):
    media_type: str = ""
    manifests: list | None = None
    config: dict | None = None


class ContainerConfigDoc(msgspec.Struct, rename="pascal", omit_defaults=True):
    """The `config` object inside an image config (Docker's PascalCase keys)."""

    user: str = ""
    exposed_ports: dict[str, dict] | None = None
    env: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    volumes: dict[str, dict] | None = None
    working_dir: str = ""
    labels: dict[str, str] | None = None
    stop_signal: str = ""


class RootFS(msgspec.Struct):
    type: str
    diff_ids: list[str]


class ImageConfigDoc(msgspec.Struct, omit_defaults=True):
    """An OCI image config blob (the parts we read; unknown keys are kept in the blob)."""

    rootfs: RootFS
    architecture: str = ""
    os: str = ""
    variant: str = ""
    created: str = ""
    config: ContainerConfigDoc | None = None


class DockerSaveEntry(msgspec.Struct, rename="pascal"):
    """One element of a `docker save` tarball's manifest.json."""

    config: str
    layers: list[str]
    repo_tags: list[str] | None = None


class ImageConfig(msgspec.Struct, frozen=True):
    """What the runtime needs from an image to start a container."""

    entrypoint: list[str] = []
    cmd: list[str] = []
    env: list[str] = []
    working_dir: str = ""
    user: str = ""
    exposed_ports: list[str] = []  # "80/tcp", "53/udp"
    labels: dict[str, str] = {}
    stop_signal: str = ""
    volumes: list[str] = []
    architecture: str = ""
    os: str = ""

    @classmethod
    def from_doc(cls, doc: ImageConfigDoc) -> ImageConfig:
        c = doc.config or ContainerConfigDoc()
        return cls(
            entrypoint=list(c.entrypoint or []),
            cmd=list(c.cmd or []),
            env=list(c.env or []),
            working_dir=c.working_dir,
            user=c.user,
            exposed_ports=sorted(c.exposed_ports or {}),
            labels=dict(c.labels or {}),
            stop_signal=c.stop_signal,
            volumes=sorted(c.volumes or {}),
            architecture=doc.architecture,
            os=doc.os,
        )


# Decoding ------------------------------------------------------------------


def _decode(data: bytes, typ: type, what: str):
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidImage(f"{what} is {len(data)} bytes, over the {MAX_DOCUMENT_BYTES} byte limit")
    try:
        return msgspec.json.decode(data, type=typ)
    except msgspec.ValidationError as exc:
        raise InvalidImage(f"invalid {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidImage(f"{what} is not valid JSON: {exc}") from None


def _check_descriptor(d: Descriptor, what: str) -> None:
    check_digest(d.digest)
    if d.size < 0:
        raise InvalidImage(f"{what} descriptor has negative size", digest=d.digest)


def document_kind(data: bytes, media_type: str = "") -> str:
    """'index' or 'manifest', from the declared media type or the document shape."""
    probe = _decode(data, _MediaTypeProbe, "image document")
    mt = media_type.split(";")[0].strip() or probe.media_type
    if mt in INDEX_TYPES:
        return "index"
    if mt in MANIFEST_TYPES:
        return "manifest"
    if mt == "application/vnd.docker.distribution.manifest.v1+json" or mt.endswith("prettyjws"):
        raise InvalidImage("docker schema 1 manifests are not supported", media_type=mt)
    if probe.manifests is not None:
        return "index"
    if probe.config is not None:
        return "manifest"
    raise InvalidImage(f"unknown image document type {mt!r}", media_type=mt)


def decode_manifest(data: bytes) -> Manifest:
    m = _decode(data, Manifest, "image manifest")
    if m.schema_version != 2:
        raise InvalidImage(f"unsupported manifest schemaVersion {m.schema_version}")
    _check_descriptor(m.config, "config")
    for layer in m.layers:
        _check_descriptor(layer, "layer")
        if layer.media_type not in LAYER_COMPRESSION:
            raise InvalidImage(f"unsupported layer media type {layer.media_type!r}", digest=layer.digest)
    return m


def decode_index(data: bytes) -> Index:
    idx = _decode(data, Index, "image index")
    if idx.schema_version != 2:
        raise InvalidImage(f"unsupported index schemaVersion {idx.schema_version}")
    for d in idx.manifests:
        _check_descriptor(d, "manifest")
    return idx


def decode_config(data: bytes) -> ImageConfigDoc:
    doc = _decode(data, ImageConfigDoc, "image config")
    if doc.rootfs.type != "layers":
        raise InvalidImage(f"unsupported rootfs type {doc.rootfs.type!r}")
    for d in doc.rootfs.diff_ids:
        check_digest(d)
    return doc


def decode_docker_save_manifest(data: bytes) -> list[DockerSaveEntry]:
    return _decode(data, list[DockerSaveEntry], "docker save manifest.json")


def encode(doc: msgspec.Struct) -> bytes:
    return msgspec.json.encode(doc)


# Platforms -----------------------------------------------------------------

_MACHINE_TO_OCI = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", ""),
    "i386": ("386", ""),
    "riscv64": ("riscv64", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
}


def host_platform(machine: str) -> Platform:
    """The OCI platform for a `platform.machine()` string on Linux."""
    arch, variant = _MACHINE_TO_OCI.get(machine, (machine, ""))
    return Platform(architecture=arch, os="linux", variant=variant)


def select_platform(index: Index, want: Platform) -> Descriptor:
    """Pick the manifest for `want` from an index (variant matched when both say one)."""
    candidates = []
    for d in index.manifests:
        p = d.platform
        if p is None or p.os != want.os or p.architecture != want.architecture:
            continue
        if p.variant and want.variant and p.variant != want.variant:
            # arm64 images often omit the variant; v8 is its only one.
            continue
        candidates.append(d)
    if not candidates:
        available = sorted(
            f"{d.platform.os}/{d.platform.architecture}" + (f"/{d.platform.variant}" if d.platform.variant else "")
            for d in index.manifests
            if d.platform is not None
        )
        raise InvalidImage(
            f"image has no manifest for {want.os}/{want.architecture}",
            available=", ".join(available) or "none",
        )
    exact = [d for d in candidates if d.platform and d.platform.variant == want.variant]
    return (exact or candidates)[0]
