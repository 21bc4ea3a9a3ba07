"""The cluster certificate authority.

One self-signed EC P-256 CA per cluster, born with the cluster on the first
node and replicated to coordinators through Raft as PEM. It signs short-lived
leaf certificates for nodes and clients from their CSRs; a leaf's only claim is
its SPIFFE URI SAN. The CA has pathlen 0: it never delegates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloudless.pki.clock import as_utc
from cloudless.pki.errors import X509_PARSE_ERRORS, InvalidCredentials, InvalidCSR, InvalidIdentity
from cloudless.pki.identity import CLIENT_ROLES, ROLE_ATTRIBUTE_OID, Identity, validate_cluster_id

CA_LIFETIME = timedelta(days=3650)
NODE_CERT_LIFETIME = timedelta(hours=24)
CLIENT_CERT_LIFETIME = timedelta(days=7)
DEFAULT_LIFETIME = NODE_CERT_LIFETIME
# Tolerates peers whose clocks run a little behind the issuer's.
BACKDATE = timedelta(minutes=1)
MAX_LIFETIME = timedelta(days=366)
CURVE = ec.SECP256R1


def default_lifetime(identity: Identity) -> timedelta:
    return NODE_CERT_LIFETIME if identity.kind == "node" else CLIENT_CERT_LIFETIME


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """`sha256:<hex>` over the certificate's DER, the form bootstrap tokens carry."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _ca_name(cluster_id: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cloudless"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Cloudless cluster CA {cluster_id}"),
        ]
    )


@dataclass(frozen=True, eq=False)
class ClusterCA:
    cluster_id: str
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def create(cls, cluster_id: str, now: datetime, lifetime: timedelta = CA_LIFETIME) -> ClusterCA:
        validate_cluster_id(cluster_id)
        now = as_utc(now)
        key = ec.generate_private_key(CURVE())
        name = _ca_name(cluster_id)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            # The SPIFFE trust domain; it is not a workload identity, so
            # Identity.parse refuses it if the CA cert is ever presented as a leaf.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{cluster_id}")]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cluster_id, certificate, key)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.certificate)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        identity: Identity,
        now: datetime,
        lifetime: timedelta | None = None,
        role: str | None = None,
    ) -> x509.Certificate:
        """Sign `csr` as `identity`, valid from a minute ago for `lifetime`.

        The CSR's subject and extensions are ignored: the identity is what the
        caller (the join or renew service) has authenticated, not what the CSR
        asks for. `lifetime` defaults to 24 h for nodes, 7 days for clients,
        and is cut to the CA's own expiry. A client certificate carries
        `role` (least privilege when not given: viewer); a node's carries none.
        """
        now = as_utc(now)
        if identity.kind == "client":
            role = "viewer" if role is None else role
            if role not in CLIENT_ROLES:
                raise InvalidIdentity(
                    f"invalid client role {role!r}: want one of {', '.join(CLIENT_ROLES)}", field="role"
                )
        elif role is not None:
            raise InvalidIdentity("node certificates carry no client role", field="role")
        if identity.cluster_id != self.cluster_id:
            raise InvalidIdentity(
                f"identity {identity.uri} is not of cluster {self.cluster_id}", cluster_id=self.cluster_id
            )
        if lifetime is None:
            lifetime = default_lifetime(identity)
        if not timedelta(0) < lifetime <= MAX_LIFETIME:
            raise ValueError(f"certificate lifetime must be in (0, {MAX_LIFETIME}], got {lifetime}")
        public_key = check_csr(csr)
        not_after = min(now + lifetime, self.not_after)
        if not_after <= now:
            raise InvalidCredentials(
                "the cluster CA has expired; rotate it before issuing", ca_not_after=self.not_after
            )
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.cluster_id),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.kind),
                        x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
                        *([x509.NameAttribute(x509.ObjectIdentifier(ROLE_ATTRIBUTE_OID), role)] if role else []),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()), critical=False
            )
            .sign(self.private_key, hashes.SHA256())
        )

    def to_pem(self) -> tuple[bytes, bytes]:
        """(certificate PEM, unencrypted PKCS#8 key PEM); protect the key like the cluster itself."""
        key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self.certificate_pem, key_pem

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> ClusterCA:
        try:
            certificate = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except X509_PARSE_ERRORS as exc:
            raise InvalidCredentials(f"CA PEM does not parse: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, CURVE):
            raise InvalidCredentials("CA key is not an EC P-256 key")
        if key.public_key() != certificate.public_key():
            raise InvalidCredentials("CA key does not match the CA certificate")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (x509.ExtensionNotFound, *X509_PARSE_ERRORS) as exc:
            raise InvalidCredentials(f"not a Cloudless cluster CA certificate: {exc}") from exc
        if not constraints.ca:
            raise InvalidCredentials("CA certificate lacks basicConstraints CA:TRUE")
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1 or not uris[0].startswith("spiffe://"):
            raise InvalidCredentials("CA certificate does not name a SPIFFE trust domain")
        cluster_id = validate_cluster_id(uris[0].removeprefix("spiffe://"))
        return cls(cluster_id, certificate, key)


def check_csr(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    """The CSR's public key, once its self-signature and key type check out."""
    if not isinstance(csr, x509.CertificateSigningRequest):
        raise InvalidCSR(f"expected a CertificateSigningRequest, got {type(csr).__name__}")
    try:
        public_key = csr.public_key()
    except X509_PARSE_ERRORS as exc:
        raise InvalidCSR(f"CSR public key does not parse: {exc}") from exc
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, CURVE):
        raise InvalidCSR("CSR key must be EC P-256", key_type=type(public_key).__name__)
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, *X509_PARSE_ERRORS) as exc:
        raise InvalidCSR(f"CSR signature cannot be checked: {exc}") from exc
    if not valid:
        raise InvalidCSR("CSR signature does not verify: the requester does not hold the key")
    return public_key


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a CSR from PEM or DER bytes received from a joiner."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except X509_PARSE_ERRORS as exc:
        raise InvalidCSR(f"CSR does not parse: {exc}") from exc
