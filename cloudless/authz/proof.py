"""Caller proofs: a client's signature that travels with a forwarded call.

A follower that receives a client's call forwards it to the leader as
`fwd.<method>` over its own node connection, so the leader's peer is the
node, not the client. Trusting the node would make any stolen device an
admin. Instead every client signs each call it makes (method, a hash of the
request body, time, a random nonce) with its certificate's key; the
follower passes that proof on untouched, and the leader checks it: the
certificate against the cluster CA and the revocation list, the signature,
that it covers this very method and body, that it is fresh, and that its
nonce was not seen before (so a node cannot replay a client's call). The
leader then authorizes the client, not the node.

Cost: one ECDSA P-256 signature per call on the client (~0.1 ms), one
verification per forwarded call on the leader.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Protocol

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloudless.authz.roles import Principal, principal_of
from cloudless.authz.table import PermissionDenied

PROOF_CONTEXT = b"cloudless-caller-proof-v1\x00"
MAX_SKEW_S = 120.0  # how old (or how far ahead) a proof may be
MAX_PROOF_BYTES = 4096
MAX_REMEMBERED_NONCES = 200_000  # ~10 MB; at 1,600 calls/s that is the whole window
MAX_CACHED_CERTIFICATES = 4096  # distinct callers whose checked certificates we keep


class CallerProof(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    certificate: Annotated[bytes, msgspec.Meta(max_length=3072)]  # the caller's leaf, DER
    method: Annotated[str, msgspec.Meta(max_length=128)]
    body_sha256: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    signed_at: float  # unix seconds
    nonce: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    signature: Annotated[bytes, msgspec.Meta(max_length=160)]


_decoder = msgspec.msgpack.Decoder(CallerProof)
_encoder = msgspec.msgpack.Encoder()


def _signed_bytes(method: str, body_sha256: bytes, signed_at: float, nonce: bytes) -> bytes:
    return PROOF_CONTEXT + _encoder.encode([method, body_sha256, signed_at, nonce])


class ProofSigner:
    """The client side: signs each call with the client certificate's key."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, clock: Callable[[], float] = time.time) -> None:
        self._cert_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("caller proofs need an EC private key")
        self._key = key
        self._clock = clock

    def __call__(self, method: str, body: bytes) -> bytes:
        digest = hashlib.sha256(body).digest()
        signed_at = float(self._clock())
        nonce = os.urandom(16)
        signature = self._key.sign(_signed_bytes(method, digest, signed_at, nonce), ec.ECDSA(hashes.SHA256()))
        return _encoder.encode(CallerProof(self._cert_der, method, digest, signed_at, nonce, signature))


class ChainVerifier(Protocol):
    def verify(self, chain: list[x509.Certificate]) -> object: ...


class ProofVerifier:
    """The leader side: who, if anyone, a forwarded call's proof proves."""

    def __init__(self, verifier: ChainVerifier, clock: Callable[[], float] = time.time) -> None:
        self._verifier = verifier  # pki.verify.PeerVerifier: CA, validity, revocation, cluster
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._certificates: OrderedDict[bytes, tuple[Any, ec.EllipticCurvePublicKey, float, object]] = OrderedDict()

    def verify(self, proof: bytes, method: str, body: bytes) -> Principal:
        """The client `proof` proves made this call; raises PermissionDenied otherwise."""
        if not proof:
            raise PermissionDenied(f"permission denied: forwarded call {method[:128]!r} carries no caller proof")
        if len(proof) > MAX_PROOF_BYTES:
            raise PermissionDenied("permission denied: caller proof too large")
        try:
            parsed = _decoder.decode(proof)
        except msgspec.DecodeError as exc:
            raise PermissionDenied(f"permission denied: malformed caller proof: {exc}") from None
        if parsed.method != method:
            raise PermissionDenied(f"permission denied: caller proof is for {parsed.method!r}, not {method[:128]!r}")
        if not hmac.compare_digest(parsed.body_sha256, hashlib.sha256(body).digest()):
            raise PermissionDenied("permission denied: caller proof does not cover this request")
        now = self._clock()
        if not abs(now - parsed.signed_at) <= MAX_SKEW_S:
            raise PermissionDenied("permission denied: caller proof is stale (check the client's clock)")
        peer, public_key = self._certificate(parsed.certificate, now)
        try:
            public_key.verify(
                parsed.signature,
                _signed_bytes(parsed.method, parsed.body_sha256, parsed.signed_at, parsed.nonce),
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature:
            raise PermissionDenied("permission denied: caller proof signature does not verify") from None
        self._remember(parsed.nonce, now)
        principal = principal_of(peer)  # type: ignore[arg-type]
        if principal.kind != "client":
            raise PermissionDenied(f"permission denied: caller proofs are for clients, not {principal.uri}")
        return principal

    def _certificate(self, der: bytes, now: float) -> tuple[Any, ec.EllipticCurvePublicKey]:
        """The identity and key of a caller certificate, checked against the CA once and cached.

        A client sends the same certificate with every call; parsing it and
        checking the CA's signature each time was half the leader's crypto
        per forwarded write. What can change between calls is checked every
        time: revocation, expiry, and the trust bundle (a CA rotation).
        """
        cas = getattr(self._verifier, "ca_certificates", None)
        cached = self._certificates.get(der)
        if cached is not None:
            peer, public_key, not_after, trusted = cached
            revocations = getattr(self._verifier, "revocations", None)
            if trusted is cas and now < not_after and not (revocations and revocations.is_revoked(peer.serial)):
                self._certificates.move_to_end(der)
                return peer, public_key
            del self._certificates[der]
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise PermissionDenied(f"permission denied: caller proof certificate does not parse: {exc}") from None
        try:
            peer = self._verifier.verify([certificate])
        except Exception as exc:  # PeerRejected and parse errors alike: the proof proves nobody
            raise PermissionDenied(f"permission denied: caller certificate refused: {exc}") from None
        public_key = certificate.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise PermissionDenied("permission denied: caller certificate has no EC key")
        self._certificates[der] = (peer, public_key, certificate.not_valid_after_utc.timestamp(), cas)
        while len(self._certificates) > MAX_CACHED_CERTIFICATES:
            self._certificates.popitem(last=False)
        return peer, public_key

    def _remember(self, nonce: bytes, now: float) -> None:
        horizon = now - 2 * MAX_SKEW_S
        while self._seen and next(iter(self._seen.values())) < horizon:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            raise PermissionDenied("permission denied: caller proof replayed")
        if len(self._seen) >= MAX_REMEMBERED_NONCES:
            # Forgetting a live nonce would let it be replayed; refuse instead.
            raise PermissionDenied("permission denied: too many forwarded calls in the replay window; retry")
        self._seen[nonce] = now
