"""The server side of joining and certificate upkeep.

On enrollment connections (no client certificate): `enroll.hello`,
`enroll.join`. On authenticated node connections: `enroll.forward` (a
follower passing a join to the leader), `pki.renew` and `pki.revocations`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated

import msgspec
from cryptography.hazmat.primitives import serialization

from cloudless.api.client_config import parse_endpoint
from cloudless.errors import CloudlessError, Conflict, InvalidInput, NotFound
from cloudless.node.enroll import EnrollHello, EnrollHelloReply, EnrollReply, EnrollRequest, check_token
from cloudless.pki.bundle import authority_key_id
from cloudless.pki.ca import ClusterCA, load_csr
from cloudless.pki.errors import PKIError, TokenRejected
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.ports import ClusterView, EventRecorder, Proposer
from cloudless.raft.core import NotLeader
from cloudless.raft.errors import NoLeader
from cloudless.state.commands import ConsumeToken, RecordCertificate, RecordClientCertificate, RegisterNode, Rejected
from cloudless.transport.rpc import RpcClient, RpcContext, RpcServer

log = logging.getLogger(__name__)


def node_certificate_lifetime() -> timedelta | None:
    """Lifetime of node certificates this leader issues: the PKI default
    (24 h) unless CLOUDLESS_NODE_CERT_LIFETIME_S says otherwise (tests and
    deployments that want faster rotation)."""
    raw = os.environ.get("CLOUDLESS_NODE_CERT_LIFETIME_S")
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise InvalidInput(f"CLOUDLESS_NODE_CERT_LIFETIME_S={raw!r} is not a number of seconds") from None
    if not 10 <= seconds <= 90 * 86400:
        raise InvalidInput("CLOUDLESS_NODE_CERT_LIFETIME_S must be between 10 s and 90 days")
    return timedelta(seconds=seconds)


class RenewRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    csr_pem: Annotated[bytes, msgspec.Meta(max_length=8192)]


class RenewReply(msgspec.Struct, frozen=True):
    cert_pem: bytes
    ca_pem: bytes = b""  # the trust bundle the certificate belongs to (b"": leaders before CA rotation)
    endorsement: bytes = b""  # of the bundle's newer CA by the older (pki.bundle.endorse)


class EnrollService:
    def __init__(
        self,
        cluster: ClusterView,
        replicated: Proposer,
        rpc: RpcClient,
        events: EventRecorder,
        revocations: RevocationList,
        ca_pem: Callable[[], bytes],
        signing_ca: Callable[[], ClusterCA],
        ca_kek: Callable[[], bytes | None],
    ) -> None:
        self.cluster = cluster
        self.replicated = replicated
        self.rpc = rpc
        self.events = events
        self.revocation_list = revocations
        self.ca_pem = ca_pem  # the CA this node trusts, as a joiner must pin it
        self.signing_ca = signing_ca  # the CA with its key (a coordinator-trusted node only)
        self.ca_kek = ca_kek  # the key that opens the CA key, handed to joining coordinators only

    def register(self, enroll_server: RpcServer, node_server: RpcServer) -> None:
        enroll_server.unary("enroll.hello", request=EnrollHello)(self.hello)
        enroll_server.unary("enroll.join", request=EnrollRequest)(self.join)
        node_server.unary("enroll.forward", request=EnrollRequest)(self.forwarded_join)
        node_server.unary("pki.renew", request=RenewRequest)(self.renew)
        node_server.unary("pki.revocations")(self.revocations)

    def _ca(self) -> ClusterCA:
        replicated = self.replicated
        if replicated.fsm.ca is None:
            raise NoLeader("the cluster CA is not in the replicated state yet")
        return self.signing_ca()

    async def hello(self, ctx: RpcContext, req: EnrollHello) -> EnrollHelloReply:
        endorsement = self.replicated.fsm.trust_endorsement()
        return EnrollHelloReply(self.cluster.cluster_id, self.ca_pem(), endorsement)

    async def join(self, ctx: RpcContext, req: EnrollRequest) -> EnrollReply:
        leader = await self.replicated.wait_leader()
        if leader != self.cluster.node_id:
            address = self.cluster.address_of(leader)
            if address is None:
                raise NoLeader(f"leader {leader} has no known address")
            return await self.rpc.call(address, "enroll.forward", req, response=EnrollReply, timeout=10.0)
        return await self._join_on_leader(req)

    async def forwarded_join(self, ctx: RpcContext, req: EnrollRequest) -> EnrollReply:
        if ctx.peer.kind != "node":
            raise CloudlessError("only nodes forward joins")
        replicated = self.replicated
        if not replicated.is_leader:
            raise NotLeader("not the leader", leader=replicated.leader or "")
        return await self._join_on_leader(req)

    async def _join_on_leader(self, req: EnrollRequest) -> EnrollReply:
        cluster = self.cluster
        replicated = self.replicated
        now = time.time()
        await replicated.linearizable()  # the token's use count must be current
        try:
            check_token(replicated.fsm.tokens, req, now)
        except TokenRejected as exc:
            self.events.record("enroll.rejected", req.name, exc.message, reason=exc.reason)
            raise
        if req.role == "node" and req.name in replicated.fsm.nodes:
            raise Conflict(f"a node named {req.name} is already registered; pick another --name")
        kind = "node" if req.role == "node" else "client"
        if replicated.fsm.retired.get(f"{kind}/{req.name}", 0.0) > now:
            # Identity is name + key: a removed name stays unusable while any of its certificates could still work.
            raise Conflict(f"the name {req.name} belonged to a removed {kind}; pick another --name")
        client = replicated.fsm.clients.get(req.name) if kind == "client" else None
        if client is not None and client.role != req.role:
            raise Conflict(f"client {req.name} exists with role {client.role}; pick another name")
        try:
            certificate = self._ca().issue(
                load_csr(req.csr_pem),
                Identity(cluster.cluster_id, "node" if req.role == "node" else "client", req.name),
                datetime.fromtimestamp(now, UTC),
                node_certificate_lifetime() if req.role == "node" else None,
                role=None if req.role == "node" else req.role,
            )
        except PKIError as exc:
            raise InvalidInput(f"cannot sign the request: {exc.message}") from None
        token_state = replicated.fsm.tokens.get(req.token_id)
        trusted = req.role == "node" and token_state is not None and token_state.trust == "coordinator"
        result, _ = await replicated.propose(ConsumeToken(req.token_id, req.role))
        if isinstance(result, Rejected):
            raise TokenRejected("used_up" if "used" in result.message else "expired", result.message)
        if req.role == "node":
            if not req.address:
                raise InvalidInput("a joining node must give its advertised address", field="address")

            parse_endpoint(req.address)
            result, _ = await replicated.propose(
                RegisterNode(
                    node_id=req.name,
                    address=req.address,
                    certificate_serial=format(certificate.serial_number, "x"),
                    certificate_not_after=certificate.not_valid_after_utc.timestamp(),
                    region=req.region,
                    zone=req.zone,
                    labels=dict(req.labels),
                    trusted=trusted,
                    public_key=_public_key_der(certificate),
                    issuer=_issuer(certificate),
                )
            )
            if isinstance(result, Rejected):
                raise CloudlessError(f"could not register {req.name}: {result.message}")
        else:
            result, _ = await replicated.propose(
                RecordClientCertificate(
                    req.name,
                    req.role,
                    format(certificate.serial_number, "x"),
                    certificate.not_valid_after_utc.timestamp(),
                    issuer=_issuer(certificate),
                )
            )
            if isinstance(result, Rejected):
                raise CloudlessError(f"could not record {req.name}: {result.message}")

        self.events.record("enroll.accepted", req.name, f"{req.role} {req.name} joined", address=req.address)
        seeds = [r.address for n, r in replicated.fsm.nodes.items() if n != req.name]
        return EnrollReply(
            cluster_id=cluster.cluster_id,
            ca_pem=replicated.fsm.trust_bundle(),  # two CAs during a rotation
            cert_pem=certificate.public_bytes(serialization.Encoding.PEM),
            # Only nodes gossip: a client identity never holds the keyring.
            gossip_keys=list(replicated.fsm.gossip_keys) if req.role == "node" else [],
            seeds=seeds,
            revocations=self.revocation_list.to_bytes(),
            # Only a coordinator receives the key that opens the CA key (pki.custody).
            ca_kek=(self.ca_kek() or b"") if trusted else b"",
        )

    async def renew(self, ctx: RpcContext, req: RenewRequest) -> RenewReply:
        """A node renews its own certificate: same identity, new key."""
        cluster = self.cluster
        replicated = self.replicated
        if ctx.peer.kind != "node":
            raise CloudlessError("only nodes renew through this call")
        if not replicated.is_leader:
            raise NotLeader("not the leader", leader=replicated.leader or "")
        if ctx.peer.name not in replicated.fsm.nodes:
            raise NotFound(f"node {ctx.peer.name} is not registered")

        now = time.time()
        certificate = self._ca().issue(
            load_csr(req.csr_pem),
            Identity(cluster.cluster_id, "node", ctx.peer.name),
            datetime.fromtimestamp(now, UTC),
            node_certificate_lifetime(),
        )
        result, _ = await replicated.propose(
            RecordCertificate(
                ctx.peer.name,
                format(certificate.serial_number, "x"),
                certificate.not_valid_after_utc.timestamp(),
                public_key=_public_key_der(certificate),
                issuer=_issuer(certificate),
            )
        )
        if isinstance(result, Rejected):
            raise CloudlessError(f"could not record the certificate: {result.message}")
        fsm = replicated.fsm
        return RenewReply(
            certificate.public_bytes(serialization.Encoding.PEM), fsm.trust_bundle(), fsm.trust_endorsement()
        )

    async def revocations(self, ctx: RpcContext, body: bytes) -> bytes:
        return self.revocation_list.to_bytes()


def _issuer(certificate) -> str:
    """The signing CA's key id (hex), which a CA rotation counts re-issued certificates by."""
    key_id = authority_key_id(certificate)
    return key_id.hex() if key_id else ""


def _public_key_der(certificate) -> bytes:
    """What gossip checks this node's signed claims against (gossip/claims.py)."""
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
