"""What the state machine keeps for signed gossip (issue 13): each node
certificate's public key, and when the gossip key must rotate."""

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloudless.state.commands import (
    Done,
    Proposal,
    RecordCertificate,
    RegisterNode,
    Rejected,
    RemoveNode,
    RevokeCertificate,
    SetGossipKeyring,
    encode_proposal,
)
from cloudless.state.fsm import StateMachine


def entry(cmd, now=1000.0):
    return encode_proposal(Proposal(command=cmd, now=now))


def der(curve=ec.SECP256R1()) -> bytes:
    return (
        ec.generate_private_key(curve)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_registration_and_renewal_record_certificate_keys_and_revocation_drops_them():
    fsm = StateMachine()
    k1, k2 = der(), der()
    assert fsm.node_public_keys("n1") is None  # never registered
    assert isinstance(fsm.apply(1, entry(RegisterNode("n1", "127.0.0.1:1", "a1", 5000.0, public_key=k1))), Done)
    assert fsm.node_public_keys("n1") == [k1]
    assert isinstance(fsm.apply(2, entry(RecordCertificate("n1", "b2", 6000.0, public_key=k2))), Done)
    assert fsm.node_public_keys("n1") == [k1, k2]
    fsm.apply(3, entry(RevokeCertificate("a1", 5000.0)))
    assert fsm.node_public_keys("n1") == [k2]
    # The old certificate expired: its key goes with it at the next certificate change.
    fsm.apply(4, entry(RecordCertificate("n1", "c3", 9000.0, public_key=k1), now=5500.0))
    assert sorted(fsm.nodes["n1"].public_keys) == ["b2", "c3"]
    restored = StateMachine()
    restored.restore(fsm.snapshot())
    assert restored.node_public_keys("n1") == fsm.node_public_keys("n1")


def test_a_node_registered_before_keys_were_recorded_is_taken_on_its_word_until_it_renews():
    fsm = StateMachine()
    fsm.apply(1, entry(RegisterNode("n1", "127.0.0.1:1", "a1", 5000.0)))
    assert fsm.node_public_keys("n1") is None
    key = der()
    fsm.apply(2, entry(RecordCertificate("n1", "b2", 6000.0, public_key=key)))
    assert fsm.node_public_keys("n1") == [key]


def test_a_removed_name_has_no_key_at_all():
    fsm = StateMachine()
    fsm.apply(1, entry(RegisterNode("n1", "127.0.0.1:1", "a1", 5000.0, public_key=der())))
    fsm.apply(2, entry(RemoveNode("n1")))
    assert fsm.node_public_keys("n1") == []


def test_a_key_that_is_not_p256_is_rejected_and_changes_nothing():
    fsm = StateMachine()
    for bad in (b"\x30\x03junk", der(ec.SECP384R1())):
        result = fsm.apply(
            fsm.applied_index + 1, entry(RegisterNode("n1", "127.0.0.1:1", "a1", 5000.0, public_key=bad))
        )
        assert isinstance(result, Rejected) and result.kind == "invalid"
    assert "n1" not in fsm.nodes


def test_removing_a_node_asks_for_a_new_gossip_key_until_one_is_set():
    fsm = StateMachine()
    old, new = b"o" * 32, b"n" * 32
    fsm.apply(1, entry(SetGossipKeyring([old]), now=100.0))
    fsm.apply(2, entry(RegisterNode("n1", "127.0.0.1:1", "a1", 5000.0)))
    assert not fsm.gossip_rekey
    fsm.apply(3, entry(RemoveNode("n1")))
    assert fsm.gossip_rekey
    restored = StateMachine()
    restored.restore(fsm.snapshot())
    assert restored.gossip_rekey
    fsm.apply(4, entry(SetGossipKeyring([old]), now=200.0))  # same primary: still due
    assert fsm.gossip_rekey and fsm.gossip_keys_at == 100.0
    fsm.apply(5, entry(SetGossipKeyring([new, old]), now=300.0))
    assert not fsm.gossip_rekey and fsm.gossip_keys == [new, old] and fsm.gossip_keys_at == 300.0
    fsm.apply(6, entry(SetGossipKeyring([new]), now=400.0))
    assert fsm.gossip_keys == [new] and fsm.gossip_keys_at == 400.0
