"""A node's or client's own key, certificate and the cluster CAs it trusts.

`ca_pem` is the trust bundle (`pki.bundle`): one CA, or two during a CA
rotation, the active one first.

On disk, credentials live in a directory as `ca.pem`, `cert.pem` and `key.pem`
(mode 0600). Those three names are symlinks into `current/`, which is itself a
symlink to a generation directory; `save` writes and fsyncs a new generation,
then swaps `current` with one rename. A crash therefore leaves either the old
set or the new set, never a new certificate beside an old key.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloudless.durable import fsync_directory, write_new
from cloudless.pki.bundle import issuer_of, load_bundle, subject_key_id
from cloudless.pki.ca import CURVE, ClusterCA
from cloudless.pki.clock import as_utc
from cloudless.pki.errors import X509_PARSE_ERRORS, InvalidCredentials, InvalidIdentity
from cloudless.pki.identity import CLIENT_ROLES, ROLE_ATTRIBUTE_OID, Identity

log = logging.getLogger(__name__)

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
_CURRENT = "current"
_GENERATION_PREFIX = "gen-"
RENEW_AT_FRACTION = 2 / 3


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_csr(key: ec.EllipticCurvePrivateKey, identity: Identity) -> x509.CertificateSigningRequest:
    """A CSR asking for `identity`; the CA decides the identity, this only proves key possession."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, identity.name)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )


def role_of(certificate: x509.Certificate) -> str:
    """A client certificate's role ("" if it has none or an unknown one: such a client may do nothing)."""
    values = certificate.subject.get_attributes_for_oid(x509.ObjectIdentifier(ROLE_ATTRIBUTE_OID))
    if len(values) != 1:
        return ""
    value = values[0].value
    return value if isinstance(value, str) and value in CLIENT_ROLES else ""


def identity_of(certificate: x509.Certificate) -> Identity:
    """The Cloudless identity in the certificate's single URI SAN."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise InvalidIdentity("certificate has no subjectAltName") from exc
    except X509_PARSE_ERRORS as exc:  # a malformed extension
        raise InvalidIdentity(f"certificate extensions do not parse: {exc}") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise InvalidIdentity(f"certificate must carry exactly one URI SAN, has {len(uris)}")
    return Identity.parse(uris[0])


@dataclass(frozen=True)
class Credentials:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # never in logs

    def __post_init__(self) -> None:
        # Parse everything now so a bad set fails at load, not at the first handshake.
        certificate = self.certificate
        try:
            matches = self.private_key.public_key() == certificate.public_key()
        except X509_PARSE_ERRORS as exc:
            raise InvalidCredentials(f"certificate public key does not parse: {exc}") from exc
        if not matches:
            raise InvalidCredentials("private key does not match the certificate")
        self.identity  # noqa: B018 - validates the SAN
        try:
            certificate.verify_directly_issued_by(self.ca_certificate)
        except (InvalidSignature, *X509_PARSE_ERRORS) as exc:
            raise InvalidCredentials("certificate was not issued by the CA stored beside it") from exc

    @functools.cached_property
    def ca_certificates(self) -> list[x509.Certificate]:
        """The trust bundle, active CA first."""
        return load_bundle(self.ca_pem)

    @functools.cached_property
    def certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert_pem)
        except X509_PARSE_ERRORS as exc:
            raise InvalidCredentials(f"certificate PEM does not parse: {exc}") from exc

    @functools.cached_property
    def ca_certificate(self) -> x509.Certificate:
        """The bundle's CA that issued this certificate."""
        try:
            ca = issuer_of(self.certificate, self.ca_certificates)
        except X509_PARSE_ERRORS as exc:
            raise InvalidCredentials(f"certificate extensions do not parse: {exc}") from exc
        if ca is None:
            raise InvalidCredentials("certificate was not issued by the CA stored beside it")
        return ca

    @property
    def issued_by_active_ca(self) -> bool:
        """False during a CA rotation until this certificate is re-issued by the new CA."""
        return subject_key_id(self.ca_certificate) == subject_key_id(self.ca_certificates[0])

    def with_bundle(self, ca_pem: bytes) -> Credentials:
        """The same certificate and key, trusting the bundle `ca_pem` (which must include its issuer)."""
        return Credentials(ca_pem, self.cert_pem, self.key_pem)

    @functools.cached_property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except X509_PARSE_ERRORS as exc:
            raise InvalidCredentials(f"private key PEM does not parse: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, CURVE):
            raise InvalidCredentials("private key is not EC P-256")
        return key

    @functools.cached_property
    def identity(self) -> Identity:
        try:
            return identity_of(self.certificate)
        except InvalidIdentity as exc:
            raise InvalidCredentials(f"certificate carries no Cloudless identity: {exc.message}") from exc

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def renew_at(self) -> datetime:
        """Two-thirds into the certificate's lifetime: from then on, renew."""
        return self.not_before + (self.not_after - self.not_before) * RENEW_AT_FRACTION

    def needs_renewal(self, now: datetime) -> bool:
        return as_utc(now) >= self.renew_at

    def with_certificate(self, cert_pem: bytes) -> Credentials:
        """The same key and CA with a renewed certificate (renewal may reuse the key)."""
        return Credentials(self.ca_pem, cert_pem, self.key_pem)

    def save(self, directory: Path) -> None:
        """Write the set atomically and durably (see module docstring)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        generation = directory / f"{_GENERATION_PREFIX}{secrets.token_hex(8)}"
        generation.mkdir(mode=0o700)
        write_new(generation / CA_FILE, self.ca_pem, 0o644)
        write_new(generation / CERT_FILE, self.cert_pem, 0o644)
        write_new(generation / KEY_FILE, self.key_pem, 0o600)
        fsync_directory(generation)
        for name in (CA_FILE, CERT_FILE, KEY_FILE):
            link = directory / name
            if not link.is_symlink():
                if link.exists():
                    link.unlink()
                link.symlink_to(Path(_CURRENT) / name)
        pending = directory / f".{_CURRENT}.{secrets.token_hex(4)}"
        pending.symlink_to(generation.name)
        os.replace(pending, directory / _CURRENT)
        fsync_directory(directory)
        for stale in directory.glob(f"{_GENERATION_PREFIX}*"):
            if stale.name != generation.name:
                shutil.rmtree(stale, ignore_errors=True)
        log.info(
            "pki.credentials_saved",
            extra={"fields": {"identity": self.identity.uri, "serial": f"{self.serial:x}", "dir": str(directory)}},
        )

    @classmethod
    def load(cls, directory: Path) -> Credentials:
        directory = Path(directory)
        try:
            return cls(
                (directory / CA_FILE).read_bytes(),
                (directory / CERT_FILE).read_bytes(),
                (directory / KEY_FILE).read_bytes(),
            )
        except FileNotFoundError as exc:
            raise InvalidCredentials(f"no credentials in {directory}: {exc.filename} missing") from exc

    @staticmethod
    def exist(directory: Path) -> bool:
        directory = Path(directory)
        return all((directory / name).exists() for name in (CA_FILE, CERT_FILE, KEY_FILE))


def issue_credentials(
    ca: ClusterCA, identity: Identity, now: datetime, lifetime: timedelta | None = None, role: str | None = None
) -> Credentials:
    """Generate a key, a CSR and have `ca` sign it: for bootstrap and tests, where CA and holder are one process."""
    key = new_private_key()
    certificate = ca.issue(make_csr(key, identity), identity, now, lifetime, role=role)
    return Credentials(ca.certificate_pem, certificate.public_bytes(serialization.Encoding.PEM), private_key_pem(key))
