"""Self-claims signed by the member they are about (issue 13): a keyholder
that is not node2 cannot make node2 leave, cannot pin it dead with a huge
incarnation, and node2's own signed refutation wins. Cores stepped by hand."""

from __future__ import annotations

import random

from cryptography.hazmat.primitives.asymmetric import ec

from cloudless.gossip import messages as wire
from cloudless.gossip.claims import (
    CLAIM_ALIVE,
    CLAIM_LEFT,
    SIGNATURE_SIZE,
    SelfClaims,
    VerificationCache,
    claim_bytes,
    ecdsa_signer,
    verify_raw,
)
from cloudless.gossip.core import INCARNATION_WINDOW, GossipCore
from cloudless.gossip.events import MemberLeft
from cloudless.gossip.members import ALIVE, DEAD, LEFT, SUSPECT
from cloudless.gossip.messages import MAX_INCARNATION, Alive, Dead, Suspect
from cloudless.gossip.metadata import EMPTY_METADATA, Metadata

CLUSTER = "c-test"
NAMES = ["me", "node2", "mallory", "p3", "p4"]
KEYS = {n: ec.generate_private_key(ec.SECP256R1()) for n in [*NAMES, "stranger"]}
# The cluster registered every name in NAMES; "stranger" never joined; "gone" was removed.
REGISTRY: dict[str, tuple] = {n: (KEYS[n].public_key(),) for n in NAMES}
REGISTRY["gone"] = ()


def addr(name: str) -> str:
    return f"{name}:7946"


def claims_for(name: str) -> SelfClaims:
    return SelfClaims(CLUSTER, ecdsa_signer(KEYS[name]), REGISTRY.get)


def make(name: str = "me") -> GossipCore:
    core = GossipCore(name, addr(name), rng=random.Random(name), now=0.0, claims=claims_for(name))
    others = [n for n in NAMES if n != name]
    core.bootstrap_members([Alive(0, p, addr(p), 0, EMPTY_METADATA) for p in others], 0.0)
    return core


def packet(*msgs) -> bytes:
    return wire.pack([wire.encode(m) for m in msgs])


def signed_alive(name: str, incarnation: int, meta: Metadata = EMPTY_METADATA, meta_version: int = 0) -> Alive:
    sig = claims_for(name).sign(name, incarnation, CLAIM_ALIVE, meta_version, addr(name), meta)
    return Alive(incarnation, name, addr(name), meta_version, meta, sig)


def signed_leave(name: str, incarnation: int, signer: str | None = None) -> Dead:
    sig = claims_for(signer or name).sign(name, incarnation, CLAIM_LEFT, 0, "", None)
    return Dead(incarnation, name, name, sig)


def test_signatures_are_raw_64_bytes_and_bound_to_every_field():
    sign = ecdsa_signer(KEYS["node2"])
    data = claim_bytes(CLUSTER, "node2", 3, CLAIM_ALIVE, 1, addr("node2"), EMPTY_METADATA)
    sig = sign(data)
    assert len(sig) == SIGNATURE_SIZE
    key = KEYS["node2"].public_key()
    assert verify_raw(key, data, sig)
    for other in (
        claim_bytes("c-other", "node2", 3, CLAIM_ALIVE, 1, addr("node2"), EMPTY_METADATA),
        claim_bytes(CLUSTER, "p3", 3, CLAIM_ALIVE, 1, addr("node2"), EMPTY_METADATA),
        claim_bytes(CLUSTER, "node2", 4, CLAIM_ALIVE, 1, addr("node2"), EMPTY_METADATA),
        claim_bytes(CLUSTER, "node2", 3, CLAIM_LEFT, 1, addr("node2"), EMPTY_METADATA),
        claim_bytes(CLUSTER, "node2", 3, CLAIM_ALIVE, 2, addr("node2"), EMPTY_METADATA),
        claim_bytes(CLUSTER, "node2", 3, CLAIM_ALIVE, 1, "evil:1", EMPTY_METADATA),
        claim_bytes(CLUSTER, "node2", 3, CLAIM_ALIVE, 1, addr("node2"), Metadata(roles=("leader",))),
    ):
        assert not verify_raw(key, other, sig)
    assert not verify_raw(KEYS["p3"].public_key(), data, sig)


def test_a_member_signs_its_alive_once_per_change_not_per_packet():
    core = make("node2")
    first = core._self_sig
    assert len(first) == SIGNATURE_SIZE
    core.receive(packet(Suspect(0, "node2", "p3")), addr("p3"), 1.0)  # refute: incarnation 1
    assert core._self_sig != first
    again = core._self_sig
    core.handle_timer(2.0)
    core.handle_timer(3.0)
    assert core._self_sig == again
    alives = [m for _, p in core.packets_to_send() for m in wire.decode_packet(p) if isinstance(m, Alive)]
    assert alives and all(a.sig == again and a.incarnation == 1 for a in alives if a.node == "node2")


def test_forged_leave_from_a_keyholder_is_ignored():
    core = make()
    # mallory holds the cluster keyring (the packet reaches the core) but not node2's key.
    forged_unsigned = Dead(MAX_INCARNATION, "node2", "node2")
    forged_by_mallory = signed_leave("node2", 5, signer="mallory")
    core.receive(packet(forged_unsigned, forged_by_mallory), addr("mallory"), 1.0)
    row = core.member("node2")
    assert row.state == ALIVE and row.incarnation == 0
    assert core.stats["claims_rejected"] == 2
    assert not [e for e in core.events() if isinstance(e, MemberLeft)]
    # Nor does the forgery spread: nothing about node2 was queued for gossip.
    core.handle_timer(5.0)
    gossiped = [m for _, p in core.packets_to_send() for m in wire.decode_packet(p) if isinstance(m, Dead)]
    assert not gossiped


def test_a_real_signed_leave_is_accepted():
    core = make()
    core.receive(packet(signed_leave("node2", 0)), addr("node2"), 1.0)
    assert core.member("node2").state == LEFT
    assert [e for e in core.events() if isinstance(e, MemberLeft)] == [MemberLeft("node2")]


def test_forged_alive_for_a_registered_member_is_ignored():
    core = make()
    spoofed = Alive(3, "node2", "evil:6666", 0, Metadata(roles=("leader",)))  # unsigned
    stolen_sig = signed_alive("node2", 3)
    moved = Alive(3, "node2", "evil:6666", 0, EMPTY_METADATA, stolen_sig.sig)  # signature moved to another address
    core.receive(packet(spoofed, moved), addr("mallory"), 1.0)
    row = core.member("node2")
    assert (row.incarnation, row.addr) == (0, addr("node2"))
    assert core.stats["claims_rejected"] == 2


def test_forged_max_incarnation_dead_cannot_pin_a_member():
    core = make()
    # A keyholder's observation naming the largest incarnation there is.
    core.receive(packet(Dead(MAX_INCARNATION, "node2", "mallory")), addr("mallory"), 1.0)
    row = core.member("node2")
    # Read as an observation about the incarnation node2 last signed (0)...
    assert row.state == DEAD and row.incarnation == 0
    assert core.stats["observations_clamped"] == 1
    # ...so node2's signed refutation at 1 brings it back.
    core.receive(packet(signed_alive("node2", 1)), addr("node2"), 2.0)
    row = core.member("node2")
    assert row.state == ALIVE and row.incarnation == 1


def test_forged_high_incarnation_suspicion_is_clamped_and_refuted():
    core = make()
    core.receive(packet(Suspect(MAX_INCARNATION - 1, "node2", "mallory")), addr("mallory"), 1.0)
    row = core.member("node2")
    assert row.state == SUSPECT and row.incarnation == 0
    core.receive(packet(signed_alive("node2", 1)), addr("node2"), 1.5)
    assert core.member("node2").state == ALIVE


def test_the_accused_member_moves_at_most_a_window_per_accusation():
    node2 = make("node2")
    node2.receive(packet(Dead(MAX_INCARNATION, "node2", "mallory")), addr("mallory"), 1.0)
    assert node2.incarnation == INCARNATION_WINDOW + 1
    # An honest accusation within the window (what a restarted member hears) is outbid exactly.
    fresh = make("node2")
    fresh.receive(packet(Suspect(40, "node2", "p3")), addr("p3"), 1.0)
    assert fresh.incarnation == 41


def test_signed_refutation_wins_end_to_end_between_two_cores():
    me, node2 = make("me"), make("node2")
    me.receive(packet(Suspect(0, "node2", "p3")), addr("p3"), 1.0)
    assert me.member("node2").state == SUSPECT
    # The buddy system tells node2 in the next probe of it; here we hand it the suspicion.
    node2.receive(packet(Suspect(0, "node2", "me")), addr("me"), 1.1)
    for _, payload in node2.packets_to_send():
        me.receive(payload, addr("node2"), 1.2)
    node2.handle_timer(1.3)  # gossip round carries the refutation
    for _, payload in node2.packets_to_send():
        me.receive(payload, addr("node2"), 1.3)
    row = me.member("node2")
    assert row.state == ALIVE and row.incarnation == 1
    assert me._sigs["node2"] == node2._self_sig


def test_push_pull_carries_signatures_and_a_forged_row_is_dropped():
    me, node2 = make("me"), make("node2")
    node2.update_metadata(Metadata(zone="z9"), 0.5)
    state = node2._state_payload(join=False)
    me.handle_push_pull(state, 1.0)
    assert me.member("node2").meta.zone == "z9"
    rejected = me.stats["claims_rejected"]  # node2's unsigned warm-start rows of the others
    # A keyholder's push-pull claiming node2 left, with no signature of node2's.
    forged = wire.PushPullState(
        False, "mallory", [wire.MemberRecord("node2", addr("node2"), MAX_INCARNATION, LEFT, 0, EMPTY_METADATA)]
    )
    me.handle_push_pull(wire.encode(forged), 2.0)
    assert me.member("node2").state == ALIVE
    assert me.stats["claims_rejected"] == rejected + 1


def test_unknown_joiner_is_accepted_but_a_removed_name_is_not():
    me = make()
    stranger = GossipCore(
        "stranger",
        addr("stranger"),
        rng=random.Random(1),
        now=0.0,
        claims=SelfClaims(CLUSTER, ecdsa_signer(KEYS["stranger"]), REGISTRY.get),
    )
    me.handle_push_pull(stranger._state_payload(join=True), 1.0)
    assert me.member("stranger").state == ALIVE  # not registered yet: accepted for its join
    # ...but even an unknown member's incarnation cannot leap unsigned.
    me.receive(packet(Dead(MAX_INCARNATION, "stranger", "mallory")), addr("mallory"), 1.5)
    assert me.member("stranger").state == ALIVE
    me.receive(packet(Alive(0, "gone", addr("gone"), 0, EMPTY_METADATA, b"\x01" * 64)), addr("mallory"), 2.0)
    assert me.member("gone") is None


def test_first_signed_word_outranks_unsigned_gossip_heard_before_the_key():
    registry: dict[str, tuple] = {"me": (KEYS["me"].public_key(),)}
    me = GossipCore(
        "me",
        addr("me"),
        rng=random.Random(2),
        now=0.0,
        claims=SelfClaims(CLUSTER, ecdsa_signer(KEYS["me"]), registry.get),
    )
    # Before node2 is registered here, a keyholder claims it at incarnation 900.
    me.receive(packet(Alive(900, "node2", "evil:1", 0, EMPTY_METADATA)), addr("mallory"), 1.0)
    assert me.member("node2").incarnation == 900
    registry["node2"] = (KEYS["node2"].public_key(),)
    me.receive(packet(signed_alive("node2", 0)), addr("node2"), 2.0)
    row = me.member("node2")
    assert (row.incarnation, row.addr) == (0, addr("node2"))


def test_verification_cache_checks_each_claim_once():
    cache = VerificationCache(size=4)
    claims = SelfClaims(CLUSTER, ecdsa_signer(KEYS["me"]), REGISTRY.get, cache)
    a = signed_alive("node2", 1)
    for _ in range(5):
        assert claims.verify("node2", 1, CLAIM_ALIVE, 0, addr("node2"), EMPTY_METADATA, a.sig) is True
    assert (cache.misses, cache.hits) == (1, 4)
    assert claims.verify("node2", 2, CLAIM_ALIVE, 0, addr("node2"), EMPTY_METADATA, a.sig) is False
    assert claims.verify("stranger", 1, CLAIM_ALIVE, 0, addr("stranger"), EMPTY_METADATA, a.sig) is None
