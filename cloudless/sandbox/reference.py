"""Image references, resolved the way Docker resolves them.

    busybox                    -> docker.io/library/busybox:latest
    user/app:1.2               -> docker.io/user/app:1.2
    localhost/app              -> localhost/app:latest      (registry "localhost")
    127.0.0.1:5000/team/app    -> registry 127.0.0.1:5000
    app@sha256:<64 hex>        -> digest reference (no default tag)
    app:1.2@sha256:<64 hex>    -> the digest is what is pulled; the tag is kept as a name

The first path component is a registry host when it contains "." or ":", is
"localhost", or has an uppercase letter (the grammar of
distribution/reference). Repository paths are lowercase.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cloudless.errors import InvalidInput

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
# docker.io is a name, not a host: the API lives here.
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_LEGACY_HUB_NAMES = {"index.docker.io", "registry-1.docker.io"}

_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_MAX_NAME = 255


class InvalidReference(InvalidInput):
    """An image reference does not follow the reference grammar."""


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str  # "docker.io", "127.0.0.1:5000", "localhost"
    repository: str  # "library/busybox"
    tag: str | None  # None only for a bare digest reference
    digest: str | None  # "sha256:<hex>"

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host (and port) serving the distribution API."""
        return DOCKER_HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def manifest_ref(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    @property
    def tagged(self) -> str | None:
        """registry/repository:tag, the name images are recorded under, if tagged."""
        return f"{self.name}:{self.tag}" if self.tag else None

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def familiar(self) -> str:
        """The short form people type: busybox:latest, user/app:1.2."""
        name = self.name
        if self.registry == DEFAULT_REGISTRY:
            name = self.repository.removeprefix("library/") if self.repository.count("/") == 1 else self.repository
        out = name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference; raises InvalidReference."""
    if not isinstance(text, str) or not text:
        raise InvalidReference("image reference is empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReference(f"image reference {text!r} contains whitespace", reference=text)

    remainder = text
    digest = None
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidReference(
                f"invalid digest {digest!r} in {text!r}: expected sha256:<64 lowercase hex>",
                reference=text,
            )
    if not remainder:
        raise InvalidReference(f"image reference {text!r} has no repository", reference=text)

    # A tag is after the last ":" that comes after the last "/" (a ":" before
    # it is a registry port).
    tag = None
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidReference(f"invalid tag {tag!r} in {text!r}", reference=text)

    registry, path = _split_registry(remainder, text)
    components = path.split("/")
    for comp in components:
        if not comp:
            raise InvalidReference(f"empty path component in {text!r}", reference=text)
        if not _PATH_COMPONENT.match(comp):
            if comp.lower() != comp:
                raise InvalidReference(f"repository name must be lowercase: {comp!r} in {text!r}", reference=text)
            raise InvalidReference(f"invalid repository path component {comp!r} in {text!r}", reference=text)
    if registry == DEFAULT_REGISTRY and len(components) == 1:
        path = f"library/{path}"
    if len(registry) + 1 + len(path) > _MAX_NAME:
        raise InvalidReference(f"repository name longer than {_MAX_NAME} characters", reference=text)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def _split_registry(name: str, text: str) -> tuple[str, str]:
    slash = name.find("/")
    first = name if slash == -1 else name[:slash]
    if slash == -1 or (not any(c in first for c in ".:") and first != "localhost" and first.lower() == first):
        return DEFAULT_REGISTRY, name
    if not _DOMAIN.match(first):
        raise InvalidReference(f"invalid registry host {first!r} in {text!r}", reference=text)
    registry = DEFAULT_REGISTRY if first in _LEGACY_HUB_NAMES else first
    return registry, name[slash + 1 :]
