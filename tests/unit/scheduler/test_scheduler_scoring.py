"""Scoring: affinities, anti-affinity, spreads, device awareness, cost, utilization and weights
pull placements the way they should, and explanations show each scorer's part."""

from __future__ import annotations

from collections import Counter

import pytest

from cloudless.scheduler import ClusterView, NodeInfo, SchedulerConfig, Weights, plan_placements
from cloudless.scheduler.rank import reliability_score, spread_score
from cloudless.state.workload import (
    Affinity,
    Allocation,
    AntiAffinity,
    Resources,
    Spread,
    SpreadTarget,
    WorkloadSpec,
    validate,
)

GiB = 1 << 30
NO_DEFAULT_SPREAD = SchedulerConfig(default_node_spread_weight=0)


def node(name: str, **kw) -> NodeInfo:
    kw.setdefault("cpu_millis", 4000)
    kw.setdefault("memory_bytes", 8 * GiB)
    kw.setdefault("uptime_s", 86400.0)
    return NodeInfo(node_id=name, **kw)


def spec(**kw) -> WorkloadSpec:
    kw.setdefault("name", "web")
    kw.setdefault("image", "registry.local/web:1")
    return validate(WorkloadSpec(**kw))


def alloc(workload: str, node_id: str, replica: int = 0, **kw) -> Allocation:
    return Allocation(
        id=f"{workload}-{replica}-{node_id}",
        workload=workload,
        version=0,
        node=node_id,
        replica=replica,
        state="running",
        **kw,
    )


def placed(s: WorkloadSpec, view: ClusterView, count: int | None = None, **kw) -> list[str]:
    plan = plan_placements(s, s.replicas if count is None else count, view, **kw)
    assert not plan.failures, plan.explain()
    return [p.node for p in plan.placements]


# ---------------------------------------------------------------- locality


def test_positive_affinity_prefers_matching_nodes():
    view = ClusterView([node(f"n{i}", zone="a" if i == 7 else "b") for i in range(10)])
    s = spec(affinities=(Affinity("node.zone", "=", "a", 50),))
    plan = plan_placements(s, 1, view)
    assert plan.placements[0].node == "n7"
    assert plan.placements[0].components["locality"] == 1.0


def test_negative_affinity_avoids_matching_nodes_without_forbidding_them():
    view = ClusterView([node("gpu", labels={"gpu": "x"}), node("plain")])
    s = spec(affinities=(Affinity("label.gpu", "exists", "", -80),))
    assert placed(s, view, 1) == ["plain"]
    only_gpu = ClusterView([node("gpu", labels={"gpu": "x"})])
    assert placed(s, only_gpu, 1) == ["gpu"]


def test_heavier_affinity_wins_over_lighter_one():
    view = ClusterView(
        [
            node("ac", power="ac", zone="b"),
            node("zone-a", power="battery", battery_percent=100, charging=True, zone="a"),
        ]
    )
    s = spec(affinities=(Affinity("node.zone", "=", "a", 10), Affinity("node.power", "=", "ac", 90)))
    assert placed(s, view, 1) == ["ac"]


# ---------------------------------------------------------------- reliability (device awareness)


def test_mains_pc_beats_a_phone_on_battery():
    view = ClusterView(
        [
            node("phone", device_class="phone", power="battery", battery_percent=90, network="wifi"),
            node("pc", device_class="pc", power="ac", network="wired"),
        ]
    )
    plan = plan_placements(spec(), 1, view)
    assert plan.placements[0].node == "pc"
    assert reliability_score(view.nodes[view.index["pc"]]) > reliability_score(view.nodes[view.index["phone"]])


def test_metered_cellular_link_scores_below_wifi():
    view = ClusterView([node("cell", network="cellular", metered=True), node("wifi", network="wifi")])
    assert placed(spec(), view, 1) == ["wifi"]


def test_charging_battery_beats_draining_battery_and_fuller_beats_emptier():
    a = node("a", power="battery", battery_percent=50, charging=True)
    b = node("b", power="battery", battery_percent=50, charging=False)
    c = node("c", power="battery", battery_percent=15)
    assert reliability_score(a) > reliability_score(b) > reliability_score(c)
    assert placed(spec(), ClusterView([c, b, a]), 1) == ["a"]


def test_flapping_and_fresh_nodes_score_below_stable_ones():
    stable = node("stable", flaps=0, uptime_s=3 * 86400)
    flappy = node("flappy", flaps=4, uptime_s=3 * 86400)
    fresh = node("fresh", flaps=0, uptime_s=30)
    assert reliability_score(stable) > reliability_score(flappy)
    assert reliability_score(stable) > reliability_score(fresh)
    assert placed(spec(), ClusterView([flappy, fresh, stable]), 1) == ["stable"]
    assert 0.0 <= reliability_score(flappy) <= 1.0


def test_a_replica_set_lands_on_mains_devices_before_phones():
    nodes = [node(f"pc{i}", device_class="pc") for i in range(3)]
    nodes += [
        node(f"phone{i}", device_class="phone", power="battery", battery_percent=70, network="cellular", metered=True)
        for i in range(3)
    ]
    got = placed(spec(replicas=3, spreads=(Spread("node", max_per=1),)), ClusterView(nodes))
    assert sorted(got) == ["pc0", "pc1", "pc2"]


# ---------------------------------------------------------------- cost


def test_cost_label_prefers_cheaper_and_unpriced_devices():
    view = ClusterView([node("pricey", labels={"cost": "0.40"}), node("cheap", labels={"cost": "0.05"}), node("owned")])
    got = placed(spec(replicas=3, spreads=(Spread("node", max_per=1),)), view)
    assert got == ["owned", "cheap", "pricey"]
    plan = plan_placements(spec(), 1, view)
    assert plan.placements[0].components["cost"] == 1.0


def test_cost_scorer_is_left_out_when_no_node_is_priced():
    plan = plan_placements(spec(), 1, ClusterView([node("a"), node("b", labels={"cost": "n/a"})]))
    assert "cost" not in plan.placements[0].components


def test_cost_label_name_is_configurable():
    view = ClusterView([node("a", labels={"price": "1"}), node("b", labels={"price": "0.1"})])
    config = SchedulerConfig(cost_label="price", weights=Weights(cost=5.0))
    assert placed(spec(), view, 1, config=config) == ["b"]


# ---------------------------------------------------------------- utilization


def _loaded_view() -> ClusterView:
    return ClusterView(
        [node("busy"), node("idle")],
        [alloc("other", "busy", resources=Resources(cpu_millis=2000, memory_bytes=4 * GiB))],
    )


def test_binpack_fills_the_busier_node_and_spread_mode_the_idler_one():
    s = spec()
    assert placed(s, _loaded_view(), 1, config=NO_DEFAULT_SPREAD) == ["busy"]
    spread_mode = SchedulerConfig(utilization="spread", default_node_spread_weight=0)
    assert placed(s, _loaded_view(), 1, config=spread_mode) == ["idle"]


def test_binpack_packs_replicas_until_the_node_is_full():
    view = ClusterView([node("a", cpu_millis=1000), node("b", cpu_millis=1000)])
    s = spec(replicas=4, resources=Resources(cpu_millis=500, memory_bytes=GiB))
    got = placed(s, view, config=NO_DEFAULT_SPREAD)
    assert got[0] == got[1] and got[2] == got[3] and got[0] != got[2]


def test_default_node_spread_keeps_replicas_apart_under_binpack():
    view = ClusterView([node(n) for n in "abcd"])
    got = placed(spec(replicas=4), view)
    assert sorted(got) == ["a", "b", "c", "d"]


def test_weights_change_the_outcome():
    view = ClusterView(
        [node("reliable-busy"), node("flaky-idle", flaps=5)],
        [alloc("other", "reliable-busy", resources=Resources(cpu_millis=3000, memory_bytes=6 * GiB))],
    )
    s = spec()
    by_reliability = SchedulerConfig(utilization="spread", weights=Weights(reliability=5.0, utilization=0.1))
    by_room = SchedulerConfig(utilization="spread", weights=Weights(reliability=0.1, utilization=5.0))
    assert placed(s, view, 1, config=by_reliability) == ["reliable-busy"]
    assert placed(s, view, 1, config=by_room) == ["flaky-idle"]


# ---------------------------------------------------------------- spread and anti-affinity


def test_even_spread_per_zone():
    view = ClusterView([node(f"{z}{i}", zone=z) for z in "abc" for i in range(4)])
    got = placed(spec(replicas=9, spreads=(Spread("node.zone"),)), view)
    zones = Counter(view.nodes[view.index[n]].zone for n in got)
    assert zones == {"a": 3, "b": 3, "c": 3}


def test_spread_per_zone_counts_replicas_that_already_run():
    view = ClusterView(
        [node(f"{z}{i}", zone=z) for z in "ab" for i in range(3)],
        [alloc("web", "a0", 0), alloc("web", "a1", 1)],
    )
    got = placed(spec(replicas=4, spreads=(Spread("node.zone"),)), view, 2)
    assert all(n.startswith("b") for n in got)


def test_spread_targets_follow_percentages():
    view = ClusterView([node(f"{z}{i}", zone=z) for z in "ab" for i in range(10)])
    s = spec(
        replicas=10, spreads=(Spread("node.zone", weight=100, targets=(SpreadTarget("a", 70), SpreadTarget("b", 30))),)
    )
    got = placed(s, view)
    assert Counter(n[0] for n in got) == {"a": 7, "b": 3}


def test_unlisted_values_share_the_remaining_percentage():
    view = ClusterView([node(f"{z}{i}", zone=z) for z in "abc" for i in range(10)])
    s = spec(replicas=10, spreads=(Spread("node.zone", weight=100, targets=(SpreadTarget("a", 60),)),))
    assert Counter(n[0] for n in placed(s, view)) == {"a": 6, "b": 2, "c": 2}


def test_soft_spread_per_node_spreads_before_doubling_up():
    view = ClusterView([node(n) for n in "abc"])
    got = placed(spec(replicas=6, spreads=(Spread("node", weight=100),)), view, config=NO_DEFAULT_SPREAD)
    assert Counter(got) == {"a": 2, "b": 2, "c": 2}


def test_soft_anti_affinity_avoids_the_other_workloads_nodes_and_zones():
    view = ClusterView(
        [node("a1", zone="a"), node("a2", zone="a"), node("b1", zone="b", flaps=3)],
        [alloc("db", "a1")],
    )
    per_node = spec(anti_affinities=(AntiAffinity("db", "node", weight=100),))
    assert placed(per_node, view, 1) == ["a2"]
    per_zone = spec(anti_affinities=(AntiAffinity("db", "node.zone", weight=100),))
    plan = plan_placements(per_zone, 1, view)
    assert plan.placements[0].node == "b1"  # the flappy node, because zone a holds the db
    assert plan.placements[0].components["anti_affinity"] == 0.0
    # the penalty is visible on a node that takes it anyway
    only_a = ClusterView([node("a1", zone="a")], [alloc("db", "a1")])
    assert plan_placements(per_node, 1, only_a).placements[0].components["anti_affinity"] == -1.0


@pytest.mark.parametrize(
    "target, count, score",
    [(2.0, 0, 1.0), (2.0, 1, 0.5), (2.0, 2, 0.0), (2.0, 4, -1.0), (2.0, 9, -1.0), (0.0, 0, -1.0)],
)
def test_spread_score_is_distance_to_target_clamped(target, count, score):
    assert spread_score(target, count) == score


# ---------------------------------------------------------------- explanations


def test_placements_carry_a_normalised_score_and_each_scorers_part():
    view = ClusterView([node("a", zone="z", labels={"cost": "1"}), node("b", zone="y")])
    s = spec(replicas=2, affinities=(Affinity("node.zone", "=", "z"),), spreads=(Spread("node.zone"),))
    plan = plan_placements(s, 2, view)
    for p in plan.placements:
        assert -1.0 <= p.score <= 1.0
        assert set(p.components) == {"locality", "reliability", "cost", "utilization", "spread"}
        assert all(-1.0 <= v <= 1.0 for v in p.components.values())
    line = plan.explain()[0]
    assert line.startswith(f"replica 0 → {plan.placements[0].node} (score ")
    assert "2 of 2 nodes feasible" in line


def test_all_weights_zero_still_places_by_seeded_tie_break():
    zero = SchedulerConfig(weights=Weights(0, 0, 0, 0, 0, 0), default_node_spread_weight=0)
    view = ClusterView([node(n) for n in "abc"])
    plan = plan_placements(spec(), 1, view, config=zero)
    assert plan.placements[0].score == 0.0 and plan.placements[0].node in "abc"
