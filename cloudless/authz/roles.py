"""Roles and the principal a verified peer acts as.

A node certificate (`spiffe://<cluster>/node/<name>`) acts as role `node`.
A client certificate carries its role in the subject (X.520 `role`
attribute, set by the CA at issuance and so covered by its signature):
`admin` (everything), `operator` (workloads, images, blobs, vars), `viewer`
(read-only). A client certificate without a valid role acts as nobody.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from cloudless.pki.identity import CLIENT_ROLES

Role = Literal["node", "admin", "operator", "viewer", "enrollee"]
ROLES: tuple[str, ...] = ("node", *CLIENT_ROLES)
# The peer of an enrollment connection (no certificate yet): see transport.tls.ENROLLEE.
ENROLLEE = "enrollee"


class PeerLike(Protocol):
    @property
    def cluster_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def uri(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call acts for: an identity URI and the role it holds."""

    uri: str
    role: str  # one of ROLES, ENROLLEE, or "" (no role: refused everything)
    kind: str
    name: str

    def __str__(self) -> str:
        if self.kind == "client" and self.role:
            return f"{self.uri} ({self.role})"
        return self.uri


def principal_of(peer: PeerLike) -> Principal:
    if peer.kind == "node":
        role = "node"
    elif peer.kind == ENROLLEE:
        role = ENROLLEE
    elif peer.kind == "client" and peer.role in CLIENT_ROLES:
        role = peer.role
    else:
        role = ""
    return Principal(peer.uri, role, peer.kind, peer.name)
