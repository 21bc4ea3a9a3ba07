"""PeerVerifier: the checks every transport runs on a peer's certificate after the handshake."""

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials, new_private_key
from cloudless.pki.errors import PEER_REJECT_REASONS, PeerRejected
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import PeerIdentity

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca():
    return ClusterCA.create("c1", NOW)


@pytest.fixture
def revocations():
    return RevocationList()


@pytest.fixture
def verifier(ca, revocations):
    return PeerVerifier(ca.certificate, revocations, "c1", clock=lambda: NOW)


def leaf(ca, uris, *, extra_san=(), signer=None, aki_from=None, ca_flag=False):
    """A leaf signed by the CA's key (or `signer`) with arbitrary URI SANs, bypassing ClusterCA.issue."""
    key = new_private_key()
    signer = signer or ca.private_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key((aki_from or signer).public_key()), critical=False
        )
    )
    names = [x509.UniformResourceIdentifier(u) for u in uris] + list(extra_san)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def rejection(verifier, chain):
    with pytest.raises(PeerRejected) as info:
        verifier.verify(chain)
    assert info.value.reason in PEER_REJECT_REASONS
    return info.value.reason


def test_issued_certificate_verifies_to_its_identity_and_serial(ca, verifier):
    creds = issue_credentials(ca, Identity.node("c1", "n1"), NOW)
    assert verifier.verify([creds.certificate]) == PeerIdentity("c1", "node", "n1", creds.serial)
    client = issue_credentials(ca, Identity.client("c1", "alice"), NOW)
    assert verifier.verify([client.certificate, ca.certificate]).kind == "client"


def test_verify_der_matches_verify(ca, verifier):
    creds = issue_credentials(ca, Identity.node("c1", "n1"), NOW)
    der = creds.certificate.public_bytes(serialization.Encoding.DER)
    assert verifier.verify_der([der]) == verifier.verify([creds.certificate])


def test_empty_chain_is_no_certificate(verifier):
    assert rejection(verifier, []) == "no_certificate"
    with pytest.raises(PeerRejected) as info:
        verifier.verify_der([])
    assert info.value.reason == "no_certificate"


def test_undecodable_der_is_malformed(verifier):
    with pytest.raises(PeerRejected) as info:
        verifier.verify_der([b"\x30\x82\x01\x00garbage"])
    assert info.value.reason == "malformed"


def test_certificate_from_another_ca_is_unknown_ca(verifier):
    other = ClusterCA.create("c2", NOW)
    assert rejection(verifier, [issue_credentials(other, Identity.node("c2", "n1"), NOW).certificate]) == "unknown_ca"


def test_certificate_from_another_ca_of_the_same_cluster_id_is_unknown_ca(verifier):
    # A cluster re-created under the same id has a CA with the same name but another key.
    twin = ClusterCA.create("c1", NOW)
    assert rejection(verifier, [issue_credentials(twin, Identity.node("c1", "n1"), NOW).certificate]) == "unknown_ca"


def test_forged_leaf_claiming_the_cas_name_and_key_id_is_bad_signature(ca, verifier):
    # Claims the CA's name and key identifier, but another key signed it.
    forged = leaf(ca, ["spiffe://c1/node/n1"], signer=new_private_key(), aki_from=ca.private_key)
    assert rejection(verifier, [forged]) == "bad_signature"


def test_leaf_claiming_the_cas_name_with_a_foreign_key_id_is_unknown_ca(ca, verifier):
    assert rejection(verifier, [leaf(ca, ["spiffe://c1/node/n1"], signer=new_private_key())]) == "unknown_ca"


def test_tampered_certificate_is_bad_signature(ca, verifier):
    creds = issue_credentials(ca, Identity.node("c1", "alpha"), NOW)
    der = creds.certificate.public_bytes(serialization.Encoding.DER)
    assert der.count(b"spiffe://c1/node/alpha") == 1
    tampered = x509.load_der_x509_certificate(der.replace(b"spiffe://c1/node/alpha", b"spiffe://c1/node/omega"))
    assert rejection(verifier, [tampered]) == "bad_signature"


def test_expired_certificate_is_expired(ca, verifier):
    old = issue_credentials(ca, Identity.node("c1", "n1"), NOW - timedelta(days=2), timedelta(hours=24))
    assert rejection(verifier, [old.certificate]) == "expired"


def test_certificate_from_the_future_is_not_yet_valid(ca, verifier):
    future = issue_credentials(ca, Identity.node("c1", "n1"), NOW + timedelta(hours=1))
    assert rejection(verifier, [future.certificate]) == "not_yet_valid"


def test_backdating_tolerates_a_minute_of_clock_skew(ca, revocations):
    creds = issue_credentials(ca, Identity.node("c1", "n1"), NOW)
    behind = PeerVerifier(ca.certificate, revocations, "c1", clock=lambda: NOW - timedelta(seconds=50))
    assert behind.verify([creds.certificate]).name == "n1"


def test_validity_is_judged_by_the_injected_clock_at_each_call(ca, revocations):
    creds = issue_credentials(ca, Identity.node("c1", "n1"), NOW, timedelta(hours=1))
    now = [NOW]
    verifier = PeerVerifier(ca.certificate, revocations, "c1", clock=lambda: now[0])
    verifier.verify([creds.certificate])
    now[0] = NOW + timedelta(hours=2)
    assert rejection(verifier, [creds.certificate]) == "expired"


def test_revoked_certificate_is_revoked_and_revocation_applies_without_rebuilding(ca, revocations, verifier):
    creds = issue_credentials(ca, Identity.node("c1", "n1"), NOW)
    verifier.verify([creds.certificate])
    revocations.add(creds.serial, creds.not_after)
    assert rejection(verifier, [creds.certificate]) == "revoked"
    other = issue_credentials(ca, Identity.node("c1", "n2"), NOW)
    assert verifier.verify([other.certificate]).name == "n2"


def test_swapped_revocation_list_takes_effect(ca, verifier):
    creds = issue_credentials(ca, Identity.node("c1", "n1"), NOW)
    fresh = RevocationList()
    fresh.add(creds.serial, creds.not_after)
    verifier.revocations = fresh
    assert rejection(verifier, [creds.certificate]) == "revoked"


@pytest.mark.parametrize(
    "uris",
    [
        [],  # only a DNS name
        ["https://example.com/node/n1"],
        ["spiffe://c1/admin/n1"],
        ["spiffe://c1"],
        ["spiffe://c1/node/n1", "spiffe://c1/node/n2"],
    ],
    ids=["no-uri", "not-spiffe", "bad-kind", "trust-domain-only", "two-uris"],
)
def test_certificate_without_exactly_one_cloudless_uri_is_bad_identity(ca, verifier, uris):
    cert = leaf(ca, uris, extra_san=[x509.DNSName("n1.local")])
    assert rejection(verifier, [cert]) == "bad_identity"


def test_certificate_without_any_san_is_bad_identity(ca, verifier):
    assert rejection(verifier, [leaf(ca, [])]) == "bad_identity"


def test_dns_names_beside_the_uri_are_tolerated(ca, verifier):
    cert = leaf(ca, ["spiffe://c1/node/n1"], extra_san=[x509.DNSName("n1.local")])
    assert verifier.verify([cert]).name == "n1"


def test_ca_certificate_presented_as_a_leaf_is_bad_identity(ca, verifier):
    assert rejection(verifier, [ca.certificate]) == "bad_identity"
    assert rejection(verifier, [leaf(ca, ["spiffe://c1/node/n1"], ca_flag=True)]) == "bad_identity"


def test_identity_of_another_cluster_signed_by_our_ca_is_wrong_cluster(ca, verifier):
    assert rejection(verifier, [leaf(ca, ["spiffe://c2/node/n1"])]) == "wrong_cluster"


def test_expired_ca_rejects_everything(revocations):
    short = ClusterCA.create("c1", NOW, lifetime=timedelta(hours=1))
    creds = issue_credentials(short, Identity.node("c1", "n1"), NOW)
    verifier = PeerVerifier(short.certificate, revocations, "c1", clock=lambda: short.not_after + timedelta(seconds=1))
    assert rejection(verifier, [creds.certificate]) == "expired"


def test_rejection_reasons_are_exactly_the_documented_set():
    assert PEER_REJECT_REASONS == {
        "no_certificate",
        "malformed",
        "unknown_ca",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "revoked",
        "bad_identity",
        "wrong_cluster",
    }
    with pytest.raises(ValueError):
        PeerRejected("nonsense")  # type: ignore[arg-type]


# Mutations can produce a non-positive serial, which cryptography still parses with a warning.
@pytest.mark.filterwarnings("ignore:Parsed a serial number")
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_certificate_bytes_are_accepted_only_unchanged_or_rejected(ca, data):
    creds = _fuzz_credentials(ca)
    der = bytearray(creds.certificate.public_bytes(serialization.Encoding.DER))
    original = bytes(der)
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(der) - 1))
        if data.draw(st.booleans()):
            der[position] ^= data.draw(st.integers(1, 255))
        else:
            del der[position:]
            if not der:
                der.append(0)
    verifier = PeerVerifier(ca.certificate, RevocationList(), "c1", clock=lambda: NOW)
    try:
        peer = verifier.verify_der([bytes(der)])
    except PeerRejected:
        return
    # A mutation that still verifies may only touch bytes outside the signed part
    # (e.g. an equivalent re-encoding); the identity must be the original one.
    assert peer == PeerIdentity("c1", "node", "n1", creds.serial), bytes(der) != original


_FUZZ_CREDENTIALS = {}


def _fuzz_credentials(ca):
    if id(ca) not in _FUZZ_CREDENTIALS:
        _FUZZ_CREDENTIALS[id(ca)] = issue_credentials(ca, Identity.node("c1", "n1"), NOW)
    return _FUZZ_CREDENTIALS[id(ca)]
