from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.pki.ca import (
    BACKDATE,
    CLIENT_CERT_LIFETIME,
    NODE_CERT_LIFETIME,
    ClusterCA,
    certificate_fingerprint,
    load_csr,
)
from cloudless.pki.credentials import make_csr, new_private_key
from cloudless.pki.errors import InvalidCredentials, InvalidCSR, InvalidIdentity
from cloudless.pki.identity import Identity

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca():
    return ClusterCA.create("c1", NOW)


def test_ca_is_self_signed_p256_with_pathlen_zero(ca):
    cert = ca.certificate
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert cert.not_valid_after_utc - NOW >= timedelta(days=3650)


def test_fingerprint_is_sha256_of_der(ca):
    import hashlib

    der = ca.certificate.public_bytes(serialization.Encoding.DER)
    assert ca.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert ca.fingerprint == certificate_fingerprint(ca.certificate)


def test_issue_puts_identity_in_single_uri_san_with_tls_usages(ca):
    key = new_private_key()
    identity = Identity.node("c1", "n1")
    cert = ca.issue(make_csr(key, identity), identity, NOW)
    cert.verify_directly_issued_by(ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://c1/node/n1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_before_utc == NOW - BACKDATE
    assert cert.not_valid_after_utc == NOW + NODE_CERT_LIFETIME


def test_client_certificates_default_to_a_longer_lifetime(ca):
    identity = Identity.client("c1", "alice")
    cert = ca.issue(make_csr(new_private_key(), identity), identity, NOW)
    assert cert.not_valid_after_utc == NOW + CLIENT_CERT_LIFETIME


def test_issue_uses_the_authenticated_identity_not_the_one_the_csr_asks_for(ca):
    csr = make_csr(new_private_key(), Identity.node("c1", "asked-for"))
    cert = ca.issue(csr, Identity.node("c1", "granted"), NOW)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://c1/node/granted"]


def test_serials_are_random_and_distinct(ca):
    identity = Identity.node("c1", "n1")
    serials = {ca.issue(make_csr(new_private_key(), identity), identity, NOW).serial_number for _ in range(5)}
    assert len(serials) == 5
    assert all(s.bit_length() > 64 for s in serials)


def test_lifetime_is_capped_at_ca_expiry():
    short_ca = ClusterCA.create("c1", NOW, lifetime=timedelta(hours=2))
    identity = Identity.node("c1", "n1")
    cert = short_ca.issue(make_csr(new_private_key(), identity), identity, NOW, timedelta(hours=24))
    assert cert.not_valid_after_utc == short_ca.not_after


def test_identity_of_another_cluster_is_refused(ca):
    identity = Identity.node("other", "n1")
    with pytest.raises(InvalidIdentity):
        ca.issue(make_csr(new_private_key(), identity), identity, NOW)


def test_naive_now_is_refused(ca):
    identity = Identity.node("c1", "n1")
    with pytest.raises(ValueError):
        ca.issue(make_csr(new_private_key(), identity), identity, datetime(2026, 1, 1))


def _csr_with_swapped_key(signing_key, claimed_key):
    """A CSR claiming `claimed_key` but signed by `signing_key`: its self-signature fails."""
    genuine = make_csr(claimed_key, Identity.node("c1", "n1")).public_bytes(serialization.Encoding.DER)
    forged = make_csr(signing_key, Identity.node("c1", "n1")).public_bytes(serialization.Encoding.DER)
    claimed_spki = claimed_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_spki = signing_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert signing_spki in forged and claimed_spki in genuine
    return x509.load_der_x509_csr(forged.replace(signing_spki, claimed_spki))


def test_csr_whose_signature_does_not_match_its_key_is_refused(ca):
    csr = _csr_with_swapped_key(new_private_key(), new_private_key())
    with pytest.raises(InvalidCSR, match="signature"):
        ca.issue(csr, Identity.node("c1", "n1"), NOW)


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(65537, 1024),
    ],
    ids=["p384", "ed25519", "rsa"],
)
def test_csr_with_a_key_other_than_p256_is_refused(ca, key):
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")]))
        .sign(key, algorithm)
    )
    with pytest.raises(InvalidCSR, match="P-256"):
        ca.issue(csr, Identity.node("c1", "n1"), NOW)


def test_load_csr_reads_pem_and_der_and_refuses_garbage():
    csr = make_csr(new_private_key(), Identity.node("c1", "n1"))
    assert load_csr(csr.public_bytes(serialization.Encoding.PEM)) == csr
    assert load_csr(csr.public_bytes(serialization.Encoding.DER)) == csr
    with pytest.raises(InvalidCSR):
        load_csr(b"\x30\x03\x02\x01\x00")


def test_pem_round_trip_keeps_cluster_and_signing_ability(ca):
    cert_pem, key_pem = ca.to_pem()
    restored = ClusterCA.from_pem(cert_pem, key_pem)
    assert restored.cluster_id == "c1"
    assert restored.fingerprint == ca.fingerprint
    identity = Identity.node("c1", "n2")
    restored.issue(make_csr(new_private_key(), identity), identity, NOW).verify_directly_issued_by(ca.certificate)


def test_from_pem_refuses_a_key_that_is_not_the_cas(ca):
    cert_pem, _ = ca.to_pem()
    _, other_key = ClusterCA.create("c1", NOW).to_pem()
    with pytest.raises(InvalidCredentials, match="does not match"):
        ClusterCA.from_pem(cert_pem, other_key)


# Mutations can produce a non-positive serial, which cryptography still parses with a warning.
@pytest.mark.filterwarnings("ignore:Parsed a serial number")
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_csr_bytes_are_issued_or_raise_invalid_csr(ca, data):
    der = bytearray(_FUZZ_CSR.public_bytes(serialization.Encoding.DER))
    position = data.draw(st.integers(0, len(der) - 1))
    if data.draw(st.booleans()):
        der[position] ^= data.draw(st.integers(1, 255))
    else:
        del der[position:]
    try:
        csr = load_csr(bytes(der))
        cert = ca.issue(csr, Identity.node("c1", "n1"), NOW)
    except InvalidCSR:
        return
    # Only a CSR whose key and self-signature survived gets a certificate, for that key.
    assert cert.public_key() == csr.public_key()


_FUZZ_CSR = make_csr(new_private_key(), Identity.node("c1", "n1"))
