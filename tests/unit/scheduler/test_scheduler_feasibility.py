"""Feasibility: each filter rejects the right nodes and says why, in counts and per node."""

from __future__ import annotations

import msgspec
import pytest

from cloudless.scheduler import ClusterView, InvalidView, NodeInfo, plan_placements
from cloudless.state.workload import (
    Allocation,
    AntiAffinity,
    Constraint,
    PortSpec,
    Resources,
    Spread,
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
    return Allocation(
        id=f"{workload}-{replica}-{node_id}", workload=workload, version=0, node=node_id, replica=replica, **kw
    )


FLEET = ClusterView(
    [
        node("pc-1", region="eu", zone="eu-a", arch="amd64", device_class="pc", labels={"gpu": "nvidia"}),
        node("pc-2", region="eu", zone="eu-b", arch="amd64", device_class="pc"),
        node(
            "phone-1",
            region="eu",
            zone="eu-a",
            arch="arm64",
            device_class="phone",
            power="battery",
            battery_percent=80,
            network="cellular",
            metered=True,
        ),
        node("vps-1", region="us", zone="us-a", arch="amd64", device_class="server", labels={"gpu": ""}),
        node("pi-1", region="", zone="", arch="armv7", device_class="gateway"),
    ]
)


def feasible_nodes(s: WorkloadSpec, view: ClusterView = FLEET) -> set[str]:
    """Every node that could take the first replica (the per-node reasons name the rest)."""
    plan = plan_placements(s, 1, view, explain_nodes=True)
    return {n.node_id for n in view.nodes} - set(plan.node_reasons)


@pytest.mark.parametrize(
    "constraint, expected",
    [
        (Constraint("node.zone", "=", "eu-a"), {"pc-1", "phone-1"}),
        (Constraint("node.zone", "!=", "eu-a"), {"pc-2", "vps-1", "pi-1"}),  # no zone is "not eu-a"
        (Constraint("node.arch", "in", ("arm64", "armv7")), {"phone-1", "pi-1"}),
        (Constraint("node.class", "not_in", ("phone", "gateway")), {"pc-1", "pc-2", "vps-1"}),
        (Constraint("node.region", "regex", "^e"), {"pc-1", "pc-2", "phone-1"}),
        (Constraint("node.zone", "exists"), {"pc-1", "pc-2", "phone-1", "vps-1"}),
        (Constraint("label.gpu", "exists"), {"pc-1"}),  # an empty label value does not exist
        (Constraint("label.gpu", "=", "nvidia"), {"pc-1"}),
        (Constraint("label.gpu", "!=", "nvidia"), {"pc-2", "phone-1", "vps-1", "pi-1"}),
        (Constraint("node.power", "=", "battery"), {"phone-1"}),
        (Constraint("node.network", "=", "wired"), {"pc-1", "pc-2", "vps-1", "pi-1"}),
        (Constraint("node.metered", "=", "false"), {"pc-1", "pc-2", "vps-1", "pi-1"}),
        (Constraint("node.id", "in", ("pc-2", "pi-1")), {"pc-2", "pi-1"}),
    ],
)
def test_each_constraint_operator_selects_exactly_the_matching_nodes(constraint, expected):
    assert feasible_nodes(spec(constraints=(constraint,))) == expected


def test_constraints_combine_and_charge_each_node_to_the_first_that_rejects_it():
    s = spec(constraints=(Constraint("node.region", "=", "eu"), Constraint("node.arch", "=", "amd64")))
    plan = plan_placements(s, 1, FLEET, explain_nodes=True)
    assert plan.rejections == {"constraint node.region=eu": 2, "constraint node.arch=amd64": 1}
    assert plan.node_reasons == {
        "vps-1": "constraint node.region=eu",
        "pi-1": "constraint node.region=eu",
        "phone-1": "constraint node.arch=amd64",
    }
    assert plan.placements[0].node in {"pc-1", "pc-2"}
    assert plan.placements[0].feasible == 2


def test_only_alive_eligible_nodes_take_new_work():
    view = ClusterView(
        [
            node("a", state="alive"),
            node("b", state="suspect"),
            node("c", state="dead"),
            node("d", state="left"),
            node("e", eligible=False),
        ]
    )
    plan = plan_placements(spec(), 1, view, explain_nodes=True)
    assert plan.placements[0].node == "a"
    assert plan.node_reasons == {
        "b": "node suspect",
        "c": "node dead",
        "d": "node left",
        "e": "node not eligible",
    }


def test_resource_exhaustion_is_explained_with_counts_by_reason():
    """The failure message the issue asks for: "0 of N nodes feasible: ..."."""
    nodes = [node(f"small-{i}", memory_bytes=1 * GiB, zone="a") for i in range(4)]
    nodes += [node("elsewhere", zone="b", memory_bytes=64 * GiB)]
    nodes += [node("slow", zone="a", cpu_millis=500, memory_bytes=64 * GiB)]
    view = ClusterView(nodes)
    s = spec(
        resources=Resources(cpu_millis=1000, memory_bytes=4 * GiB), constraints=(Constraint("node.zone", "=", "a"),)
    )
    plan = plan_placements(s, 2, view)
    assert not plan.placements
    assert [f.replica for f in plan.failures] == [0, 1]
    assert plan.failures[0].message == (
        "0 of 6 nodes feasible: 4 insufficient memory, 1 constraint node.zone=a, 1 insufficient cpu"
    )
    assert plan.node_reasons["small-0"] == "insufficient memory"
    assert plan.node_reasons["slow"] == "insufficient cpu"
    assert plan.explain()[0] == "replica 0 not placed: " + plan.failures[0].message


def test_existing_allocations_reserve_resources_and_replicas_fill_nodes_until_exhausted():
    view = ClusterView(
        [node("a", cpu_millis=1000, memory_bytes=4 * GiB), node("b", cpu_millis=1000, memory_bytes=4 * GiB)],
        [alloc("other", "a", resources=Resources(cpu_millis=600, memory_bytes=GiB))],
    )
    s = spec(replicas=4, resources=Resources(cpu_millis=400, memory_bytes=GiB))
    plan = plan_placements(s, 4, view)
    placed = sorted(p.node for p in plan.placements)
    assert placed == ["a", "b", "b"]  # a had room for one more, b for two
    assert plan.failures[0].replica == 3
    assert plan.failures[0].rejections == {"insufficient cpu": 2}


def test_terminal_allocations_reserve_nothing():
    view = ClusterView(
        [node("a", cpu_millis=1000)],
        [
            alloc("other", "a", state="exited", resources=Resources(cpu_millis=1000)),
            alloc("other", "a", replica=1, state="lost", resources=Resources(cpu_millis=1000)),
        ],
    )
    assert plan_placements(spec(resources=Resources(cpu_millis=1000)), 1, view).placements[0].node == "a"


def test_host_port_taken_by_another_workload_makes_the_node_infeasible():
    taken = alloc("other", "a", ports=(PortSpec(container_port=80, host_port=8080),))
    view = ClusterView([node("a"), node("b")], [taken])
    s = spec(ports=(PortSpec(container_port=80, host_port=8080),))
    plan = plan_placements(s, 1, view, explain_nodes=True)
    assert plan.placements[0].node == "b"
    assert plan.node_reasons == {"a": "port 8080/tcp in use"}


def test_same_port_number_on_another_protocol_does_not_conflict():
    taken = alloc("other", "a", ports=(PortSpec(container_port=53, host_port=53, protocol="udp"),))
    view = ClusterView([node("a")], [taken])
    assert plan_placements(spec(ports=(PortSpec(53, 53, "tcp"),)), 1, view).placements[0].node == "a"


def test_replicas_publishing_a_host_port_never_share_a_node():
    view = ClusterView([node("a"), node("b"), node("c")])
    s = spec(replicas=4, ports=(PortSpec(container_port=80, host_port=80),))
    plan = plan_placements(s, 4, view)
    assert sorted(p.node for p in plan.placements) == ["a", "b", "c"]
    assert plan.failures[0].message == "0 of 3 nodes feasible: 3 port 80/tcp in use"


def test_distinct_hosts_is_a_per_node_spread_limit():
    view = ClusterView([node(n) for n in "abc"])
    s = spec(replicas=4, spreads=(Spread("node", max_per=1),))
    plan = plan_placements(s, 4, view)
    assert sorted(p.node for p in plan.placements) == ["a", "b", "c"]
    assert plan.failures[0].rejections == {"spread limit 1 per node": 3}


def test_zone_spread_limit_caps_replicas_per_zone_and_counts_existing_ones():
    view = ClusterView(
        [node(f"{z}{i}", zone=z) for z in "ab" for i in range(3)],
        [alloc("web", "a0", replica=0)],
    )
    s = spec(replicas=5, spreads=(Spread("node.zone", max_per=2),))
    plan = plan_placements(s, 4, view)  # 1 existing + 4 more, at most 2 per zone
    zones = [view.nodes[view.index[p.node]].zone for p in plan.placements]
    assert sorted(zones) == ["a", "b", "b"]
    assert [p.replica for p in plan.placements] == [1, 2, 3]  # replica 0 exists
    assert plan.failures[0].replica == 4
    assert plan.failures[0].rejections == {"spread limit 2 per node.zone": 6}


def test_hard_anti_affinity_per_node_and_per_zone():
    view = ClusterView(
        [node("a1", zone="a"), node("a2", zone="a"), node("b1", zone="b"), node("b2", zone="b")],
        [alloc("db", "a1")],
    )
    per_node = spec(anti_affinities=(AntiAffinity("db", "node", hard=True),))
    assert feasible_nodes(per_node, view) == {"a2", "b1", "b2"}
    per_zone = spec(anti_affinities=(AntiAffinity("db", "node.zone", hard=True),))
    plan = plan_placements(per_zone, 1, view, explain_nodes=True)
    assert plan.node_reasons == {
        "a1": "anti-affinity with db per node.zone",
        "a2": "anti-affinity with db per node.zone",
    }


def test_every_node_is_accounted_for_exactly_once():
    s = spec(
        resources=Resources(cpu_millis=3000, memory_bytes=GiB),
        constraints=(Constraint("node.class", "!=", "gateway"),),
    )
    view = ClusterView(
        [*list(FLEET.nodes), node("busy", device_class="pc")],
        [alloc("other", "busy", resources=Resources(cpu_millis=2000))],
    )
    plan = plan_placements(s, 1, view, explain_nodes=True)
    assert sum(plan.rejections.values()) + plan.placements[0].feasible == view.n
    assert len(plan.node_reasons) + plan.placements[0].feasible == view.n


def test_a_view_listing_a_node_twice_is_refused():
    with pytest.raises(InvalidView, match="node 'a' appears twice"):
        ClusterView([node("a"), node("a")])


def test_the_scheduler_never_mutates_its_input():
    existing = [alloc("web", "a", replica=0)]
    view = ClusterView([node("a"), node("b")], [*existing, alloc("other", "b")])
    s = spec(replicas=3, spreads=(Spread("node.zone"),), ports=(PortSpec(80, 80),))
    before = (
        list(view.used_cpu),
        list(view.used_mem),
        dict(view.allocations),
        msgspec.json.encode(s),
        dict(view.ports),
    )
    plan_placements(s, 2, view, existing)
    plan_placements(s, 2, view, existing, incremental=False)
    after = (list(view.used_cpu), list(view.used_mem), dict(view.allocations), msgspec.json.encode(s), dict(view.ports))
    assert before == after


def test_image_architectures_filter_nodes_and_explain_it():
    plan = plan_placements(spec(), 1, FLEET, explain_nodes=True, architectures=("arm64",))
    assert plan.placements[0].node == "phone-1"
    reason = "image has no variant for the node architecture (only arm64)"
    assert plan.rejections == {reason: 4}


def test_a_node_that_reports_no_capacity_is_not_feasible():
    view = ClusterView([node("a", cpu_millis=0), node("b", memory_bytes=0), node("c")])
    s = validate(WorkloadSpec(name="web", image="busybox"))
    plan = plan_placements(s, 1, view, explain_nodes=True)
    assert plan.placements[0].node == "c"
    assert plan.node_reasons == {"a": "node reports no capacity", "b": "node reports no capacity"}


# -- container runtime ---------------------------------------------------------------


def test_nodes_that_cannot_run_containers_get_no_replica_and_are_named():
    from cloudless.scheduler.plan import pending_reason

    view = ClusterView([node("gw", runtime="none"), node("vps", runtime="runc"), node("old")])
    plan = plan_placements(spec(replicas=3, spreads=(Spread("node", max_per=1),)), 3, view)
    assert sorted(p.node for p in plan.placements) == ["old", "vps"]  # "" (not said) is not refused
    [failure] = plan.failures
    assert failure.rejections == {
        "node cannot run containers (runtime=none)": 1,
        "spread limit 1 per node": 2,
    }
    assert plan.node_reasons["gw"] == "node cannot run containers (runtime=none)"
    lines = plan.explain()
    assert "cannot run containers: gw runtime=none" in lines
    assert pending_reason(lines).startswith("cannot run containers: gw runtime=none; 0 of 3 nodes feasible")


def test_when_no_node_can_run_containers_the_reason_says_so():
    from cloudless.scheduler.plan import pending_reason

    view = ClusterView([node("node1", runtime="none"), node("node2", runtime="none")])
    plan = plan_placements(spec(replicas=1), 1, view)
    assert not plan.placements
    reason = pending_reason(plan.explain())
    assert reason == (
        "no node can run containers: node1 runtime=none, node2 runtime=none; "
        "0 of 2 nodes feasible: 2 node cannot run containers (runtime=none)"
    )


def test_runtime_filter_runs_before_constraints_and_is_a_node_attribute():
    view = ClusterView([node("a", runtime="none", zone="z1"), node("b", runtime="rootless", zone="z2")])
    plan = plan_placements(spec(constraints=(Constraint("node.zone", "=", "z1"),)), 1, view)
    assert plan.failures[0].rejections == {
        "node cannot run containers (runtime=none)": 1,
        "constraint node.zone=z1": 1,
    }
    placed = plan_placements(spec(constraints=(Constraint("node.runtime", "=", "rootless"),)), 1, view)
    assert [p.node for p in placed.placements] == ["b"]


def test_pending_reason_is_empty_when_everything_was_placed():
    from cloudless.scheduler.plan import pending_reason

    plan = plan_placements(spec(replicas=1), 1, ClusterView([node("a", runtime="runc")]))
    assert plan.placements and pending_reason(plan.explain()) == ""


def test_a_rootless_node_takes_no_workload_with_ports_and_says_why():
    from cloudless.scheduler.feasible import ROOTLESS_PORTS

    view = ClusterView([node("laptop", runtime="rootless"), node("vps", runtime="runc")])
    with_port = spec(replicas=2, ports=(PortSpec(80, host_port=8080),))
    plan = plan_placements(with_port, 2, view)
    assert [p.node for p in plan.placements] == ["vps"]
    assert plan.failures[0].rejections == {ROOTLESS_PORTS: 1, "port 8080/tcp in use": 1}
    assert plan.node_reasons["laptop"] == ROOTLESS_PORTS
    # A container port alone needs the bridge too (the mesh reaches it by the container's address).
    plan = plan_placements(
        spec(ports=(PortSpec(80),), constraints=(Constraint("node.runtime", "=", "rootless"),)), 1, view
    )
    assert plan.failures[0].rejections == {ROOTLESS_PORTS: 1, "constraint node.runtime=rootless": 1}
    # Without ports it is an ordinary candidate.
    plan = plan_placements(spec(constraints=(Constraint("node.runtime", "=", "rootless"),)), 1, view)
    assert [p.node for p in plan.placements] == ["laptop"]


def test_a_placement_on_a_rootless_node_names_the_limits_it_cannot_enforce():
    from cloudless.scheduler.feasible import LIMITS_LABEL

    view = ClusterView(
        [
            node("bare", runtime="rootless"),  # said nothing: enforces nothing
            node("delegated", runtime="rootless", labels={LIMITS_LABEL: "cpu,memory,pids"}),
            node("partial", runtime="rootless", labels={LIMITS_LABEL: "memory"}),
            node("vps", runtime="runc"),
        ]
    )
    plan = plan_placements(spec(replicas=4, spreads=(Spread("node", max_per=1),)), 4, view)
    caveats = {p.node: p.caveat for p in plan.placements}
    assert caveats == {
        "bare": "rootless node: memory, cpu, pids limits not enforced",
        "delegated": "",
        "partial": "rootless node: cpu, pids limits not enforced",
        "vps": "",
    }
    lines = plan.explain()
    assert any(line.startswith("replica ") and "→ bare" in line and line.endswith("not enforced") for line in lines)
    assert any("→ vps" in line and "not enforced" not in line for line in lines)
