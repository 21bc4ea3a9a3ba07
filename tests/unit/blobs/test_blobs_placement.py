"""Weighted rendezvous placement: stability, weights, zone spread, eligibility."""

from __future__ import annotations

import hashlib
import random

from cloudless.blobs.placement import PlacementPolicy, StorageMember, candidates, eligible, place

GIB = 1 << 30


def member(i: int, zone: str = "", capacity: int = 100 * GIB, **kw) -> StorageMember:
    return StorageMember(f"node-{i}", zone=zone, capacity_bytes=capacity, free_bytes=capacity, **kw)


def digests(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [hashlib.sha256(rng.randbytes(16)).hexdigest() for _ in range(n)]


def test_a_join_moves_only_about_r_over_n_of_the_chunks():
    """Rendezvous hashing's minimal disruption: a new member takes ~R/(n+1) of the placements."""
    ds = digests(4000)
    policy = PlacementPolicy(replicas=2)
    before_members = [member(i) for i in range(9)]
    after_members = [*before_members, member(9)]
    before = {d: set(place(d, before_members, policy)) for d in ds}
    after = {d: set(place(d, after_members, policy)) for d in ds}
    moved = sum(len(after[d] - before[d]) for d in ds)
    expected = 2 * len(ds) / 10
    assert 0.8 * expected < moved < 1.2 * expected
    # Every moved replica went to the new member: no reshuffling among old ones.
    assert all(after[d] - before[d] <= {"node-9"} for d in ds)


def test_a_leave_moves_only_the_leavers_chunks():
    ds = digests(3000, seed=1)
    members = [member(i) for i in range(8)]
    survivors = [m for m in members if m.node_id != "node-3"]
    for d in ds:
        before = place(d, members)
        after = place(d, survivors)
        kept = [n for n in before if n != "node-3"]
        assert set(kept) <= set(after)


def test_weights_are_respected_statistically():
    ds = digests(6000, seed=2)
    members = [member(0, capacity=100 * GIB), member(1, capacity=200 * GIB), member(2, capacity=300 * GIB)]
    firsts = [place(d, members, PlacementPolicy(replicas=1))[0] for d in ds]
    share = {m.node_id: firsts.count(m.node_id) / len(ds) for m in members}
    assert abs(share["node-0"] - 1 / 6) < 0.03
    assert abs(share["node-1"] - 2 / 6) < 0.03
    assert abs(share["node-2"] - 3 / 6) < 0.03


def test_replicas_spread_across_zones_when_possible():
    members = [member(i, zone="a") for i in range(5)] + [member(5, zone="b")]
    for d in digests(500, seed=3):
        chosen = place(d, members, PlacementPolicy(replicas=2))
        assert "node-5" in chosen, "the only zone-b member must hold one of two replicas"
    for d in digests(50, seed=4):
        chosen = place(d, members, PlacementPolicy(replicas=3))
        assert len(chosen) == 3 and len(set(chosen)) == 3


def test_ineligible_members_are_skipped_with_reasons():
    members = [
        member(0),
        member(1, power="battery"),
        member(2, metered=True),
        member(3, alive=False),
        StorageMember("node-4", capacity_bytes=100 * GIB, free_bytes=1),
    ]
    ok, rejected = eligible(members, PlacementPolicy())
    assert [m.node_id for m in ok] == ["node-0"]
    assert {r.node_id: r.reason for r in rejected} == {
        "node-1": "on battery",
        "node-2": "metered network",
        "node-3": "not alive",
        "node-4": f"free 1 < {GIB} bytes",
    }
    relaxed = PlacementPolicy(allow_battery=True, allow_metered=True)
    assert {m.node_id for m in eligible(members, relaxed)[0]} == {"node-0", "node-1", "node-2"}


def test_candidates_start_with_the_placement_and_list_every_eligible_member():
    members = [member(i, zone=str(i % 2)) for i in range(6)]
    for d in digests(20, seed=5):
        order = candidates(d, members)
        assert order[:2] == place(d, members)
        assert sorted(order) == sorted(m.node_id for m in members)


def test_placement_is_deterministic_and_order_independent():
    members = [member(i) for i in range(7)]
    shuffled = list(reversed(members))
    for d in digests(100, seed=6):
        assert place(d, members) == place(d, shuffled)
