"""AES-256-GCM packet sealing: rotation, tampering, replay, demultiplexing byte."""

from __future__ import annotations

import pytest

from cloudless.gossip.keyring import OVERHEAD, Keyring, KeyringError, PacketSealer, ReplayWindow, UnsealError, key_id
from cloudless.gossip.messages import MAX_DATAGRAM, MAX_PAYLOAD, SEAL_OVERHEAD

K1 = bytes(range(32))
K2 = bytes(range(1, 33))
K3 = bytes(range(2, 34))


def test_overhead_matches_the_size_budget_of_the_core():
    assert OVERHEAD == SEAL_OVERHEAD
    sealed = PacketSealer(Keyring(K1)).seal(b"x" * MAX_PAYLOAD)
    assert len(sealed) == MAX_DATAGRAM


def test_sealed_packets_never_look_like_quic():
    """RFC 9443 §5 demultiplexing: QUIC sets bit 0x40 of the first byte; we never do."""
    s = PacketSealer(Keyring(K1))
    for _ in range(50):
        assert s.seal(b"payload")[0] < 0x40


def test_round_trip_and_random_nonces():
    a, b = PacketSealer(Keyring(K1)), PacketSealer(Keyring(K1))
    p1, p2 = a.seal(b"hello"), a.seal(b"hello")
    assert p1[21:33] != p2[21:33]
    assert b.open(p1) == b"hello" and b.open(p2) == b"hello"


def test_rotation_secondary_keys_open_primary_seals():
    old = PacketSealer(Keyring(K1))
    rotating = PacketSealer(Keyring(K1, [K2]))  # new key installed, old still primary
    new = PacketSealer(Keyring(K2, [K1]))  # new key already primary
    assert rotating.open(new.seal(b"from-new")) == b"from-new"
    assert new.open(old.seal(b"from-old")) == b"from-old"
    rotating.keyring.use(K2)
    rotating.keyring.remove(K1)
    with pytest.raises(UnsealError) as err:
        rotating.open(old.seal(b"stale key"))
    assert err.value.reason == "unknown_key"
    assert rotating.dropped == {"unknown_key": 1}


def test_keyring_refuses_bad_keys_and_removing_the_primary():
    with pytest.raises(KeyringError):
        Keyring(b"short")
    ring = Keyring(K1, [K2])
    with pytest.raises(KeyringError):
        ring.remove(K1)
    with pytest.raises(KeyringError):
        ring.use(K3)


def test_tampered_packets_are_dropped_and_counted():
    a, b = PacketSealer(Keyring(K1)), PacketSealer(Keyring(K1))
    sealed = bytearray(a.seal(b"membership"))
    for pos in (1, 6, 15, 25, 40, len(sealed) - 1):
        forged = bytearray(sealed)
        forged[pos] ^= 0x01
        with pytest.raises(UnsealError):
            b.open(bytes(forged))
    with pytest.raises(UnsealError):
        b.open(b"\x01short")
    assert sum(b.dropped.values()) == 7
    assert b.dropped["tampered"] >= 4
    assert b.open(bytes(sealed)) == b"membership"  # the genuine one still passes


def test_wrong_cluster_key_is_unauthenticated():
    with pytest.raises(UnsealError):
        PacketSealer(Keyring(K2)).open(PacketSealer(Keyring(K1)).seal(b"x"))


def test_replayed_packets_are_dropped_reordered_ones_accepted():
    a, b = PacketSealer(Keyring(K1)), PacketSealer(Keyring(K1))
    packets = [a.seal(bytes([i])) for i in range(10)]
    for p in reversed(packets):  # reordering within the window is fine
        b.open(p)
    for p in packets:
        with pytest.raises(UnsealError) as err:
            b.open(p)
        assert err.value.reason == "replayed"
    assert b.dropped["replayed"] == 10


def test_replay_window_rejects_packets_older_than_the_window():
    w = ReplayWindow()
    assert w.check_and_record(b"s", 5000)
    assert not w.check_and_record(b"s", 5000 - 1024)
    assert w.check_and_record(b"s", 5000 - 1023)
    assert not w.check_and_record(b"s", 5000 - 1023)


def test_replay_window_memory_is_bounded():
    w = ReplayWindow(max_senders=100)
    for i in range(1000):
        w.check_and_record(i.to_bytes(8, "big"), 1)
    assert len(w._senders) == 100


def test_replace_rotates_and_a_dropped_key_no_longer_opens():
    old, new = b"o" * 32, b"n" * 32
    stale = PacketSealer(Keyring(old), sender_id=b"S" * 8)  # a removed node kept the old key
    ring = Keyring(old)
    member = PacketSealer(ring, sender_id=b"M" * 8)
    ring.replace([new, old])  # rotation: seal with the new key, still open the old
    assert member.keyring.primary_id == key_id(new)
    assert PacketSealer(Keyring(new)).open(member.seal(b"current")) == b"current"
    with pytest.raises(UnsealError):
        stale.open(member.seal(b"current"))  # the old key does not open current packets
    assert member.open(stale.seal(b"late")) == b"late"
    ring.replace([new])  # the overlap is over
    with pytest.raises(UnsealError) as info:
        member.open(stale.seal(b"injected"))
    assert info.value.reason == "unknown_key"
    with pytest.raises(KeyringError):
        ring.replace([new, b"short"])
    assert ring.key_ids == [key_id(new)]  # a bad replacement changed nothing
