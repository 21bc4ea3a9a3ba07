"""Who may use the cluster: users (client certificates with a role) and bootstrap tokens.

`users add NAME --role R` has the leader sign a CSR made on the admin's
machine (the key never travels) with the role in the certificate, and
records it so `users rm` can revoke it. `token ls/rm` list and withdraw
bootstrap tokens (only their hashes are stored). All admin-only (authz).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudless.api.routing import LeaderRouting
from cloudless.api.service import raise_rejected
from cloudless.errors import Conflict, InvalidInput
from cloudless.observability.events import EventLog
from cloudless.pki.bundle import subject_key_id
from cloudless.pki.ca import ClusterCA, load_csr
from cloudless.pki.errors import PKIError
from cloudless.pki.identity import Identity
from cloudless.ports import ClusterView, Proposer
from cloudless.state.commands import DeleteToken, RecordClientCertificate, RemoveClient
from cloudless.transport.rpc import RpcClient, RpcContext, RpcServer

Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
MAX_USER_CERT_DAYS = 366


class UserAdd(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    role: Annotated[str, msgspec.Meta(pattern=r"^(admin|operator|viewer)$")]
    csr_pem: Annotated[bytes, msgspec.Meta(max_length=8192)]
    ttl_s: Annotated[float, msgspec.Meta(ge=60, le=MAX_USER_CERT_DAYS * 86400)] = 30 * 86400


class UserCertificate(msgspec.Struct, frozen=True):
    name: str
    role: str
    cert_pem: bytes
    ca_pem: bytes
    not_after: float


class UserRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name


class UserInfo(msgspec.Struct, frozen=True):
    name: str
    role: str
    certificates: int  # valid ones
    expires_at: float  # the last one's expiry (0: none valid)


class UserList(msgspec.Struct, frozen=True):
    items: list[UserInfo]


class TokenRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9]{6,32}$")]


class TokenInfo(msgspec.Struct, frozen=True):
    id: str
    role: str
    expires_at: float
    uses: int
    max_uses: int


class TokenList(msgspec.Struct, frozen=True):
    items: list[TokenInfo]


async def issue_client_certificate(
    ca: ClusterCA, proposer: Proposer, cluster_id: str, name: str, role: str, csr_pem: bytes, ttl_s: float
) -> tuple[x509.Certificate, float]:
    """Sign a client's CSR as `name` with `role` and record it in Raft (so `users rm` can revoke it)."""
    try:
        certificate = ca.issue(
            load_csr(csr_pem),
            Identity(cluster_id, "client", name),
            datetime.fromtimestamp(time.time(), UTC),
            timedelta(seconds=ttl_s),
            role=role,
        )
    except PKIError as exc:
        raise InvalidInput(f"cannot sign the request: {exc.message}", field="csr_pem") from None
    not_after = certificate.not_valid_after_utc.timestamp()
    result, _ = await proposer.propose(
        RecordClientCertificate(
            name, role, format(certificate.serial_number, "x"), not_after, issuer=subject_key_id(ca.certificate).hex()
        )
    )
    raise_rejected(result)
    return certificate, not_after


class IdentityApi:
    def __init__(
        self,
        cluster: ClusterView,
        replicated: Proposer,
        rpc: RpcClient,
        events: EventLog,
        signing_ca: Callable[[], ClusterCA],
    ) -> None:
        self.cluster = cluster
        self.replicated = replicated
        self.rpc = rpc
        self.events = events
        self.signing_ca = signing_ca  # the CA with its key; refuses on a node not trusted to coordinate

    def register(self, server: RpcServer) -> None:
        routing = LeaderRouting(self.cluster, self.replicated, self.rpc)
        routing.register_on_leader(server, "users.add", self.users_add, UserAdd)
        routing.register_on_leader(server, "users.list", self.users_list, None)
        routing.register_on_leader(server, "users.rm", self.users_rm, UserRef)
        routing.register_on_leader(server, "token.list", self.token_list, None)
        routing.register_on_leader(server, "token.rm", self.token_rm, TokenRef)

    async def users_add(self, ctx: RpcContext, req: UserAdd) -> UserCertificate:
        fsm = self.replicated.fsm
        now = time.time()
        if fsm.retired.get(f"client/{req.name}", 0.0) > now:
            raise Conflict(f"user {req.name} was removed; the name is reusable after its certificates expire")
        existing = fsm.clients.get(req.name)
        if existing is not None and existing.role != req.role:
            raise Conflict(f"user {req.name} exists with role {existing.role}; `users rm` it first")
        ca = self.signing_ca()
        certificate, not_after = await issue_client_certificate(
            ca, self.replicated, self.cluster.cluster_id, req.name, req.role, req.csr_pem, req.ttl_s
        )
        self.events.record("user.added", req.name, f"{req.role} certificate issued", by=str(ctx.principal))
        return UserCertificate(
            req.name, req.role, certificate.public_bytes(serialization.Encoding.PEM), fsm.trust_bundle(), not_after
        )

    async def users_list(self, ctx: RpcContext, req: bytes) -> UserList:
        now = time.time()
        items = []
        for name, client in sorted(self.replicated.fsm.clients.items()):
            valid = [na for na in client.certificates.values() if na > now]
            items.append(UserInfo(name, client.role, len(valid), max(valid, default=0.0)))
        return UserList(items)

    async def users_rm(self, ctx: RpcContext, req: UserRef) -> UserList:
        result, _ = await self.replicated.propose(RemoveClient(req.name))
        raise_rejected(result)
        self.events.record("user.removed", req.name, "certificates revoked", by=str(ctx.principal))
        return await self.users_list(ctx, b"")

    async def token_list(self, ctx: RpcContext, req: bytes) -> TokenList:
        now = time.time()
        return TokenList(
            [
                TokenInfo(token_id, t.role, t.expires_at, t.uses, t.max_uses)
                for token_id, t in sorted(self.replicated.fsm.tokens.items())
                if t.expires_at > now
            ]
        )

    async def token_rm(self, ctx: RpcContext, req: TokenRef) -> TokenList:
        result, _ = await self.replicated.propose(DeleteToken(req.id))
        raise_rejected(result)
        self.events.record("token.removed", req.id, "withdrawn", by=str(ctx.principal))
        return await self.token_list(ctx, b"")
