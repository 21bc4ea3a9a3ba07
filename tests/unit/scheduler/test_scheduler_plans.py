"""Plans as a whole: seeded determinism, incremental placement equal to a full
rescore, scaling down (plan_stop), admission, and view snapshots."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudless.scheduler import (
    ClusterView,
    NodeInfo,
    SchedulerConfig,
    admit,
    plan_placements,
    plan_stop,
)
from cloudless.state.workload import (
    Affinity,
    Allocation,
    AntiAffinity,
    Constraint,
    PortSpec,
    Resources,
    Spread,
    SpreadTarget,
    WorkloadSpec,
    validate,
)

GiB = 1 << 30


def node(name: str, **kw) -> NodeInfo:
    kw.setdefault("cpu_millis", 4000)
    kw.setdefault("memory_bytes", 8 * GiB)
    return NodeInfo(node_id=name, **kw)


def spec(**kw) -> WorkloadSpec:
    kw.setdefault("name", "web")
    kw.setdefault("image", "registry.local/web:1")
    return validate(WorkloadSpec(**kw))


def alloc(workload: str, node_id: str, replica: int = 0, **kw) -> Allocation:
    kw.setdefault("state", "running")
    kw.setdefault("version", 0)
    return Allocation(id=f"{workload}-{replica}", workload=workload, node=node_id, replica=replica, **kw)


IDENTICAL = ClusterView([node(f"n{i:02d}") for i in range(20)])


# ---------------------------------------------------------------- determinism


def test_same_seed_same_plan():
    s = spec(replicas=5)
    a = plan_placements(s, 5, IDENTICAL, rng=random.Random(42))
    b = plan_placements(s, 5, IDENTICAL, rng=random.Random(42))
    assert a == b


def test_ties_between_identical_nodes_are_broken_by_the_seed():
    s = spec()
    firsts = {plan_placements(s, 1, IDENTICAL, rng=random.Random(seed)).placements[0].node for seed in range(30)}
    assert len(firsts) > 5  # not always the first node in id order


def test_default_seed_depends_on_the_workload_so_equal_nodes_share_the_load():
    firsts = {plan_placements(spec(name=f"w{k}"), 1, IDENTICAL).placements[0].node for k in range(30)}
    assert len(firsts) > 5
    assert plan_placements(spec(name="w1"), 1, IDENTICAL) == plan_placements(spec(name="w1"), 1, IDENTICAL)


def test_node_order_in_the_view_does_not_matter():
    nodes = [node(f"n{i}", zone="ab"[i % 2], flaps=i % 3) for i in range(12)]
    shuffled = nodes[:]
    random.Random(3).shuffle(shuffled)
    s = spec(replicas=6, spreads=(Spread("node.zone"),))
    assert plan_placements(s, 6, ClusterView(nodes)) == plan_placements(s, 6, ClusterView(shuffled))


# ---------------------------------------------------------------- incremental == full rescore


ZONES = ("a", "b", "c")


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 14))
    nodes = []
    for i in range(n):
        nodes.append(
            NodeInfo(
                node_id=f"n{i:02d}",
                state=draw(st.sampled_from(("alive",) * 6 + ("suspect", "dead"))),
                zone=draw(st.sampled_from(ZONES)),
                region=draw(st.sampled_from(("eu", "us"))),
                device_class=draw(st.sampled_from(("server", "pc", "phone"))),
                labels={"cost": draw(st.sampled_from(("0", "0.1", "0.5")))},
                cpu_millis=draw(st.sampled_from((500, 1000, 2000, 4000))),
                memory_bytes=draw(st.sampled_from((1, 2, 4))) * GiB,
                power=draw(st.sampled_from(("ac", "battery"))),
                battery_percent=draw(st.integers(0, 100)),
                network=draw(st.sampled_from(("wired", "wifi", "cellular"))),
                uptime_s=float(draw(st.integers(0, 200_000))),
                flaps=draw(st.integers(0, 3)),
            )
        )
    others = []
    for k in range(draw(st.integers(0, 6))):
        others.append(
            Allocation(
                id=f"db-{k}",
                workload="db",
                version=0,
                node=f"n{draw(st.integers(0, n - 1)):02d}",
                replica=k,
                state="running",
                resources=Resources(cpu_millis=draw(st.sampled_from((100, 500))), memory_bytes=256 << 20),
                ports=(PortSpec(80, 8080),) if draw(st.booleans()) and k == 0 else (),
            )
        )
    spreads = []
    if draw(st.booleans()):
        spreads.append(
            Spread(
                "node.zone",
                weight=draw(st.integers(1, 100)),
                max_per=draw(st.integers(0, 3)),
                targets=(SpreadTarget("a", 50),) if draw(st.booleans()) else (),
            )
        )
    if draw(st.booleans()):
        spreads.append(Spread("node.region", weight=draw(st.integers(1, 100))))
    if draw(st.booleans()):
        spreads.append(Spread("node", weight=draw(st.integers(1, 100)), max_per=draw(st.integers(0, 2))))
    s = spec(
        replicas=draw(st.integers(1, 12)),
        resources=Resources(
            cpu_millis=draw(st.sampled_from((100, 250, 700))),
            memory_bytes=draw(st.sampled_from((128, 512, 1024))) << 20,
        ),
        spreads=tuple(spreads),
        affinities=(Affinity("node.class", "=", "server", draw(st.sampled_from((-60, 30, 90)))),)
        if draw(st.booleans())
        else (),
        anti_affinities=(AntiAffinity("db", "node.zone", weight=40),) if draw(st.booleans()) else (),
        constraints=(Constraint("node.class", "!=", "phone"),) if draw(st.booleans()) else (),
        ports=(PortSpec(80, 8080),) if draw(st.booleans()) else (),
    )
    config = SchedulerConfig(
        utilization=draw(st.sampled_from(("binpack", "spread"))),
        default_node_spread_weight=draw(st.sampled_from((0, 50))),
    )
    count = draw(st.integers(0, 14))
    seed = draw(st.integers(0, 2**32))
    return nodes, others, s, config, count, seed


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_incremental_placement_equals_full_rescore(scenario):
    """Re-scoring only the chosen node and its spread groups gives exactly the
    placements (and explanations) of re-scoring every node for every replica."""
    check_incremental_equals_full(scenario)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_incremental_placement_equals_full_rescore_many_examples(scenario):
    check_incremental_equals_full(scenario)


def check_incremental_equals_full(scenario) -> None:
    nodes, others, s, config, count, seed = scenario
    view = ClusterView(nodes, others)
    fast = plan_placements(s, count, view, rng=random.Random(seed), config=config)
    slow = plan_placements(s, count, view, rng=random.Random(seed), config=config, incremental=False)
    assert fast == slow, f"seed={seed}"
    assert len(fast.placements) + len(fast.failures) == count


def test_incremental_equals_full_rescore_on_a_larger_mixed_cluster():
    rng = random.Random(7)
    nodes = [
        node(
            f"n{i:03d}",
            zone=rng.choice("abcde"),
            region=rng.choice(("eu", "us")),
            flaps=rng.randrange(3),
            cpu_millis=rng.choice((1000, 2000)),
            memory_bytes=rng.choice((2, 4, 8)) * GiB,
            device_class=rng.choice(("pc", "server", "laptop")),
        )
        for i in range(150)
    ]
    s = spec(
        replicas=500,
        resources=Resources(cpu_millis=500, memory_bytes=GiB),
        spreads=(Spread("node.zone"), Spread("node.region", weight=20)),
        affinities=(Affinity("node.class", "=", "server", 40),),
    )
    view = ClusterView(nodes)
    fast = plan_placements(s, 500, view, rng=random.Random(1))
    slow = plan_placements(s, 500, view, rng=random.Random(1), incremental=False)
    assert fast == slow
    assert fast.failures  # it ran out of room: the failure path agrees too


# ---------------------------------------------------------------- existing allocations


def test_new_replicas_take_the_free_replica_indexes():
    view = ClusterView([node(n) for n in "abcd"], [alloc("web", "a", 0), alloc("web", "b", 2)])
    plan = plan_placements(spec(replicas=4), 2, view)
    assert [p.replica for p in plan.placements] == [1, 3]
    assert {p.node for p in plan.placements} == {"c", "d"}  # default spread avoids a and b


def test_explicit_existing_allocations_override_the_view():
    view = ClusterView([node(n) for n in "ab"], [alloc("web", "a", 0)])
    plan = plan_placements(spec(replicas=1), 1, view, existing_allocations=[])
    assert plan.placements[0].replica == 0


def test_placing_zero_replicas_is_an_empty_plan_and_negative_is_an_error():
    plan = plan_placements(spec(), 0, IDENTICAL)
    assert plan.placements == () and plan.failures == () and plan.complete
    with pytest.raises(ValueError):
        plan_placements(spec(), -1, IDENTICAL)


def test_with_allocations_derives_the_next_snapshot_without_touching_the_old_one():
    view = ClusterView([node("a", cpu_millis=1000), node("b", cpu_millis=1000)])
    s = spec(resources=Resources(cpu_millis=1000, memory_bytes=GiB))
    first = plan_placements(s, 1, view).placements[0]
    after = view.with_allocations([alloc("web", first.node, 0, resources=s.resources)])
    second = plan_placements(s, 1, after).placements[0]
    assert second.node != first.node and second.replica == 1
    assert view.used_cpu == [0, 0]
    gone = after.with_allocations(remove=["web-0"])
    assert gone.used_cpu == [0, 0]
    lost = after.with_allocations([alloc("web", first.node, 0, state="lost")])
    assert lost.used_cpu == [0, 0] and lost.live_allocations("web") == []


# ---------------------------------------------------------------- plan_stop


def test_scale_down_stops_replicas_on_dead_and_gone_nodes_first():
    view = ClusterView([node("a"), node("b"), node("c", state="dead")])
    allocations = [alloc("web", "a", 0), alloc("web", "b", 1), alloc("web", "c", 2), alloc("web", "vanished", 3)]
    stops = plan_stop(spec(replicas=2), 2, allocations, view)
    assert [(s.node, s.reason) for s in stops] == [("vanished", "node is gone"), ("c", "node is dead")]


def test_scale_down_prefers_constraint_violations_old_versions_and_pending_replicas():
    s = spec(replicas=1, version=2, constraints=(Constraint("node.zone", "=", "a"),))
    view = ClusterView([node("ok", zone="a"), node("moved", zone="b"), node("old", zone="a"), node("new", zone="a")])
    allocations = [
        alloc("web", "ok", 0, version=2),
        alloc("web", "moved", 1, version=2),
        alloc("web", "old", 2, version=1),
        alloc("web", "new", 3, version=2, state="pending"),
    ]
    stops = plan_stop(s, 3, allocations, view)
    assert [x.node for x in stops] == ["moved", "old", "new"]
    assert stops[0].reason == "node no longer satisfies constraint node.zone=a"
    assert stops[1].reason == "older version 1"
    assert stops[2].reason == "not running yet (pending)"


def test_scale_down_evens_out_the_spread():
    view = ClusterView([node(f"{z}{i}", zone=z) for z in "ab" for i in range(4)])
    allocations = [alloc("web", f"a{i}", i) for i in range(4)] + [alloc("web", "b0", 4), alloc("web", "b1", 5)]
    s = spec(replicas=4, spreads=(Spread("node.zone"),))
    stops = plan_stop(s, 2, allocations, view)
    assert all(x.node.startswith("a") for x in stops)
    assert "node.zone=a holds 4 replicas" in stops[0].reason
    remaining = Counter(a.node[0] for a in allocations if a.id not in {x.allocation for x in stops})
    assert remaining == {"a": 2, "b": 2}


def test_scale_down_picks_the_least_suitable_node_among_equals():
    view = ClusterView(
        [node("pc"), node("phone", power="battery", battery_percent=30, network="cellular", metered=True)],
    )
    allocations = [alloc("web", "pc", 0), alloc("web", "phone", 1)]
    assert [x.node for x in plan_stop(spec(replicas=1), 1, allocations, view)] == ["phone"]


def test_scale_down_to_zero_stops_everything_and_nothing_for_zero():
    allocations = [
        alloc("web", "a", 0),
        alloc("web", "b", 1),
        alloc("other", "a", 0),
        alloc("web", "c", 2, state="exited"),
    ]
    view = ClusterView([node(n) for n in "abc"])
    assert {x.allocation for x in plan_stop(spec(replicas=0), 9, allocations, view)} == {"web-0", "web-1"}
    assert plan_stop(spec(), 0, allocations, view) == []
    assert len(plan_stop(spec(), 1, allocations)) == 1  # no view: every node counts as gone


# ---------------------------------------------------------------- admission


def test_admission_accepts_what_an_empty_node_could_run_even_if_all_are_busy_or_down():
    view = ClusterView(
        [node("a", state="dead"), node("b")],
        [
            Allocation(
                id="x-0",
                workload="x",
                version=0,
                node="b",
                replica=0,
                state="running",
                resources=Resources(cpu_millis=4000, memory_bytes=8 * GiB),
            )
        ],
    )
    assert admit(spec(resources=Resources(cpu_millis=4000, memory_bytes=8 * GiB)), view) is None


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(constraints=(Constraint("node.zone", "=", "mars"),)), "no node satisfies constraint node.zone=mars"),
        (
            dict(constraints=(Constraint("node.zone", "=", "a"), Constraint("node.arch", "=", "arm64"))),
            "no node satisfies all constraints together (node.zone=a, node.arch=arm64)",
        ),
        (dict(resources=Resources(cpu_millis=64000)), "needs 64000m cpu; the largest matching node has 8000m"),
        (
            dict(resources=Resources(memory_bytes=32 * GiB)),
            "needs 32 GiB memory; the largest matching node has 16 GiB",
        ),
        (
            dict(resources=Resources(cpu_millis=8000, memory_bytes=16 * GiB)),
            "no matching node has both 8000m cpu and 16 GiB memory",
        ),
        (
            dict(constraints=(Constraint("node.zone", "=", "a"),), resources=Resources(cpu_millis=8000)),
            "needs 8000m cpu; the largest matching node has 4000m",
        ),
    ],
)
def test_admission_rejects_what_can_never_be_placed(changes, reason):
    view = ClusterView(
        [
            node("small", zone="a", arch="amd64", cpu_millis=4000, memory_bytes=16 * GiB),
            node("fast", zone="b", arch="arm64", cpu_millis=8000, memory_bytes=8 * GiB),
        ]
    )
    assert admit(spec(**changes), view) == reason


def test_admission_with_no_nodes():
    assert admit(spec(), ClusterView([])) == "no nodes in the cluster"


def test_admission_rejects_an_image_no_node_can_run():
    view = ClusterView([node("a", arch="amd64"), node("b", arch="arm64")])
    assert admit(spec(), view, architectures=("riscv64", "s390x")) == (
        "no node has an architecture the image is built for (riscv64, s390x)"
    )
    assert admit(spec(), view, architectures=("arm64",)) is None


def _view_state(view: ClusterView):
    return (
        list(view.used_cpu),
        list(view.used_mem),
        {i: dict(p) for i, p in view.ports.items()},
        {w: dict(c) for w, c in view.placed.items()},
        {w: sorted(a.id for a in view.live_allocations(w)) for w in view.by_workload},
        sorted(view.allocations),
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 9),
            st.sampled_from(("a", "b", "c", "gone")),
            st.sampled_from(("web", "db")),
            st.sampled_from(("running", "pending", "exited", "lost", "remove")),
            st.booleans(),
        ),
        max_size=25,
    )
)
def test_with_allocations_matches_a_fresh_view_and_leaves_every_earlier_snapshot_intact(steps):
    nodes = [node(n) for n in "abc"]
    views = [ClusterView(nodes)]
    live: dict[str, Allocation] = {}
    snapshots = [dict(live)]
    for k, node_id, workload, state, port in steps:
        alloc_id = f"x-{k}"
        if state == "remove":
            views.append(views[-1].with_allocations(remove=[alloc_id]))
            live.pop(alloc_id, None)
        else:
            a = Allocation(
                id=alloc_id,
                workload=workload,
                version=0,
                node=node_id,
                replica=k,
                state=state,
                resources=Resources(cpu_millis=100 + k, memory_bytes=(1 + k) << 20),
                ports=(PortSpec(80, 8080),) if port else (),
            )
            views.append(views[-1].with_allocations([a]))
            live.pop(alloc_id, None)
            if a.live:
                live[alloc_id] = a
        snapshots.append(dict(live))
    for view, allocations in zip(views, snapshots, strict=True):
        assert _view_state(view) == _view_state(ClusterView(nodes, allocations.values()))


def test_committed_placements_hold_their_ports_and_resources_for_the_next_plan():
    from cloudless.scheduler import allocation_for, allocation_id

    view = ClusterView([node(n, cpu_millis=1000) for n in "ab"])
    web = spec(
        replicas=1, ports=(PortSpec(80, 8080), PortSpec(81)), resources=Resources(cpu_millis=600, memory_bytes=GiB)
    )
    rng = random.Random(5)
    first = plan_placements(web, 1, view).placements[0]
    committed = allocation_for(web, first, allocation_id(web, first.replica, rng))
    assert committed.ports == (PortSpec(80, 8080),) and committed.state == "pending"
    assert committed.id.startswith("web-0-") and len(committed.id) == len("web-0-") + 8
    after = view.with_allocations([committed])
    other = spec(name="api", ports=(PortSpec(80, 8080),), resources=Resources(cpu_millis=100, memory_bytes=GiB))
    plan = plan_placements(other, 1, after, explain_nodes=True)
    assert plan.node_reasons == {first.node: "port 8080/tcp in use"}
    big = spec(name="batch", resources=Resources(cpu_millis=500, memory_bytes=GiB))
    assert plan_placements(big, 1, after, explain_nodes=True).node_reasons == {first.node: "insufficient cpu"}


def test_explicit_replica_indexes_are_placed_as_named():
    view = ClusterView([node(n) for n in "abc"], [alloc("web", "a", 0), alloc("web", "b", 1)])
    plan = plan_placements(spec(replicas=2, version=1), 1, view, replica_indexes=[1])
    assert [p.replica for p in plan.placements] == [1]
    with pytest.raises(ValueError):
        plan_placements(spec(), 2, view, replica_indexes=[3, 3])
    with pytest.raises(ValueError):
        plan_placements(spec(), 1, view, replica_indexes=[])


def test_plans_round_trip_as_json_for_inspect():
    import msgspec

    view = ClusterView([node("a", memory_bytes=GiB), node("b")])
    plan = plan_placements(spec(replicas=3, resources=Resources(memory_bytes=3 * GiB)), 3, view)
    assert msgspec.json.decode(msgspec.json.encode(plan), type=type(plan)) == plan
    assert plan.explain()[-1] == "replica 2 not placed: 0 of 2 nodes feasible: 2 insufficient memory"
