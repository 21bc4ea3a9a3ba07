"""The trust bundle: the CA certificates a node or client accepts leaves from.

Normally one CA. During a rotation (`cloudless ca rotate`) two: the active
CA (the one that signs) first, then the other (the next CA before it
signs, the previous one until it is retired). Both CAs share their name
(the CA has pathlen 0, so there is no cross-signed intermediate); a leaf's
issuer is chosen by its authority key id. The bundle is stored as the PEM
certificates concatenated, wherever a single `ca.pem` used to be.

A node or client that learns a bundle from a peer (a client from any node,
a node outside Raft from the leader) accepts a CA it does not already trust
only with an *endorsement*: the active CA's signature over the new CA
certificate, made by the leader when it began the rotation. A single rooted
node can thus not slip its own CA into anyone's trust.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

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


# -- endorsement: how a holder of the current bundle learns to trust a new CA --------

_ENDORSE_CONTEXT = b"cloudless-ca-endorsement-v1\x00"


def _endorsed_bytes(cluster_id: str, new_ca: x509.Certificate) -> bytes:
    return _ENDORSE_CONTEXT + cluster_id.encode() + b"\x00" + new_ca.public_bytes(serialization.Encoding.DER)


def endorse(ca_key: ec.EllipticCurvePrivateKey, cluster_id: str, new_ca: x509.Certificate) -> bytes:
    """The active CA's signature over the next CA: only a CA key holder can make one."""
    return ca_key.sign(_endorsed_bytes(cluster_id, new_ca), ec.ECDSA(hashes.SHA256()))


def is_endorsed(by: x509.Certificate, cluster_id: str, new_ca: x509.Certificate, endorsement: bytes) -> bool:
    key = by.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not endorsement or len(endorsement) > 160:
        return False
    try:
        key.verify(endorsement, _endorsed_bytes(cluster_id, new_ca), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def accept_offered_bundle(current_pem: bytes, offered_pem: bytes, cluster_id: str, endorsement: bytes) -> bytes:
    """The bundle to trust after a peer offered `offered_pem`: InvalidCredentials unless every CA
    in it is already trusted or endorsed by one that is (so no single node can add a CA)."""
    current = load_bundle(current_pem)
    offered = load_bundle(offered_pem)
    known = {subject_key_id(ca) for ca in current}
    for ca in offered:
        if subject_key_id(ca) in known:
            continue
        if not any(is_endorsed(old, cluster_id, ca, endorsement) for old in current):
            raise InvalidCredentials(
                f"the offered CA {subject_key_id(ca).hex()} is not endorsed by a CA this config trusts"
            )
    return bundle_pem(offered)
