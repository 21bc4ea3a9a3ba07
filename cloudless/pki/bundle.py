"""The trust bundle: the CA certificates a node or client accepts leaves from.

Normally one CA. During a rotation (`cloudless ca rotate`) two: the active
CA (the one that signs) first, then the other (the next CA before it
signs, the previous one until it is retired). Both CAs share their name
(the CA has pathlen 0, so there is no cross-signed intermediate); a leaf's
issuer is chosen by its authority key id. The bundle is stored as the PEM
certificates concatenated, wherever a single `ca.pem` used to be.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudless.pki.errors import X509_PARSE_ERRORS, InvalidCredentials

# Active + other; a bound so that a bundle from the wire cannot grow a trust store.
MAX_BUNDLE_CAS = 2
MAX_BUNDLE_PEM = 16384


def load_bundle(pem: bytes) -> list[x509.Certificate]:
    """The CA certificates in `pem`, active first; InvalidCredentials if it is not a bundle of CAs."""
    if len(pem) > MAX_BUNDLE_PEM:
        raise InvalidCredentials(f"CA bundle is {len(pem)} bytes, more than {MAX_BUNDLE_PEM}")
    try:
        certificates = x509.load_pem_x509_certificates(bytes(pem))
    except X509_PARSE_ERRORS as exc:
        raise InvalidCredentials(f"CA certificate PEM does not parse: {exc}") from exc
    if not 1 <= len(certificates) <= MAX_BUNDLE_CAS:
        raise InvalidCredentials(f"a CA bundle holds 1 to {MAX_BUNDLE_CAS} certificates, not {len(certificates)}")
    keys = set()
    for certificate in certificates:
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except (x509.ExtensionNotFound, *X509_PARSE_ERRORS) as exc:
            raise InvalidCredentials(f"CA bundle holds a certificate that is not a CA: {exc}") from exc
        if not constraints.ca:
            raise InvalidCredentials("CA bundle holds a certificate that is not a CA")
        keys.add(subject_key_id(certificate))
    if len(keys) != len(certificates):
        raise InvalidCredentials("CA bundle names the same CA twice")
    return certificates


def bundle_pem(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def subject_key_id(ca: x509.Certificate) -> bytes:
    """The CA's key id (its SubjectKeyIdentifier, else computed from its public key)."""
    try:
        return ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest  # type: ignore[arg-type]


def authority_key_id(leaf: x509.Certificate) -> bytes | None:
    """The key id of the CA that signed `leaf` (None: the leaf does not say)."""
    try:
        return leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None


def issuer_of(leaf: x509.Certificate, cas: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The CA in `cas` whose name and key id `leaf` names as its issuer (None: none does).

    Without an authority key id the first CA of that name is taken, as before
    bundles; the signature check that follows decides.
    """
    key_id = authority_key_id(leaf)
    for ca in cas:
        if leaf.issuer != ca.subject:
            continue
        if key_id is None or key_id == subject_key_id(ca):
            return ca
    return None
