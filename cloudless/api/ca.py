"""CA rotation and the trust bundle, as RPCs (who may call each: authz/table.py).

`ca.rotate` (admin) has the leader create the next CA, seal its key with
the same key-encryption key as the active one (pki.custody) and commit it
(phase 1); the coordinator activates and retires it
(coordinator/ca_rotation.py). `ca.status` (admin) shows the phase and who
still holds certificates from the previous CA. `pki.bundle` (clients) and
`pki.trust` (nodes outside Raft) hand out the trust bundle; a client learns
a new CA over a connection its current bundle already authenticates.
`pki.renew_client` re-issues a client's own certificate: the identity and
role its current certificate proves, a new key, proof-signed like every
client call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from cryptography.hazmat.primitives import serialization

from cloudless.api.identities import MAX_USER_CERT_DAYS, issue_client_certificate
from cloudless.api.routing import LeaderRouting
from cloudless.api.service import raise_rejected
from cloudless.authz import PermissionDenied
from cloudless.errors import Conflict, Unavailable
from cloudless.observability.events import EventLog
from cloudless.pki.bundle import endorse, load_bundle
from cloudless.pki.ca import ClusterCA, certificate_fingerprint
from cloudless.pki.custody import seal_ca_key
from cloudless.ports import ClusterView, Proposer
from cloudless.state.commands import MAX_CA_OVERLAP_S, MIN_CA_OVERLAP_S, BeginCARotation
from cloudless.transport.rpc import RpcClient, RpcContext, RpcServer

DEFAULT_OVERLAP_S = 86400.0


class CARotate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    overlap_s: Annotated[float, msgspec.Meta(ge=MIN_CA_OVERLAP_S, le=MAX_CA_OVERLAP_S)] = DEFAULT_OVERLAP_S


class CAStatus(msgspec.Struct, frozen=True):
    phase: str  # "stable" | "trust" (both trusted, old signs) | "reissue" (new signs, old still trusted)
    active_fingerprint: str
    other_fingerprint: str = ""  # the next CA (trust) or the previous one (reissue)
    started_at: float = 0.0
    activate_at: float = 0.0
    retire_at: float = 0.0
    old_nodes: list[str] = []  # registered nodes without a certificate from the new CA
    old_users: list[str] = []  # clients with valid certificates but none from the new CA
    blockers: list[str] = []  # why the previous CA is not retired yet


class CABundle(msgspec.Struct, frozen=True):
    ca_pem: bytes  # the trust bundle, active CA first
    endorsement: bytes = b""  # the previous CA's signature over the new one (pki.bundle.accept_offered_bundle)


class ClientRenew(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    csr_pem: Annotated[bytes, msgspec.Meta(max_length=8192)]
    # The CLI asks for its current certificate's lifetime, so a user added for
    # a month is not cut to a week; bounded as `users add` bounds it.
    ttl_s: Annotated[float, msgspec.Meta(ge=60, le=MAX_USER_CERT_DAYS * 86400)] = 7 * 86400.0


class ClientRenewed(msgspec.Struct, frozen=True):
    cert_pem: bytes
    ca_pem: bytes
    not_after: float


def _fingerprint(pem: bytes) -> str:
    return certificate_fingerprint(load_bundle(pem)[0]) if pem else ""


class CAApi:
    def __init__(
        self,
        cluster: ClusterView,
        replicated: Proposer,
        rpc: RpcClient,
        events: EventLog,
        *,
        signing_ca: Callable[[], ClusterCA],
        ca_kek: Callable[[], bytes | None],
        own_bundle: Callable[[], bytes],
    ) -> None:
        self.cluster = cluster
        self.replicated = replicated
        self.rpc = rpc
        self.events = events
        self.signing_ca = signing_ca  # the active CA with its key (coordinator-trusted nodes only)
        self.ca_kek = ca_kek  # the key that seals a new CA key; None off coordinators
        self.own_bundle = own_bundle  # the CAs this node trusts now (its credentials' bundle)

    def register(self, server: RpcServer) -> None:
        routing = LeaderRouting(self.cluster, self.replicated, self.rpc)
        routing.register_on_leader(server, "ca.rotate", self.rotate, CARotate)
        routing.register_on_leader(server, "ca.status", self.status, None)
        routing.register_on_leader(server, "pki.renew_client", self.renew_client, ClientRenew)
        server.unary("pki.bundle")(self.bundle)
        server.unary("pki.trust")(self.bundle)

    def trust_bundle(self) -> bytes:
        """What this node trusts: the replicated bundle, or (outside Raft) its own copy."""
        return self.replicated.fsm.trust_bundle() or self.own_bundle()

    async def bundle(self, ctx: RpcContext, body: bytes) -> CABundle:
        return CABundle(self.trust_bundle(), self.replicated.fsm.trust_endorsement())

    async def rotate(self, ctx: RpcContext, req: CARotate) -> CAStatus:
        fsm = self.replicated.fsm
        await self.replicated.linearizable()
        if fsm.ca is None:
            raise Unavailable("the cluster CA is not committed yet; retry shortly")
        if fsm.ca_rotation is not None:
            raise Conflict(f"a CA rotation is already under way ({fsm.ca_rotation.phase}); see `ca status`")
        kek = self.ca_kek()
        if kek is None:
            raise Unavailable(f"node {self.cluster.node_id} holds no CA key-encryption key")
        active = self.signing_ca()
        now = time.time()
        ca = ClusterCA.create(self.cluster.cluster_id, datetime.fromtimestamp(now, UTC))
        cert_pem, key_pem = ca.to_pem()
        sealed = seal_ca_key(kek, key_pem, self.cluster.cluster_id, ca.fingerprint)
        endorsement = endorse(active.private_key, self.cluster.cluster_id, ca.certificate)
        result, _ = await self.replicated.propose(
            BeginCARotation(self.cluster.cluster_id, cert_pem, sealed, overlap_s=req.overlap_s, endorsement=endorsement)
        )
        raise_rejected(result)
        self.events.record(
            "ca.rotation_started", self.cluster.node_id, f"next CA {ca.fingerprint}", by=str(ctx.principal)
        )
        return self.current_status()

    async def status(self, ctx: RpcContext, body: bytes) -> CAStatus:
        await self.replicated.linearizable()
        return self.current_status()

    def current_status(self) -> CAStatus:
        fsm = self.replicated.fsm
        if fsm.ca is None:
            raise Unavailable("the cluster CA is not committed yet; retry shortly")
        active = _fingerprint(fsm.ca.certificate_pem)
        rotation = fsm.ca_rotation
        if rotation is None:
            return CAStatus("stable", active)
        now = time.time()
        reissued = rotation.phase == "reissue"
        old_nodes = sorted(n for n in fsm.nodes if not (reissued and n in rotation.reissued_nodes))
        old_users = sorted(
            name
            for name, client in fsm.clients.items()
            if any(na > now for na in client.certificates.values())
            and not (reissued and name in rotation.reissued_clients)
        )
        blockers = fsm.ca_retire_blockers(now) if reissued else ["the next CA is not active yet"]
        return CAStatus(
            rotation.phase,
            active,
            _fingerprint(rotation.other.certificate_pem),
            rotation.started_at,
            rotation.activate_at,
            rotation.retire_at,
            old_nodes,
            old_users,
            blockers,
        )

    async def renew_client(self, ctx: RpcContext, req: ClientRenew) -> ClientRenewed:
        principal = ctx.principal
        if principal is None or principal.kind != "client" or not principal.role:
            raise PermissionDenied(f"permission denied: {principal} may not renew a client certificate")
        fsm = self.replicated.fsm
        now = time.time()
        if fsm.retired.get(f"client/{principal.name}", 0.0) > now:
            raise PermissionDenied(f"permission denied: user {principal.name} was removed")
        existing = fsm.clients.get(principal.name)
        if existing is not None and existing.role != principal.role:
            raise Conflict(f"user {principal.name} now has role {existing.role}; ask an admin for a new config")
        ca = self.signing_ca()
        certificate, not_after = await issue_client_certificate(
            ca, self.replicated, self.cluster.cluster_id, principal.name, principal.role, req.csr_pem, req.ttl_s
        )
        return ClientRenewed(certificate.public_bytes(serialization.Encoding.PEM), fsm.trust_bundle(), not_after)
