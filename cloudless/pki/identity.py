"""Cloudless identities and their SPIFFE-style URIs.

`spiffe://<cluster_id>/node/<name>` names a node, `spiffe://<cluster_id>/client/<name>`
a client (CLI user or SDK). The URI is the only thing a certificate says about
who holds it; `Identity.parse` is strict so that no other string round-trips.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from cloudless.pki.errors import InvalidIdentity

IdentityKind = Literal["node", "client"]
_KINDS: dict[str, IdentityKind] = {"node": "node", "client": "client"}  # what _URI_PATTERN admits
KINDS: tuple[str, ...] = ("node", "client")

# A client certificate's role (cloudless.authz says what each may do). It is
# an X.520 `role` attribute (2.5.4.72) in the subject, set by the CA.
ClientRole = Literal["admin", "operator", "viewer"]
CLIENT_ROLES: tuple[str, ...] = ("admin", "operator", "viewer")
ROLE_ATTRIBUTE_OID = "2.5.4.72"

# DNS-label-like, lower case: safe in URIs, file names and log lines.
_LABEL = r"[a-z0-9][a-z0-9._-]{0,62}"
LABEL_PATTERN = re.compile(_LABEL)
_URI_PATTERN = re.compile(rf"spiffe://({_LABEL})/(node|client)/({_LABEL})")


@dataclass(frozen=True, slots=True)
class Identity:
    cluster_id: str
    kind: IdentityKind
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.cluster_id, str) or not LABEL_PATTERN.fullmatch(self.cluster_id):
            raise InvalidIdentity(f"invalid cluster id {self.cluster_id!r}: want {_LABEL}", field="cluster_id")
        if self.kind not in KINDS:
            raise InvalidIdentity(f"invalid identity kind {self.kind!r}: want node or client", field="kind")
        if not isinstance(self.name, str) or not LABEL_PATTERN.fullmatch(self.name):
            raise InvalidIdentity(f"invalid {self.kind} name {self.name!r}: want {_LABEL}", field="name")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.cluster_id}/{self.kind}/{self.name}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        if not isinstance(uri, str):
            raise InvalidIdentity(f"identity URI must be a string, got {type(uri).__name__}")
        match = _URI_PATTERN.fullmatch(uri)
        if match is None:
            raise InvalidIdentity(f"not a Cloudless identity URI: {uri[:200]!r}")
        cluster_id, kind, name = match.groups()
        return cls(cluster_id, _KINDS[kind], name)

    @classmethod
    def node(cls, cluster_id: str, name: str) -> Identity:
        return cls(cluster_id, "node", name)

    @classmethod
    def client(cls, cluster_id: str, name: str) -> Identity:
        return cls(cluster_id, "client", name)

    def __str__(self) -> str:
        return self.uri


def validate_cluster_id(cluster_id: str) -> str:
    """Return `cluster_id` if it is a valid cluster id, else raise InvalidIdentity."""
    if not isinstance(cluster_id, str) or not LABEL_PATTERN.fullmatch(cluster_id):
        raise InvalidIdentity(f"invalid cluster id {cluster_id!r}: want {_LABEL}", field="cluster_id")
    return cluster_id


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end, as proven by its certificate."""

    cluster_id: str
    kind: str  # "node" or "client"
    name: str
    serial: int  # certificate serial, for revocation checks and audit
    role: str = ""  # a client certificate's role (admin, operator, viewer); "" for nodes

    @property
    def uri(self) -> str:
        return f"spiffe://{self.cluster_id}/{self.kind}/{self.name}"
