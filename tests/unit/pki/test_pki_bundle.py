"""Trust bundles: during a CA rotation a node or client accepts leaves from two CAs (`pki.bundle`)."""

from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization

from cloudless.pki.bundle import bundle_pem, issuer_of, load_bundle, subject_key_id
from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import Credentials, issue_credentials
from cloudless.pki.errors import InvalidCredentials, PeerRejected
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def cas():
    # Same cluster, same name: only the key (and so the key id) tells them apart.
    return ClusterCA.create("c1", NOW), ClusterCA.create("c1", NOW), ClusterCA.create("c1", NOW)


def test_either_ca_of_the_bundle_is_accepted_and_a_third_is_refused(cas) -> None:
    old, new, third = cas
    verifier = PeerVerifier([old.certificate, new.certificate], RevocationList(), "c1", clock=lambda: NOW)
    for ca in (old, new):
        leaf = issue_credentials(ca, Identity.node("c1", "n1"), NOW).certificate
        assert verifier.verify([leaf]).name == "n1"
    stranger = issue_credentials(third, Identity.node("c1", "n1"), NOW).certificate
    with pytest.raises(PeerRejected) as info:
        verifier.verify([stranger])
    assert info.value.reason == "unknown_ca"


def test_the_issuer_is_chosen_by_authority_key_id_not_by_order(cas) -> None:
    old, new, _ = cas
    leaf = issue_credentials(new, Identity.node("c1", "n1"), NOW).certificate
    assert issuer_of(leaf, [old.certificate, new.certificate]) is new.certificate
    assert issuer_of(leaf, [new.certificate, old.certificate]) is new.certificate
    assert issuer_of(leaf, [old.certificate]) is None


def test_retiring_a_ca_from_a_live_verifier_refuses_its_leaves(cas) -> None:
    old, new, _ = cas
    verifier = PeerVerifier([new.certificate, old.certificate], RevocationList(), "c1", clock=lambda: NOW)
    old_leaf = issue_credentials(old, Identity.client("c1", "alice"), NOW, role="admin").certificate
    assert verifier.verify([old_leaf]).role == "admin"
    verifier.trust([new.certificate])
    with pytest.raises(PeerRejected) as info:
        verifier.verify([old_leaf])
    assert info.value.reason == "unknown_ca"
    assert verifier.ca_certificate is new.certificate


def test_credentials_know_whether_their_issuer_is_the_active_ca(cas) -> None:
    old, new, _ = cas
    mine = issue_credentials(old, Identity.node("c1", "n1"), NOW)
    trusting_both = mine.with_bundle(bundle_pem([new.certificate, old.certificate]))
    assert trusting_both.ca_certificate is not None
    assert subject_key_id(trusting_both.ca_certificate) == subject_key_id(old.certificate)
    assert not trusting_both.issued_by_active_ca
    assert mine.with_bundle(bundle_pem([old.certificate, new.certificate])).issued_by_active_ca
    # A bundle that does not hold the certificate's issuer is refused.
    with pytest.raises(InvalidCredentials, match="not issued by the CA"):
        mine.with_bundle(new.certificate_pem)


def test_bundles_hold_one_or_two_distinct_cas_and_nothing_else(cas) -> None:
    old, new, third = cas
    assert len(load_bundle(bundle_pem([old.certificate, new.certificate]))) == 2
    with pytest.raises(InvalidCredentials, match="1 to 2"):
        load_bundle(bundle_pem([old.certificate, new.certificate, third.certificate]))
    with pytest.raises(InvalidCredentials, match="twice"):
        load_bundle(bundle_pem([old.certificate, old.certificate]))
    with pytest.raises(InvalidCredentials, match="not a CA"):
        load_bundle(issue_credentials(old, Identity.node("c1", "n1"), NOW).cert_pem)
    with pytest.raises(InvalidCredentials):
        load_bundle(b"")
    with pytest.raises(InvalidCredentials, match="bytes"):
        load_bundle(b"x" * 20000)
    with pytest.raises(InvalidCredentials):
        Credentials(b"not a pem", b"", b"")


def test_a_peer_can_add_a_ca_only_with_the_endorsement_of_one_already_trusted(cas) -> None:
    from cloudless.pki.bundle import accept_offered_bundle, endorse

    old, new, third = cas
    offered = bundle_pem([old.certificate, new.certificate])
    good = endorse(old.private_key, "c1", new.certificate)
    assert accept_offered_bundle(old.certificate_pem, offered, "c1", good) == offered
    for bad in (
        b"",
        endorse(third.private_key, "c1", new.certificate),  # a stranger's key
        endorse(new.private_key, "c1", new.certificate),  # self-endorsed
        endorse(old.private_key, "c2", new.certificate),  # for another cluster
        good[:-1] + bytes([good[-1] ^ 1]),
    ):
        with pytest.raises(InvalidCredentials, match="not endorsed"):
            accept_offered_bundle(old.certificate_pem, offered, "c1", bad)
    # Dropping a CA (retirement) or reordering needs no endorsement.
    assert accept_offered_bundle(offered, new.certificate_pem, "c1", b"") == new.certificate_pem


def test_a_joiner_trusts_the_pinned_ca_and_only_what_it_endorsed(cas) -> None:
    from cloudless.node.enroll import EnrollHelloReply, verify_hello
    from cloudless.pki.bundle import endorse
    from cloudless.pki.ca import certificate_fingerprint

    old, new, third = cas
    server = issue_credentials(
        old, Identity.node("c1", "n1"), datetime.now(UTC)
    ).certificate  # checked on the real clock
    server_der = server.public_bytes(serialization.Encoding.DER)
    pin = certificate_fingerprint(old.certificate)
    both = bundle_pem([old.certificate, new.certificate])
    endorsed = EnrollHelloReply("c1", both, endorse(old.private_key, "c1", new.certificate))
    assert verify_hello(endorsed, pin, server_der) == [old.certificate, new.certificate]
    # A CA the pinned one did not endorse (a rooted node's own, say) is not trusted.
    smuggled = EnrollHelloReply("c1", bundle_pem([old.certificate, third.certificate]), b"")
    assert verify_hello(smuggled, pin, server_der) == [old.certificate]
    # The pinned CA must be in the bundle and must have issued the server's certificate.
    with pytest.raises(PeerRejected, match="fingerprint"):
        verify_hello(EnrollHelloReply("c1", new.certificate_pem), pin, server_der)
    with pytest.raises(PeerRejected):
        verify_hello(endorsed, certificate_fingerprint(new.certificate), server_der)
