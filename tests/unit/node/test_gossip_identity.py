"""Where a node's gossip gets its keys: its own certificate key for signing,
members' keys from Raft (or, outside Raft, from the leader), and the
leader's gossip key rotation after a removal."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from cloudless.errors import NotFound
from cloudless.gossip.claims import CLAIM_ALIVE, verify_raw
from cloudless.gossip.metadata import EMPTY_METADATA
from cloudless.node import gossip_identity as gi
from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials
from cloudless.pki.identity import Identity
from cloudless.state.commands import Proposal, RegisterNode, RemoveNode, SetGossipKeyring, encode_proposal
from cloudless.state.fsm import StateMachine

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CA = ClusterCA.create("c-1", NOW)


def creds(name: str):
    return issue_credentials(CA, Identity("c-1", "node", name), NOW)


def entry(cmd, now=1000.0):
    return encode_proposal(Proposal(command=cmd, now=now))


def registered(*credentials) -> StateMachine:
    fsm = StateMachine()
    fsm.apply(1, entry(SetGossipKeyring([b"k" * 32])))
    for c in credentials:
        name = c.identity.name
        cmd = RegisterNode(name, "127.0.0.1:1", format(c.serial, "x"), 9e9, public_key=gi.public_key_der(c))
        fsm.apply(fsm.applied_index + 1, entry(cmd))
    return fsm


def test_claims_signed_by_one_node_verify_at_another_through_raft_and_through_the_leader():
    a, b = creds("a"), creds("b")
    fsm = registered(a, b)
    signer = gi.GossipIdentity("c-1", lambda: a, lambda: None, lambda: False)
    sig = signer.claims().sign("a", 3, CLAIM_ALIVE, 0, "127.0.0.1:1", EMPTY_METADATA)
    in_raft = gi.GossipIdentity("c-1", lambda: b, lambda: fsm, lambda: True).claims()
    assert in_raft.verify("a", 3, CLAIM_ALIVE, 0, "127.0.0.1:1", EMPTY_METADATA, sig) is True
    assert in_raft.verify("b", 3, CLAIM_ALIVE, 0, "127.0.0.1:1", EMPTY_METADATA, sig) is False
    assert in_raft.verify("z", 3, CLAIM_ALIVE, 0, "127.0.0.1:1", EMPTY_METADATA, sig) is None

    outside = gi.GossipIdentity("c-1", lambda: b, lambda: StateMachine(), lambda: False)
    assert outside.claims().verify("a", 3, CLAIM_ALIVE, 0, "127.0.0.1:1", EMPTY_METADATA, sig) is None  # not synced yet
    raw = msgspec.msgpack.encode(gi.keys_reply(fsm, "b"))
    outside.install_synced(gi.decode_reply(raw))
    assert outside.claims().verify("a", 3, CLAIM_ALIVE, 0, "127.0.0.1:1", EMPTY_METADATA, sig) is True

    fsm.apply(fsm.applied_index + 1, entry(RemoveNode("a")))
    assert in_raft.verify("a", 3, CLAIM_ALIVE, 0, "127.0.0.1:1", EMPTY_METADATA, sig) is False
    outside.install_synced(gi.decode_reply(msgspec.msgpack.encode(gi.keys_reply(fsm, "b"))))
    assert outside.claims().verify("a", 3, CLAIM_ALIVE, 0, "127.0.0.1:1", EMPTY_METADATA, sig) is False
    with pytest.raises(NotFound):
        gi.keys_reply(fsm, "a")  # a removed node gets nothing


def test_the_signer_follows_certificate_renewal():
    old, new = creds("a"), creds("a")
    current = [old]
    identity = gi.GossipIdentity("c-1", lambda: current[0], lambda: None, lambda: False)
    data = b"claim"
    first = identity.sign(data)
    current[0] = new
    second = identity.sign(data)
    assert verify_raw(old.certificate.public_key(), data, first)
    assert verify_raw(new.certificate.public_key(), data, second)
    assert not verify_raw(old.certificate.public_key(), data, second)


def test_a_malformed_keys_reply_is_refused():
    for bad in (
        gi.GossipKeysReply([], {}, []),
        gi.GossipKeysReply([b"short"], {}, []),
        gi.GossipKeysReply([b"k" * 32] * 9, {}, []),
    ):
        with pytest.raises(msgspec.ValidationError):
            gi.decode_reply(msgspec.msgpack.encode(bad))
    with pytest.raises(msgspec.DecodeError):
        gi.decode_reply(b"\xc1")


def test_the_leader_rotates_after_a_removal_then_drops_the_old_key_after_the_overlap():
    fsm = registered(creds("a"))
    old = fsm.gossip_keys[0]
    assert gi.rotation_step(fsm, 2000.0) is None
    fsm.apply(fsm.applied_index + 1, entry(RemoveNode("a"), now=1000.0))
    step = gi.rotation_step(fsm, 1000.0)
    assert step is not None and step.keys[1:] == [old] and step.keys[0] != old
    fsm.apply(fsm.applied_index + 1, entry(step, now=1000.0))
    assert gi.rotation_step(fsm, 1000.0 + gi.GOSSIP_KEY_OVERLAP_S - 1) is None  # the old key still opens
    drop = gi.rotation_step(fsm, 1000.0 + gi.GOSSIP_KEY_OVERLAP_S)
    assert drop is not None and drop.keys == [step.keys[0]]
    fsm.apply(fsm.applied_index + 1, entry(drop, now=1100.0))
    assert gi.rotation_step(fsm, 9999.0) is None


def test_a_node_without_a_recorded_key_stays_unknown_through_the_leader_too():
    b = creds("b")
    fsm = registered(b)
    fsm.apply(fsm.applied_index + 1, entry(RegisterNode("old", "127.0.0.1:2", "ab", 9e9)))  # no key recorded
    outside = gi.GossipIdentity("c-1", lambda: b, lambda: None, lambda: False)
    outside.install_synced(gi.decode_reply(msgspec.msgpack.encode(gi.keys_reply(fsm, "b"))))
    assert outside.member_keys("old") is None  # taken on its word, as on a Raft member
    assert outside.member_keys("b") is not None and len(outside.member_keys("b")) == 1
