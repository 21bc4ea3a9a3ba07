"""The replicated side of `cloudless ca rotate`: trust both, re-issue, retire."""

from datetime import UTC, datetime

import pytest

from cloudless.pki.bundle import endorse, load_bundle, subject_key_id
from cloudless.pki.ca import ClusterCA
from cloudless.pki.errors import InvalidCredentials
from cloudless.state.commands import (
    ActivateNextCA,
    BeginCARotation,
    Done,
    Proposal,
    RecordCertificate,
    RecordClientCertificate,
    RegisterNode,
    Rejected,
    RetireCA,
    StoreClusterCA,
    encode_proposal,
    node_may_propose,
)
from cloudless.state.fsm import StateMachine

NOW = datetime(2026, 12, 1, tzinfo=UTC)
T0 = 1000.0


def entry(cmd, now=T0, proposer=""):
    return encode_proposal(Proposal(command=cmd, now=now, proposer=proposer))


@pytest.fixture(scope="module")
def cas():
    return ClusterCA.create("c1", NOW), ClusterCA.create("c1", NOW)


def endorsed(by: ClusterCA, pem: bytes) -> bytes:
    try:
        new = load_bundle(pem)[0]
    except InvalidCredentials:
        return b""
    return endorse(by.private_key, "c1", new)


def kid(ca: ClusterCA) -> str:
    return subject_key_id(ca.certificate).hex()


def cluster(old: ClusterCA) -> StateMachine:
    fsm = StateMachine()
    assert isinstance(fsm.apply(1, entry(StoreClusterCA("c1", old.certificate_pem, b"sealed-old"))), Done)
    fsm.apply(2, entry(RegisterNode("n1", "127.0.0.1:7000", "a1", certificate_not_after=T0 + 86400, issuer=kid(old))))
    fsm.apply(3, entry(RegisterNode("n2", "127.0.0.1:7001", "a2", certificate_not_after=T0 + 86400, issuer=kid(old))))
    return fsm


def test_a_rotation_trusts_both_then_signs_with_the_new_then_retires_the_old(cas) -> None:
    old, new = cas
    fsm = cluster(old)
    assert fsm.trust_bundle() == old.certificate_pem
    begin = BeginCARotation(
        "c1", new.certificate_pem, b"sealed-new", overlap_s=100.0, endorsement=endorsed(old, new.certificate_pem)
    )
    assert isinstance(fsm.apply(4, entry(begin)), Done)
    # Phase 1: both trusted, the old one still signs.
    assert [c.serial_number for c in load_bundle(fsm.trust_bundle())] == [
        old.certificate.serial_number,
        new.certificate.serial_number,
    ]
    assert fsm.ca is not None and fsm.ca.certificate_pem == old.certificate_pem
    early = fsm.apply(5, entry(ActivateNextCA(kid(new)), now=T0 + 10))
    assert isinstance(early, Rejected) and "half the overlap" in early.message
    assert isinstance(fsm.apply(6, entry(ActivateNextCA(kid(new)), now=T0 + 50)), Done)
    # Phase 2: the new one signs (and comes first), the old one is still trusted.
    assert fsm.ca.certificate_pem == new.certificate_pem and fsm.ca.sealed_key == b"sealed-new"
    assert load_bundle(fsm.trust_bundle())[1].serial_number == old.certificate.serial_number
    fsm.apply(7, entry(RecordCertificate("n1", "b1", T0 + 86400, issuer=kid(new)), now=T0 + 60))
    fsm.apply(8, entry(RecordClientCertificate("alice", "admin", "c1", T0 + 86400, issuer=kid(new)), now=T0 + 60))
    # A certificate recorded with the old issuer (signed just before activation) does not count.
    fsm.apply(9, entry(RecordCertificate("n2", "b2", T0 + 86400, issuer=kid(old)), now=T0 + 60))
    assert fsm.ca_rotation is not None
    assert fsm.ca_rotation.reissued_nodes == ["n1"] and fsm.ca_rotation.reissued_clients == ["alice"]
    blocked = fsm.apply(10, entry(RetireCA(kid(old)), now=T0 + 200))
    assert isinstance(blocked, Rejected) and "n2" in blocked.message
    fsm.apply(11, entry(RecordCertificate("n2", "b3", T0 + 86400, issuer=kid(new)), now=T0 + 70))
    too_soon = fsm.apply(12, entry(RetireCA(kid(old)), now=T0 + 90))
    assert isinstance(too_soon, Rejected) and "overlap" in too_soon.message
    assert isinstance(fsm.apply(13, entry(RetireCA(kid(old)), now=T0 + 100)), Done)
    # Phase 3: only the new CA.
    assert fsm.trust_bundle() == new.certificate_pem and fsm.ca_rotation is None


def test_rotation_state_survives_a_snapshot(cas) -> None:
    old, new = cas
    fsm = cluster(old)
    fsm.apply(
        4,
        entry(
            BeginCARotation(
                "c1",
                new.certificate_pem,
                b"sealed-new",
                overlap_s=100.0,
                endorsement=endorsed(old, new.certificate_pem),
            )
        ),
    )
    fsm.apply(5, entry(ActivateNextCA(kid(new)), now=T0 + 50))
    fsm.apply(6, entry(RecordCertificate("n1", "b1", T0 + 86400, issuer=kid(new)), now=T0 + 60))
    copy = StateMachine()
    copy.restore(fsm.snapshot())
    assert copy.trust_bundle() == fsm.trust_bundle()
    assert copy.ca_rotation == fsm.ca_rotation


def test_bad_rotations_are_refused_and_change_nothing(cas) -> None:
    old, new = cas
    fsm = cluster(old)
    before = fsm.trust_bundle()
    for bad in (
        BeginCARotation(
            "c2", new.certificate_pem, b"s", overlap_s=100.0, endorsement=endorsed(old, new.certificate_pem)
        ),  # another cluster
        BeginCARotation(
            "c1", old.certificate_pem, b"s", overlap_s=100.0, endorsement=endorsed(old, old.certificate_pem)
        ),  # the active CA again
        BeginCARotation(
            "c1",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            b"s",
            overlap_s=100.0,
            endorsement=endorsed(old, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        ),
        BeginCARotation(
            "c1",
            new.certificate_pem + old.certificate_pem,
            b"s",
            overlap_s=100.0,
            endorsement=endorsed(old, new.certificate_pem + old.certificate_pem),
        ),  # two CAs
        StoreClusterCA("c1", new.certificate_pem, b"s"),  # replacing the CA without a rotation
        ActivateNextCA(kid(new)),  # nothing to activate
        RetireCA(kid(old)),  # nothing to retire
        BeginCARotation("c1", new.certificate_pem, b"s", overlap_s=100.0),  # not endorsed
        BeginCARotation("c1", new.certificate_pem, b"s", 100.0, endorse(new.private_key, "c1", new.certificate)),
    ):
        assert isinstance(fsm.apply(fsm.applied_index + 1, entry(bad, now=T0 + 500)), Rejected), bad
    assert fsm.trust_bundle() == before and fsm.ca_rotation is None
    fsm.apply(
        fsm.applied_index + 1,
        entry(
            BeginCARotation(
                "c1", new.certificate_pem, b"s", overlap_s=100.0, endorsement=endorsed(old, new.certificate_pem)
            )
        ),
    )
    again = fsm.apply(
        fsm.applied_index + 1,
        entry(
            BeginCARotation(
                "c1", new.certificate_pem, b"s", overlap_s=100.0, endorsement=endorsed(old, new.certificate_pem)
            )
        ),
    )
    assert isinstance(again, Rejected) and "already under way" in again.message
    wrong = fsm.apply(fsm.applied_index + 1, entry(ActivateNextCA(kid(old)), now=T0 + 60))
    assert isinstance(wrong, Rejected)


def test_no_node_may_propose_a_rotation_step(cas) -> None:
    old, new = cas
    for command in (
        BeginCARotation(
            "c1", new.certificate_pem, b"s", overlap_s=100.0, endorsement=endorsed(old, new.certificate_pem)
        ),
        ActivateNextCA(kid(new)),
        RetireCA(kid(old)),
    ):
        assert node_may_propose(command, "n1") is not None
        fsm = cluster(old)
        assert isinstance(fsm.apply(4, entry(command, now=T0 + 500, proposer="n1")), Rejected)


def test_the_leaders_step_follows_the_phases(cas) -> None:
    from cloudless.coordinator.ca_rotation import ca_rotation_step

    old, new = cas
    fsm = cluster(old)
    assert ca_rotation_step(fsm, T0) is None
    fsm.apply(
        4,
        entry(
            BeginCARotation(
                "c1", new.certificate_pem, b"s", overlap_s=100.0, endorsement=endorsed(old, new.certificate_pem)
            )
        ),
    )
    assert ca_rotation_step(fsm, T0 + 49) is None
    step = ca_rotation_step(fsm, T0 + 50)
    assert step == ActivateNextCA(kid(new))
    fsm.apply(5, entry(step, now=T0 + 50))
    fsm.apply(6, entry(RecordCertificate("n1", "b1", T0 + 86400, issuer=kid(new)), now=T0 + 60))
    fsm.apply(7, entry(RecordCertificate("n2", "b2", T0 + 86400, issuer=kid(new)), now=T0 + 60))
    assert ca_rotation_step(fsm, T0 + 99) is None  # the overlap is not over
    step = ca_rotation_step(fsm, T0 + 100)
    assert step == RetireCA(kid(old))
    assert isinstance(fsm.apply(8, entry(step, now=T0 + 100)), Done)
    assert ca_rotation_step(fsm, T0 + 200) is None
