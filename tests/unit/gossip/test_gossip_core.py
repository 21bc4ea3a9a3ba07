"""Rules of the SWIM + Lifeguard core, one at a time, by stepping cores by hand."""

from __future__ import annotations

import math
import random

import pytest

from cloudless.gossip import messages as wire
from cloudless.gossip.core import GossipConfig, GossipCore
from cloudless.gossip.events import (
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberSuspect,
    MemberUpdated,
    PushPull,
    StreamProbe,
)
from cloudless.gossip.members import ALIVE, DEAD, LEFT, SUSPECT
from cloudless.gossip.messages import Ack, Alive, Dead, IndirectPing, MalformedPacket, Nack, Ping, Suspect
from cloudless.gossip.metadata import EMPTY_METADATA, Metadata, MetadataTooLarge


def addr(name: str) -> str:
    return f"{name}:7946"


def make(name: str, peers: list[str], config: GossipConfig = GossipConfig(), now: float = 0.0) -> GossipCore:
    core = GossipCore(name, addr(name), rng=random.Random(name), now=now, config=config)
    core.bootstrap_members([Alive(0, p, addr(p), 0, EMPTY_METADATA) for p in peers], now)
    return core


def packet(*msgs) -> bytes:
    return wire.pack([wire.encode(m) for m in msgs])


def sent(core: GossipCore) -> list[tuple[str, list]]:
    return [(a, wire.decode_packet(p)) for a, p in core.packets_to_send()]


def all_msgs(core: GossipCore, kind=None) -> list:
    out = [m for _, msgs in sent(core) for m in msgs]
    return [m for m in out if kind is None or isinstance(m, kind)]


PEERS = [f"p{i}" for i in range(9)]


# ----------------------------------------------------------- SWIM §4.2 incarnations


def test_suspicion_about_ourselves_is_refuted_with_a_higher_incarnation():
    core = make("me", PEERS)
    core.receive(packet(Suspect(0, "me", "p1")), addr("p1"), 1.0)
    assert core.incarnation == 1
    core.handle_timer(5.0)  # gossip round
    alives = [m for m in all_msgs(core, Alive) if m.node == "me"]
    assert alives and alives[0].incarnation == 1


def test_dead_declaration_about_ourselves_is_refuted():
    core = make("me", PEERS)
    core.receive(packet(Dead(3, "me", "p1")), addr("p1"), 1.0)
    assert core.incarnation == 4


def test_incarnation_ordering_alive_suspect_dead():
    core = make("me", PEERS)
    core.receive(packet(Alive(2, "p1", addr("p1"), 0, EMPTY_METADATA)), addr("p1"), 0.1)
    assert core.member("p1").incarnation == 2
    core.receive(packet(Suspect(1, "p1", "p2")), addr("p2"), 0.2)  # stale: ignored
    assert core.member("p1").state == ALIVE
    core.receive(packet(Suspect(2, "p1", "p2")), addr("p2"), 0.3)
    assert core.member("p1").state == SUSPECT
    core.receive(
        packet(Alive(2, "p1", addr("p1"), 0, EMPTY_METADATA)), addr("p1"), 0.4
    )  # same incarnation: no refutation
    assert core.member("p1").state == SUSPECT
    core.receive(packet(Alive(3, "p1", addr("p1"), 0, EMPTY_METADATA)), addr("p1"), 0.5)
    assert core.member("p1").state == ALIVE
    core.receive(packet(Dead(2, "p1", "p2")), addr("p2"), 0.6)  # older than the refutation
    assert core.member("p1").state == ALIVE
    kinds = [type(e) for e in core.events()]
    assert kinds == [MemberSuspect, MemberAlive]
    core.receive(packet(Dead(3, "p1", "p2")), addr("p2"), 0.7)
    assert core.member("p1").state == DEAD
    assert isinstance(core.next_event(), MemberDead)
    # A restarted member comes back with a higher incarnation: it rejoined.
    core.receive(packet(Alive(4, "p1", "10.0.0.9:7946", 0, EMPTY_METADATA)), addr("p1"), 0.8)
    assert core.member("p1").state == ALIVE and core.member("p1").addr == "10.0.0.9:7946"
    assert isinstance(core.next_event(), MemberJoined)


def test_graceful_leave_is_reported_as_left_not_dead():
    core = make("me", PEERS)
    core.receive(packet(Dead(0, "p3", "p3")), addr("p3"), 1.0)
    assert core.member("p3").state == LEFT
    assert core.events() == [MemberLeft("p3")]


def test_leave_announces_immediately_and_stops_probing():
    core = make("me", PEERS)
    core.leave(1.0)
    msgs = all_msgs(core, Dead)
    assert msgs and all(m.node == "me" and m.source == "me" for m in msgs)
    assert core.leave_announced
    core.handle_timer(10.0)
    assert not all_msgs(core, Ping)
    core.receive(packet(Suspect(0, "me", "p1")), addr("p1"), 11.0)
    assert core.incarnation == 0  # a leaving member does not refute


# ------------------------------------------------------------- SWIM §4 probing


def probe_cycle_start(core: GossipCore) -> tuple[str, Ping, list]:
    core.handle_timer(core.next_deadline())
    out = sent(core)
    pings = [(a, m, msgs) for a, msgs in out for m in msgs if isinstance(m, Ping)]
    assert len(pings) == 1
    return pings[0]


def test_probe_round_robin_visits_every_member_once_per_round():
    core = make("me", PEERS)
    seen = []
    for _ in range(len(PEERS)):
        a, ping, _ = probe_cycle_start(core)
        core.receive(packet(Ack(ping.seq)), a, core._now + 0.01)
        seen.append(ping.target)
    assert sorted(seen) == sorted(PEERS)


def test_missed_ack_leads_to_indirect_probes_stream_fallback_then_suspicion():
    cfg = GossipConfig(indirect_checks=3)
    core = make("me", PEERS, cfg)
    _a, ping, _ = probe_cycle_start(core)
    t0 = core._now
    core.handle_timer(t0 + cfg.probe_timeout)
    ind = all_msgs(core, IndirectPing)
    assert len(ind) == 3 and all(m.target == ping.target and m.nack for m in ind)
    effects = core.effects_to_run()
    assert StreamProbe(addr(ping.target), ping.target, ping.seq) in effects
    core.handle_timer(t0 + cfg.probe_interval)
    assert core.member(ping.target).state == SUSPECT
    ev = core.events()
    assert MemberSuspect(ping.target, 0, "me") in ev


def test_indirect_ack_or_stream_probe_prevents_suspicion():
    cfg = GossipConfig()
    core = make("me", PEERS, cfg)
    _, ping, _ = probe_cycle_start(core)
    t0 = core._now
    core.handle_timer(t0 + cfg.probe_timeout)
    core.packets_to_send()
    core.receive(packet(Ack(ping.seq)), addr("p5"), t0 + cfg.probe_timeout + 0.05)  # relayed ack
    core.handle_timer(t0 + cfg.probe_interval)
    assert core.member(ping.target).state == ALIVE

    _a, ping, _ = probe_cycle_start(core)
    t0 = core._now
    core.handle_timer(t0 + cfg.probe_timeout)
    core.stream_probe_result(ping.seq, True, t0 + cfg.probe_timeout + 0.05)
    core.handle_timer(t0 + cfg.probe_interval)
    assert core.member(ping.target).state == ALIVE


def test_relay_forwards_ack_and_sends_nack_when_target_is_silent():
    """Lifeguard §4.1: the relay tells the prober it is alive even if the target is not."""
    cfg = GossipConfig()
    relay = make("relay", ["src", "tgt"], cfg)
    relay.receive(packet(IndirectPing(77, "tgt", addr("tgt"), "src", addr("src"), True)), addr("src"), 1.0)
    ((to, msgs),) = sent(relay)
    fwd = msgs[0]
    assert to == addr("tgt") and isinstance(fwd, Ping) and fwd.target == "tgt"
    relay.handle_timer(1.0 + cfg.probe_timeout * 0.8)
    nacks = [(a, m) for a, msgs in sent(relay) for m in msgs if isinstance(m, Nack)]
    assert nacks == [(addr("src"), Nack(77))]
    relay.receive(packet(Ack(fwd.seq)), addr("tgt"), 1.2)
    acks = [(a, m) for a, msgs in sent(relay) for m in msgs if isinstance(m, Ack)]
    assert acks == [(addr("src"), Ack(77))]


def test_ping_for_another_name_is_not_acked():
    core = make("me", PEERS)
    core.receive(packet(Ping(5, "someone-else", "p1", addr("p1"))), addr("p1"), 1.0)
    assert not all_msgs(core, Ack)
    core.receive(packet(Ping(6, "me", "p1", addr("p1"))), addr("p1"), 1.0)
    assert all_msgs(core, Ack) == [Ack(6)]


def test_buddy_system_piggybacks_the_suspicion_on_the_probe_to_the_suspect():
    """Lifeguard §4.3: the suspect hears about it first, from whoever probes it."""
    core = make("me", ["p1"])
    core.receive(packet(Suspect(0, "p1", "p2")), addr("p2"), 0.5)
    core.packets_to_send()
    _, ping, msgs = probe_cycle_start(core)
    assert ping.target == "p1"
    assert any(isinstance(m, Suspect) and m.node == "p1" for m in msgs)


def _pings(core: GossipCore) -> list[tuple[str, Ping, list]]:
    return [(a, m, msgs) for a, msgs in sent(core) for m in msgs if isinstance(m, Ping)]


def test_transport_hint_probes_that_member_now_and_never_suspects_by_itself():
    cfg = GossipConfig()
    core = make("me", PEERS, cfg)
    a, ping, _ = probe_cycle_start(core)  # a regular probe, answered
    core.receive(packet(Ack(ping.seq)), a, core._now + 0.01)
    target = next(p for p in PEERS if p != ping.target)
    t = core._now + 0.02
    assert core.hint_unreachable(target, t)
    assert core.next_deadline() <= t  # not a whole probe interval later
    core.handle_timer(t)
    ((to, hinted, _),) = _pings(core)
    assert hinted.target == target and to == addr(target)
    core.receive(packet(Ack(hinted.seq)), to, t + 0.01)
    core.handle_timer(t + cfg.probe_interval)
    assert core.member(target).state == ALIVE  # it answered: the hint changed nothing
    assert not [e for e in core.events() if isinstance(e, MemberSuspect)]


def test_transport_hint_waits_for_the_probe_in_flight_and_then_fails_like_any_probe():
    cfg = GossipConfig()
    core = make("me", PEERS, cfg)
    a, ping, _ = probe_cycle_start(core)
    t0 = core._now
    target = next(p for p in PEERS if p != ping.target)
    assert core.hint_unreachable(target, t0 + 0.01)
    core.handle_timer(t0 + cfg.probe_timeout)  # the probe in flight goes indirect, is not cut short
    assert not [m for _, m, _ in _pings(core) if m.target == target]
    core.receive(packet(Ack(ping.seq)), a, t0 + cfg.probe_timeout + 0.01)
    assert core.next_deadline() <= t0 + cfg.probe_interval
    core.handle_timer(t0 + cfg.probe_interval)
    ((_, hinted, _),) = _pings(core)
    assert hinted.target == target
    t1 = t0 + cfg.probe_interval
    core.handle_timer(t1 + cfg.probe_timeout)
    core.handle_timer(t1 + cfg.probe_interval)
    assert core.member(target).state == SUSPECT


def test_transport_hints_are_rate_limited_and_ignore_unknown_dead_and_self():
    cfg = GossipConfig()
    core = make("me", PEERS, cfg)
    assert core.hint_unreachable("p1", 1.0)
    assert not core.hint_unreachable("p1", 1.0 + cfg.probe_interval / 2)  # already waiting
    core.handle_timer(1.0 + cfg.probe_interval / 2)
    assert not core.hint_unreachable("p1", 1.0 + cfg.probe_interval * 0.9)  # asked within an interval
    assert not core.hint_unreachable("me", 2.0)
    assert not core.hint_unreachable("stranger", 2.0)
    core.receive(packet(Dead(0, "p2", "p3")), addr("p3"), 2.0)
    assert not core.hint_unreachable("p2", 2.0)


def test_hearing_a_suspicion_in_a_small_cluster_probes_the_suspect_at_once_with_the_buddy_message():
    """Independent confirmations (Lifeguard §4.2) sooner than the suspect's turn in the
    round-robin order; the probe carries the suspicion to the suspect (§4.3)."""
    cfg = GossipConfig()
    core = make("me", ["p1", "p2", "p3", "p4"], cfg)
    core.handle_timer(0.0)
    core.packets_to_send()
    core.receive(packet(Suspect(0, "p1", "p2")), addr("p2"), 0.05)
    p = core._probe
    at = p.end if p is not None else 0.05
    assert core.next_deadline() <= at
    if p is not None and p.target.name != "p1":
        core.receive(packet(Ack(p.seq)), addr(p.target.name), 0.06)
    core.handle_timer(at)
    pings = [(m, msgs) for _, m, msgs in _pings(core) if m.target == "p1"]
    assert pings and any(isinstance(x, Suspect) and x.node == "p1" for x in pings[0][1])


def test_in_a_large_cluster_only_a_few_members_probe_a_suspect_out_of_turn():
    """No herd: about 2 x expected confirmations of n members probe early."""
    cfg = GossipConfig()
    peers = [f"p{i}" for i in range(500)]
    early = 0
    trials = 300
    for seed in range(trials):
        core = GossipCore("me", addr("me"), rng=random.Random(seed), now=0.0, config=cfg)
        core.bootstrap_members([Alive(0, p, addr(p), 0, EMPTY_METADATA) for p in peers], 0.0)
        core.receive(packet(Suspect(0, "p1", "p2")), addr("p2"), 1.0)
        early += "p1" in core._early
    expected_rate = 2 * cfg.expected_confirmations / (len(peers) + 1 - 2)
    assert 0 < early < trials * expected_rate * 3


# ------------------------------------------------ Lifeguard §4.1 local health


def test_awareness_rises_with_missed_nacks_and_stretches_probing():
    cfg = GossipConfig()
    core = make("me", PEERS, cfg)
    assert core.awareness.score == 0
    a, ping, _ = probe_cycle_start(core)
    t0 = core._now
    core.handle_timer(t0 + cfg.probe_timeout)  # 3 indirect probes, 3 nacks expected
    core.receive(packet(Nack(ping.seq)), addr("p1"), t0 + 0.2)  # one arrives
    core.packets_to_send()
    core.handle_timer(t0 + cfg.probe_interval)
    assert core.awareness.score == 2
    # The next probe (started in the same step) is stretched by score + 1.
    t1 = t0 + cfg.probe_interval
    ((a, ping),) = [(a, m) for a, msgs in sent(core) for m in msgs if isinstance(m, Ping)]
    assert core._probe.start == t1
    assert core._probe.ack_deadline == pytest.approx(t1 + 3 * cfg.probe_timeout)
    assert core._next_probe == pytest.approx(t1 + 3 * cfg.probe_interval)
    core.receive(packet(Ack(ping.seq)), a, t1 + 0.01)
    assert core.awareness.score == 1  # a successful probe heals one step


def test_awareness_is_capped_and_refutation_counts():
    cfg = GossipConfig(awareness_max=4)
    core = make("me", PEERS, cfg)
    for k in range(10):
        core.receive(packet(Suspect(core.incarnation, "me", "p1")), addr("p1"), 1.0 + k)
    assert core.awareness.score == 3
    assert core.awareness.multiplier == 4


def test_lifeguard_off_disables_awareness_nacks_and_buddy():
    cfg = GossipConfig(lifeguard=False)
    core = make("me", PEERS, cfg)
    _a, _ping, _ = probe_cycle_start(core)
    core.handle_timer(core._now + cfg.probe_timeout)
    assert all(not m.nack for m in all_msgs(core, IndirectPing))
    core.handle_timer(core._now + cfg.probe_interval)
    assert core.awareness.score == 0


# ---------------------------------------------- Lifeguard §4.2 suspicion timeouts


def test_suspicion_deadline_shrinks_with_independent_confirmations():
    cfg = GossipConfig()
    peers = [f"p{i}" for i in range(99)]
    core = make("me", peers, cfg)
    core.receive(packet(Suspect(0, "p1", "p2")), addr("p2"), 10.0)
    s = core._suspicions["p1"]
    first = s.deadline
    assert first == pytest.approx(10.0 + s.max_timeout, abs=0.002)
    deadlines = [first]
    for src in ("p3", "p3", "p4", "p5"):
        core.receive(packet(Suspect(0, "p1", src)), addr(src), 10.5)
        deadlines.append(s.deadline)
    assert deadlines[1] < deadlines[0]
    assert deadlines[2] == deadlines[1]  # the same accuser twice is one confirmation
    assert deadlines[3] < deadlines[2]
    assert deadlines[4] == pytest.approx(10.0 + s.min_timeout, abs=0.002)
    core.handle_timer(deadlines[4] - 0.01)
    assert core.member("p1").state == SUSPECT
    core.handle_timer(deadlines[4])
    assert core.member("p1").state == DEAD
    assert any(isinstance(e, MemberDead) and e.source == "me" for e in core.events())


def test_suspicion_timeout_is_fixed_without_lifeguard():
    core = make("me", [f"p{i}" for i in range(99)], GossipConfig(lifeguard=False))
    core.receive(packet(Suspect(0, "p1", "p2")), addr("p2"), 10.0)
    s = core._suspicions["p1"]
    assert s.deadline == pytest.approx(10.0 + s.min_timeout)
    core.receive(packet(Suspect(0, "p1", "p3")), addr("p3"), 10.1)
    assert s.deadline == pytest.approx(10.0 + s.min_timeout)


def test_refutation_cancels_the_suspicion_timer():
    core = make("me", PEERS)
    core.receive(packet(Suspect(0, "p1", "p2")), addr("p2"), 1.0)
    core.receive(packet(Alive(1, "p1", addr("p1"), 0, EMPTY_METADATA)), addr("p1"), 1.1)
    assert "p1" not in core._suspicions
    core.handle_timer(100.0)
    assert core.member("p1").state == ALIVE


# ------------------------------------------------ SWIM §4.1 dissemination


def test_each_update_is_retransmitted_at_most_lambda_log_n_times():
    cfg = GossipConfig(retransmit_mult=3)
    peers = [f"p{i}" for i in range(30)]
    core = make("me", peers, cfg)
    core.receive(packet(Dead(0, "p1", "p2")), addr("p2"), 0.0)
    core.packets_to_send()
    limit = 3 * math.ceil(math.log10(31 - 1 + 1))  # 30 live members (p1 is dead now)
    copies = 0
    t = 0.0
    for _ in range(100):
        t += cfg.gossip_interval
        core.handle_timer(t)
        copies += sum(1 for m in all_msgs(core, Dead) if m.node == "p1")
    assert copies == limit


def test_compound_packets_pack_many_updates_and_fit_a_datagram():
    cfg = GossipConfig()
    peers = [f"member-with-a-long-name-{i:04d}" for i in range(200)]
    core = make("me", peers, cfg)
    for i, p in enumerate(peers):
        core.receive(packet(Suspect(0, p, "other")), addr("other"), 0.01 * i)
    core.packets_to_send()
    core.handle_timer(3.0)
    out = core.packets_to_send()
    assert out
    for _, p in out:
        assert len(p) <= wire.MAX_PAYLOAD
        assert len(p) + wire.SEAL_OVERHEAD <= wire.MAX_DATAGRAM
    assert max(len(wire.decode_packet(p)) for _, p in out) > 15


def test_malformed_packet_raises_and_changes_nothing():
    core = make("me", PEERS)
    with pytest.raises(MalformedPacket):
        core.receive(b"\x91\x93\x63\x01\x02", addr("p1"), 1.0)
    with pytest.raises(MalformedPacket):
        core.receive(b"garbage", addr("p1"), 1.0)
    with pytest.raises(MalformedPacket):  # validation: negative incarnation
        core.receive(packet(Suspect(0, "p1", "p2")).replace(b"\x00", b"\xff", 1), addr("p1"), 1.0)
    assert core.member("p1").state == ALIVE and not core.events()


# ------------------------------------------------------------ metadata


def test_metadata_update_spreads_with_a_versioned_counter():
    a = make("a", ["b"])
    b = make("b", ["a"])
    meta = Metadata(
        region="eu-west",
        zone="z1",
        labels={"gpu": "no"},
        power="battery",
        battery_percent=55,
        network="wifi",
        metered=True,
    )
    a.update_metadata(meta, 1.0)
    a.handle_timer(1.5)
    for _, p in a.packets_to_send():
        b.receive(p, addr("a"), 1.6)
    assert b.member("a").meta == meta and b.member("a").meta_version == 1
    assert MemberUpdated("a", addr("a"), meta) in b.events()
    # An older version arriving late does not roll it back.
    b.receive(packet(Alive(0, "a", addr("a"), 0, EMPTY_METADATA)), addr("c"), 2.0)
    assert b.member("a").meta == meta


def test_metadata_too_large_is_rejected():
    core = make("me", [])
    with pytest.raises(MetadataTooLarge):
        core.update_metadata(Metadata(labels={f"k{i}": "v" * 40 for i in range(20)}), 1.0)
    assert core.meta_version == 0


# ----------------------------------------------- join, push-pull, tombstones


def test_join_through_a_seed_exchanges_full_state_and_spreads_the_joiner():
    seed = make("seed", PEERS)
    joiner = GossipCore("new", addr("new"), rng=random.Random(1), now=0.0)
    joiner.join([addr("seed")], 0.0)
    (eff,) = [e for e in joiner.effects_to_run() if isinstance(e, PushPull)]
    assert eff.join and eff.addr == addr("seed")
    reply = seed.handle_push_pull(eff.payload, 0.01)
    assert any(isinstance(e, MemberJoined) and e.name == "new" for e in seed.events())
    joiner.stream_exchange_result(eff.addr, reply, 0.02)
    assert {m.name for m in joiner.live_members()} == {"new", "seed", *PEERS}
    # The seed gossips the joiner on; second-hand rows are not re-gossiped.
    seed.handle_timer(1.0)
    alive_nodes = {m.node for m in all_msgs(seed, Alive)}
    assert alive_nodes == {"new"}


def test_push_pull_merge_turns_remote_dead_into_suspicion_and_left_into_left():
    a = make("a", PEERS)
    b = make("b", PEERS)
    b.receive(packet(Dead(0, "p1", "p2"), Dead(0, "p3", "p3")), addr("p2"), 1.0)
    payload = b._state_payload(join=False)
    a.handle_push_pull(payload, 2.0)
    assert a.member("p1").state == SUSPECT
    assert a.member("p3").state == LEFT


def test_tombstones_are_reaped_after_their_ttl():
    cfg = GossipConfig(tombstone_ttl=20.0)
    core = make("me", PEERS, cfg)
    core.receive(packet(Dead(0, "p1", "p2")), addr("p2"), 1.0)
    core.handle_timer(15.0)
    assert core.member("p1") is not None
    core.handle_timer(25.0)
    core.handle_timer(31.0)
    assert core.member("p1") is None


def test_reconnect_tries_a_dead_member_over_a_stream():
    cfg = GossipConfig(reconnect_interval=5.0)
    core = make("me", PEERS, cfg)
    core.receive(packet(Dead(0, "p1", "p2")), addr("p2"), 1.0)
    core.handle_timer(20.0)
    pps = [e for e in core.effects_to_run() if isinstance(e, PushPull)]
    assert any(e.addr == addr("p1") for e in pps)


def test_next_deadline_is_always_in_the_future_of_handled_work():
    core = make("me", PEERS)
    t = 0.0
    for _ in range(200):
        d = core.next_deadline()
        assert d is not None and d >= t - 1e-9
        t = d
        core.handle_timer(t)
        for a, p in core.packets_to_send():
            for m in wire.decode_packet(p):
                if isinstance(m, Ping):
                    core.receive(packet(Ack(m.seq)), a, t + 0.002)
    assert t > 30.0


# ------------------------------- Lifeguard §4.1: a member that stalled distrusts its timers


def stalled_core(lifeguard: bool) -> GossipCore:
    core = make("me", [f"p{i}" for i in range(30)], GossipConfig(lifeguard=lifeguard))
    core.receive(packet(Suspect(0, "p1", "p2")), addr("p2"), 1.0)
    core.packets_to_send()
    return core


def test_after_a_stall_expired_suspicions_wait_for_the_backlog():
    core = stalled_core(lifeguard=True)
    core.handle_timer(6.0)  # the process was not scheduled for 5 s
    assert core.member("p1").state == SUSPECT  # no verdict from a clock we overslept
    core.receive(packet(Alive(1, "p1", addr("p1"), 0, EMPTY_METADATA)), addr("p1"), 6.001)  # the backlog
    core.handle_timer(8.0)
    assert core.member("p1").state == ALIVE
    assert not [e for e in core.events() if isinstance(e, MemberDead)]
    assert core.awareness.score >= 1


def test_without_lifeguard_a_stalled_member_declares_others_dead_on_waking():
    core = stalled_core(lifeguard=False)
    core.handle_timer(6.0)
    assert core.member("p1").state == DEAD
