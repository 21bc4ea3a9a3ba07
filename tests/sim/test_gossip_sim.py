"""Seeded whole-cluster simulations of SWIM + Lifeguard (virtual time, no trio).

Every assertion message carries the seed: rerun one with
`simulate(SimConfig(..., seed=S))` to reproduce it exactly."""

from __future__ import annotations

import pytest

from cloudless.testing.gossip_sim import GossipSimulation, SimConfig, simulate

SEEDS = range(24)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_crash_is_eventually_detected_by_every_live_member(seed):
    """SWIM §5 completeness: every failure is eventually known everywhere, even under 5% loss."""
    r = simulate(SimConfig(nodes=40, seed=seed, duration=45, loss=0.05, kills=3, joins=2))
    assert len(r.detect_all) == 3, f"seed={seed}"
    assert r.undetected == 0 and all(t is not None for t in r.detect_all), f"seed={seed} {r.summary()}"
    assert r.unconverged_joins == 0, f"seed={seed} {r.summary()}"


@pytest.mark.parametrize("seed", SEEDS)
def test_no_live_reachable_member_is_declared_dead_without_loss(seed):
    """Accuracy: with no loss and no stalls, only crashed members are ever declared dead;
    graceful leaves are seen as leaves and every view ends identical."""
    sim = GossipSimulation(SimConfig(nodes=50, seed=seed, duration=45, kills=3, joins=3, leaves=2))
    r = sim.run()
    assert r.false_positive_members == set(), f"seed={seed} {sorted(r.false_positive_members)}"
    assert all(t is not None for t in r.left_all), f"seed={seed} leave not seen by all"
    assert r.views_agree, f"seed={seed}: {r.disagreements} members disagree"


@pytest.mark.parametrize("seed", range(8))
def test_healed_partition_reconverges(seed):
    """Both halves declare each other dead during a 15 s partition; after it heals,
    reconnect attempts and refutations bring every view back to the full membership."""
    sim = GossipSimulation(SimConfig(nodes=40, seed=seed, duration=90, partitions=[(5.0, 20.0, 2)]))
    sim.start()
    sim.advance(19.5)
    assert not sim.views_agree(), f"seed={seed}: the partition went unnoticed"
    dead_seen = sum(1 for n in sim.nodes for m in n.core.members.rows.values() if m.state >= 2)
    assert dead_seen > 0, f"seed={seed}"
    sim.advance(60.0)
    assert sim.views_agree(), f"seed={seed}: views still differ 40 s after the heal"


def test_simulation_is_deterministic_per_seed():
    a = simulate(SimConfig(nodes=60, seed=7, duration=30, loss=0.02, kills=2, joins=2)).summary()
    b = simulate(SimConfig(nodes=60, seed=7, duration=30, loss=0.02, kills=2, joins=2)).summary()
    assert a == b


def test_sealed_packets_in_simulation_behave_like_plain_ones():
    r = simulate(SimConfig(nodes=30, seed=3, duration=30, loss=0.01, kills=2, joins=1, seal=True))
    assert r.undetected == 0 and r.unconverged_joins == 0 and not r.false_positive_members, r.summary()


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_lifeguard_spares_healthy_members_that_stalled_members_accuse(seed):
    """Lifeguard §5: slow members accuse healthy ones; with local health, suspicion
    confirmations and the buddy system those accusations are refuted in time."""
    cfg = dict(nodes=1000, seed=seed, duration=60, loss=0.05, stall_fraction=0.05, kills=5, joins=5)
    on = simulate(SimConfig(**cfg, lifeguard=True))
    off = simulate(SimConfig(**cfg, lifeguard=False))
    healthy_on = len(on.false_positive_members) - on.false_positives_stalled
    healthy_off = len(off.false_positive_members) - off.false_positives_stalled
    assert healthy_off > 0, f"seed={seed}: the scenario no longer provokes false positives"
    assert healthy_on * 10 <= healthy_off, f"seed={seed} on={healthy_on} off={healthy_off}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_large_cluster_detects_every_crash_fast(seed):
    r = simulate(SimConfig(nodes=1000, seed=seed, duration=60, loss=0.01, kills=10, joins=10))
    s = r.summary()
    assert r.undetected == 0 and r.unconverged_joins == 0, f"seed={seed} {s}"
    assert s["detect_all_p95_s"] < 8.0, f"seed={seed} {s}"
    assert not r.false_positive_members, f"seed={seed} {s}"


@pytest.mark.parametrize("seed", range(4))
def test_signed_claims_keep_every_guarantee_and_reject_nothing_honest(seed):
    """Issue 13: with every alive/leave signed by its member and verified by all,
    crashes, joins, graceful leaves and a healed partition behave as unsigned,
    and no honest claim is ever refused."""
    sim = GossipSimulation(
        SimConfig(nodes=50, seed=seed, duration=60, loss=0.02, kills=2, joins=3, leaves=2, signed=True)
    )
    r = sim.run()
    assert r.undetected == 0 and r.unconverged_joins == 0, f"seed={seed} {r.summary()}"
    assert all(t is not None for t in r.left_all), f"seed={seed} leave not seen by all"
    rejected = sum(n.core.stats["claims_rejected"] for n in sim.nodes)
    assert rejected == 0, f"seed={seed}: {rejected} honest claims refused"
    signed_rows = sum(len(n.core._sigs) for n in sim.nodes if n.up)
    assert signed_rows > 0, f"seed={seed}: no signature was ever kept"


def test_signed_partition_heals_through_signed_refutations():
    sim = GossipSimulation(SimConfig(nodes=30, seed=5, duration=80, partitions=[(5.0, 20.0, 2)], signed=True))
    sim.start()
    sim.advance(19.5)
    assert not sim.views_agree()
    sim.advance(60.0)
    assert sim.views_agree(), "views still differ 40 s after the heal"
    assert sum(n.core.stats["claims_rejected"] for n in sim.nodes) == 0
