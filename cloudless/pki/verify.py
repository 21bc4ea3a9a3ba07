"""Verification of a peer's certificate chain after the TLS handshake.

Transports run the handshake with the cluster's trust bundle as the only trust
anchors (one CA; two during a rotation, see `pki.bundle`) and then call
`PeerVerifier.verify` on what the peer presented. Nothing is cached:
revocation can change between two handshakes, and the checks cost one ECDSA
verification: ~0.2 ms per call on this machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from cloudless.pki.bundle import authority_key_id, issuer_of
from cloudless.pki.clock import as_utc, utc_now
from cloudless.pki.credentials import identity_of, role_of
from cloudless.pki.errors import X509_PARSE_ERRORS, InvalidIdentity, PeerRejected
from cloudless.pki.identity import PeerIdentity
from cloudless.pki.revocation import RevocationList


class PeerVerifier:
    def __init__(
        self,
        ca_certificate: x509.Certificate | Sequence[x509.Certificate],
        revocations: RevocationList,
        cluster_id: str,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.trust(ca_certificate)
        # A live reference: whoever updates the list updates every later verdict.
        self.revocations = revocations
        self.cluster_id = cluster_id
        self.clock = clock

    def trust(self, cas: x509.Certificate | Sequence[x509.Certificate]) -> None:
        """Accept leaves from `cas` (the trust bundle, active CA first) from the next verdict on."""
        bundle = [cas] if isinstance(cas, x509.Certificate) else list(cas)
        if not bundle:
            raise ValueError("a PeerVerifier needs at least one CA")
        self.ca_certificates = bundle
        self.ca_certificate = bundle[0]  # the active CA

    def verify(self, chain: Sequence[x509.Certificate]) -> PeerIdentity:
        """The identity the leaf (`chain[0]`) proves; raises PeerRejected with the failed check."""
        if not chain:
            raise PeerRejected("no_certificate", "peer presented no certificate")
        try:
            return self._verify_leaf(chain[0])
        except X509_PARSE_ERRORS as exc:
            # cryptography parses fields lazily; a malformed one surfaces on first access.
            raise PeerRejected("malformed", f"peer certificate does not parse: {exc}") from exc

    def _verify_leaf(self, leaf: x509.Certificate) -> PeerIdentity:
        ca = self._check_issuer(leaf)
        self._check_validity(leaf, ca)
        if self.revocations.is_revoked(leaf.serial_number):
            raise PeerRejected(
                "revoked", f"peer certificate {leaf.serial_number:x} is revoked", serial=leaf.serial_number
            )
        try:
            constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        except X509_PARSE_ERRORS as exc:
            raise PeerRejected("malformed", f"peer certificate extensions do not parse: {exc}") from exc
        if constraints is not None and constraints.ca:
            raise PeerRejected("bad_identity", "peer presented a CA certificate as its own")
        try:
            identity = identity_of(leaf)
        except InvalidIdentity as exc:
            raise PeerRejected(
                "bad_identity", f"peer certificate carries no Cloudless identity: {exc.message}"
            ) from exc
        if identity.cluster_id != self.cluster_id:
            raise PeerRejected(
                "wrong_cluster",
                f"peer {identity.uri} belongs to cluster {identity.cluster_id}, not {self.cluster_id}",
            )
        role = role_of(leaf) if identity.kind == "client" else ""
        return PeerIdentity(identity.cluster_id, identity.kind, identity.name, leaf.serial_number, role)

    def verify_der(self, chain_der: Sequence[bytes]) -> PeerIdentity:
        chain = []
        for der in chain_der:
            try:
                chain.append(x509.load_der_x509_certificate(bytes(der)))
            except X509_PARSE_ERRORS as exc:
                raise PeerRejected("malformed", f"peer certificate does not parse: {exc}") from exc
        return self.verify(chain)

    def _check_issuer(self, leaf: x509.Certificate) -> x509.Certificate:
        """The bundle's CA that signed `leaf`, chosen by name and authority key id."""
        try:
            ca = issuer_of(leaf, self.ca_certificates)
        except X509_PARSE_ERRORS as exc:
            raise PeerRejected("malformed", f"peer certificate extensions do not parse: {exc}") from exc
        if ca is None:
            if any(leaf.issuer == c.subject for c in self.ca_certificates):
                # Another CA under the same name (a retired CA, a cluster re-created with the same id).
                key_id = authority_key_id(leaf)
                raise PeerRejected(
                    "unknown_ca",
                    "peer certificate signed by a key no trusted cluster CA holds"
                    + (f" (key id {key_id.hex()})" if key_id else ""),
                )
            raise PeerRejected("unknown_ca", f"peer certificate issued by {leaf.issuer.rfc4514_string()!r}")
        try:
            leaf.verify_directly_issued_by(ca)
        except InvalidSignature as exc:
            raise PeerRejected(
                "bad_signature", "peer certificate signature does not verify against the cluster CA"
            ) from exc
        except X509_PARSE_ERRORS as exc:
            raise PeerRejected(
                "bad_signature", f"peer certificate cannot be checked against the cluster CA: {exc}"
            ) from exc
        return ca

    def _check_validity(self, leaf: x509.Certificate, ca: x509.Certificate) -> None:
        now = as_utc(self.clock(), "clock()")
        if now < leaf.not_valid_before_utc:
            raise PeerRejected(
                "not_yet_valid", f"peer certificate valid only from {leaf.not_valid_before_utc.isoformat()}"
            )
        if now > leaf.not_valid_after_utc:
            raise PeerRejected("expired", f"peer certificate expired at {leaf.not_valid_after_utc.isoformat()}")
        if now > ca.not_valid_after_utc:
            raise PeerRejected("expired", "the cluster CA certificate has expired")
