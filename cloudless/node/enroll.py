"""Joining a cluster with a bootstrap token (kubeadm style).

The joiner has no certificate yet, so it opens an *enrollment* TLS
connection (see `TlsCarrier.connect_enrollment`): the server authenticates
with its node certificate, the client presents none, and the server serves
only the two methods below on such a connection.

1. `enroll.hello` → the cluster CA. The joiner checks it against the
   fingerprint in its token and checks that the server's certificate was
   issued by that CA, *before* sending anything secret.
2. `enroll.join` → token id + secret + CSR. The leader checks the token,
   spends one use through Raft, signs the CSR with the identity it decides
   (never what the CSR asks for), registers the node through Raft, and
   returns the certificate plus what the node needs to start: the gossip
   keyring, seed members and the revocation list.

A follower that receives `enroll.join` forwards it to the leader over its
own authenticated node connection.
"""

from __future__ import annotations

import hmac
import logging
from datetime import UTC, datetime
from typing import Annotated, cast

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudless.pki.bundle import bundle_pem, is_endorsed, issuer_of, load_bundle
from cloudless.pki.ca import ClusterCA, load_csr
from cloudless.pki.credentials import Credentials, make_csr, new_private_key, private_key_pem
from cloudless.pki.errors import InvalidCredentials, PeerRejected, TokenRejected
from cloudless.pki.identity import Identity, IdentityKind
from cloudless.pki.revocation import RevocationList
from cloudless.pki.tokens import hash_secret, parse_token, pin_matches
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import Carrier
from cloudless.transport.rpc import RpcClient
from cloudless.transport.tls import connect_enrollment

log = logging.getLogger(__name__)

NodeName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]


class EnrollHello(msgspec.Struct, frozen=True):
    pass


class EnrollHelloReply(msgspec.Struct, frozen=True):
    cluster_id: str
    ca_pem: bytes  # the trust bundle: two CAs during a rotation
    endorsement: bytes = b""  # of the newer CA by the older (pki.bundle.endorse)


class EnrollRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    token_id: Annotated[str, msgspec.Meta(pattern=r"^[a-z2-7]{8}$")]
    secret: Annotated[str, msgspec.Meta(max_length=64)]
    role: Annotated[str, msgspec.Meta(pattern=r"^(node|admin|operator|viewer)$")]
    name: NodeName
    csr_pem: Annotated[bytes, msgspec.Meta(max_length=8192)]
    address: Annotated[str, msgspec.Meta(max_length=300)] = ""
    region: Annotated[str, msgspec.Meta(max_length=63)] = ""
    zone: Annotated[str, msgspec.Meta(max_length=63)] = ""
    labels: Annotated[
        dict[Annotated[str, msgspec.Meta(max_length=63)], Annotated[str, msgspec.Meta(max_length=253)]],
        msgspec.Meta(max_length=64),
    ] = {}


class EnrollReply(msgspec.Struct, frozen=True):
    cluster_id: str
    ca_pem: bytes
    cert_pem: bytes
    gossip_keys: list[bytes]
    seeds: list[str]  # advertise addresses of known nodes
    revocations: bytes  # RevocationList.to_bytes()
    # The CA key-encryption key, only for nodes enrolled as coordinators (pki.custody).
    ca_kek: bytes = b""


def check_token(tokens: dict, request: EnrollRequest, now: float) -> None:
    """Raise TokenRejected unless the stored token admits this request.

    The secret is checked first so a caller without it learns nothing about
    the token's state.
    """
    state = tokens.get(request.token_id)
    if state is None:
        raise TokenRejected("unknown", "unknown or expired bootstrap token")
    if not hmac.compare_digest(hash_secret(request.secret).hex(), state.secret_hash):
        raise TokenRejected("forged", "bootstrap token secret does not match")
    if now >= state.expires_at:
        raise TokenRejected("expired", "bootstrap token expired")
    if state.uses >= state.max_uses:
        raise TokenRejected("used_up", f"bootstrap token was used {state.uses} of {state.max_uses} times")
    if state.role != request.role:
        raise TokenRejected("wrong_role", f"bootstrap token grants {state.role}, not {request.role}")


def sign_enrollee(ca: ClusterCA, request: EnrollRequest, now: float) -> x509.Certificate:
    csr = load_csr(request.csr_pem)
    kind: IdentityKind = "node" if request.role == "node" else "client"
    identity = Identity(ca.cluster_id, kind, request.name)
    return ca.issue(csr, identity, datetime.fromtimestamp(now, UTC), role=None if kind == "node" else request.role)


# -- the joiner's side --------------------------------------------------------


def verify_hello(reply: EnrollHelloReply, fingerprint: str, server_leaf_der: bytes | None) -> list[x509.Certificate]:
    """Pin the CA from the token, then check the server is a node of that CA; the CAs to trust.

    During a CA rotation the reply is a bundle of two CAs; the pinned one must
    be among them and must have issued the server's certificate. The other
    is trusted only with the pinned CA's endorsement (the next CA while the
    pinned one is active); a previous CA is not, since its nodes re-issue at
    once. (A token from before a rotation's activation stops working once
    its server re-issued: make a new token.)
    """
    try:
        bundle = load_bundle(reply.ca_pem)
    except InvalidCredentials as exc:
        raise PeerRejected("malformed", f"the cluster CA bundle: {exc.message}") from None
    pinned = [ca for ca in bundle if pin_matches(ca, fingerprint)]
    if not pinned:
        raise PeerRejected("unknown_ca", "the cluster CA does not match the fingerprint in the token")
    ca_certificate = pinned[0]
    if server_leaf_der is None:
        raise PeerRejected("no_certificate", "the server presented no certificate")
    identity = PeerVerifier(ca_certificate, RevocationList(), reply.cluster_id).verify_der([server_leaf_der])
    if identity.kind != "node":
        raise PeerRejected("bad_identity", f"the server is not a node ({identity.uri})")
    endorsed = [
        ca
        for ca in bundle
        if ca is not ca_certificate and is_endorsed(ca_certificate, reply.cluster_id, ca, reply.endorsement)
    ]
    return [ca_certificate, *endorsed]


async def enroll(
    address: tuple[str, int],
    token_text: str,
    *,
    name: str,
    role: str = "node",
    advertise: str = "",
    region: str = "",
    zone: str = "",
    labels: dict[str, str] | None = None,
    timeout: float = 15.0,
) -> tuple[Credentials, EnrollReply]:
    """Run the join protocol against `address`; returns the new credentials."""
    token = parse_token(token_text)
    connection, server_leaf = await connect_enrollment(address, timeout=timeout)
    # Calls name the connection itself, so the stand-in never connects or serves.
    rpc = RpcClient(cast(Carrier, _SingleConnection(connection)))
    try:
        hello = await rpc.call(connection, "enroll.hello", EnrollHello(), response=EnrollHelloReply, timeout=timeout)
        trusted = verify_hello(hello, token.ca_fingerprint, server_leaf)
        key = new_private_key()
        kind: IdentityKind = "node" if role == "node" else "client"
        csr = make_csr(key, Identity(hello.cluster_id, kind, name))
        request = EnrollRequest(
            token_id=token.id,
            secret=token.secret,
            role=role,
            name=name,
            csr_pem=csr.public_bytes(serialization.Encoding.PEM),
            address=advertise,
            region=region,
            zone=zone,
            labels=labels or {},
        )
        reply = await rpc.call(connection, "enroll.join", request, response=EnrollReply, timeout=timeout)
    finally:
        await connection.aclose()
    if reply.ca_pem != hello.ca_pem:
        raise PeerRejected("unknown_ca", "the CA changed during enrollment")
    # Active CA first, as everywhere: the one that signed our certificate.
    issuer = issuer_of(x509.load_pem_x509_certificate(reply.cert_pem), trusted)
    if issuer is None:
        raise PeerRejected("unknown_ca", "the certificate we were issued is not from the pinned CA")
    credentials = Credentials(
        bundle_pem([issuer, *(ca for ca in trusted if ca is not issuer)]), reply.cert_pem, private_key_pem(key)
    )
    return credentials, reply


class _SingleConnection:
    """A stand-in carrier for RpcClient calls that pass the connection itself."""

    def __init__(self, connection) -> None:
        self._connection = connection

    async def connect(self, address):  # pragma: no cover - calls pass the connection
        return self._connection
