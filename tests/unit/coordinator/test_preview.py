"""`apply --dry-run`, pure: `preview` says what submitting a spec would do —
create, update, rescale or nothing — and where each replica would go, with the
scheduler's own reasons for what it cannot place, and changes nothing."""

from __future__ import annotations

import msgspec
import pytest

from cloudless.coordinator.controller import ControllerState, build_view
from cloudless.coordinator.preview import preview
from cloudless.scheduler import NodeInfo, default_rng, plan_placements
from cloudless.state.commands import StopWorkload, SubmitWorkload
from cloudless.state.workload import Constraint, Resources, Spread
from tests.unit.coordinator.test_controller import GIB, Cluster, spec


def state_of(c: Cluster) -> ControllerState:
    return ControllerState(c.fsm.workloads, c.fsm.allocations, c.nodes)


def test_a_new_workload_is_created_and_each_replica_gets_a_node_without_changing_anything():
    c = Cluster("a", "b", "c")
    before = c.fsm.snapshot()
    p = preview(spec(replicas=3), state_of(c))
    assert (p.action, p.version, p.current_version, p.refused) == ("create", 1, None, "")
    assert [x.replica for x in p.placements] == [0, 1, 2]
    assert sorted(x.node for x in p.placements) == ["a", "b", "c"]  # default spread over nodes
    assert not p.failures and not p.kept and not p.stops
    assert c.fsm.snapshot() == before and not c.fsm.workloads


def test_the_preview_matches_where_the_controller_then_places_them():
    c = Cluster("a", "b", "c", "d")
    # Distinct capacities: no ties, so the controller's own generator cannot pick differently.
    c.nodes = [NodeInfo(node_id=n, cpu_millis=1000 * (i + 1), memory_bytes=(i + 1) * GIB) for i, n in enumerate("abcd")]
    s = spec(replicas=2, resources=Resources(cpu_millis=500, memory_bytes=256 << 20))
    p = preview(s, state_of(c))
    c.apply(SubmitWorkload(s))
    plan = c.step()
    assert plan is not None
    assert sorted((a.replica, a.node) for a in plan.create) == sorted((x.replica, x.node) for x in p.placements)


def test_replicas_that_cannot_be_placed_say_why_per_node_and_by_count():
    c = Cluster("a", "b", "c")
    c.nodes = [
        NodeInfo(node_id="a", zone="z1", cpu_millis=4000, memory_bytes=8 * GIB),
        NodeInfo(node_id="b", zone="z2", cpu_millis=4000, memory_bytes=8 * GIB),
        NodeInfo(node_id="c", zone="z1", cpu_millis=4000, memory_bytes=8 * GIB, state="dead"),
    ]
    s = spec(
        replicas=2,
        constraints=(Constraint("node.zone", "=", "z1"),),
        spreads=(Spread("node", max_per=1),),
    )
    p = preview(s, state_of(c))
    assert p.refused == ""  # a dead node may come back: admissible, just not placeable now
    assert [(x.replica, x.node) for x in p.placements] == [(0, "a")]
    assert len(p.failures) == 1
    failure = p.failures[0]
    assert failure.replica == 1 and failure.feasible == 0 and failure.nodes == 3
    assert failure.reasons == {"node dead": 1, "constraint node.zone=z1": 1, "spread limit 1 per node": 1}, (
        failure.reasons
    )
    assert p.node_reasons["b"] == "constraint node.zone=z1"
    assert p.node_reasons["c"] == "node dead"
    assert "0 of 3 nodes feasible" in failure.message


def test_reasons_are_the_schedulers_own():
    c = Cluster("a", "b")
    c.nodes = [
        NodeInfo(node_id="a", cpu_millis=4000, memory_bytes=GIB),
        NodeInfo(node_id="b", cpu_millis=100, memory_bytes=8 * GIB),
    ]
    s = spec(replicas=1, resources=Resources(cpu_millis=1000, memory_bytes=2 * GIB))
    p = preview(s, state_of(c))
    reference = plan_placements(
        msgspec.structs.replace(s, version=1), 1, build_view(state_of(c)), [], rng=default_rng(s), explain_nodes=True
    )
    assert p.node_reasons == reference.node_reasons == {"a": "insufficient memory", "b": "insufficient cpu"}
    assert p.failures[0].reasons == reference.failures[0].rejections
    assert p.refused == "no matching node has both 1000m cpu and 2 GiB memory"  # apply would refuse it


def test_a_constraint_no_node_satisfies_is_refused():
    c = Cluster("a", "b")
    p = preview(spec(constraints=(Constraint("node.zone", "=", "mars"),)), state_of(c))
    assert p.refused == "no node satisfies constraint node.zone=mars"
    assert p.failures and p.failures[0].reasons == {"constraint node.zone=mars": 2}


def test_the_same_spec_again_is_unchanged_and_keeps_its_replicas():
    c = Cluster("a", "b", "c")
    s = spec(replicas=3)
    c.apply(SubmitWorkload(s))
    c.settle()
    c.report_all()
    placed = sorted((a.replica, a.node) for a in c.live("web"))
    p = preview(s, state_of(c))
    assert (p.action, p.version, p.current_version) == ("unchanged", 1, 1)
    assert sorted((k.replica, k.node) for k in p.kept) == placed
    assert all(k.state == "running" for k in p.kept)
    assert not p.placements and not p.failures and not p.stops


def test_more_replicas_is_a_scale_that_places_only_the_new_ones():
    c = Cluster("a", "b", "c", "d")
    c.apply(SubmitWorkload(spec(replicas=2)))
    c.settle()
    p = preview(spec(replicas=4), state_of(c))
    assert (p.action, p.version) == ("scale", 2)
    assert len(p.kept) == 2
    assert sorted(x.replica for x in p.placements) == [2, 3]
    assert {x.node for x in p.placements}.isdisjoint({k.node for k in p.kept})  # spread over nodes


def test_fewer_replicas_names_the_ones_to_stop():
    c = Cluster("a", "b", "c")
    c.apply(SubmitWorkload(spec(replicas=3)))
    c.settle()
    c.report_all()
    p = preview(spec(replicas=1), state_of(c))
    assert p.action == "scale"
    assert len(p.stops) == 2 and len(p.kept) == 1
    assert all(s.reason for s in p.stops)
    assert not p.placements


def test_a_new_image_is_an_update_placing_every_replica_of_the_new_version():
    c = Cluster("a", "b", "c")
    c.apply(SubmitWorkload(spec(replicas=3)))
    c.settle()
    s = msgspec.structs.replace(spec(replicas=3), image="busybox:1.36")
    p = preview(s, state_of(c))
    assert (p.action, p.version, p.current_version) == ("update", 2, 1)
    assert len(p.placements) == 3 and not p.kept
    assert p.notes and "rolling update from version 1" in p.notes[0]


def test_a_stopped_workload_submitted_again_is_created_anew():
    c = Cluster("a", "b")
    c.apply(SubmitWorkload(spec(replicas=1)))
    c.settle()
    c.apply(StopWorkload("web"))
    c.settle()
    p = preview(spec(replicas=1), state_of(c))
    assert (p.action, p.version, p.current_version) == ("create", 2, 1)
    assert len(p.placements) == 1


def test_only_the_roles_that_may_apply_may_dry_run():
    from cloudless.authz import PERMISSIONS, Authorizer, PermissionDenied
    from cloudless.authz.roles import principal_of
    from tests.unit.authz.test_authz import peer

    assert PERMISSIONS["workloads.dry_run"].roles == PERMISSIONS["workloads.run"].roles
    authorizer = Authorizer()
    for role in ("admin", "operator"):
        authorizer.check_caller(principal_of(peer("client", role)), "workloads.dry_run")
    for caller in (peer("client", "viewer"), peer("node")):
        with pytest.raises(PermissionDenied, match="may not preview workload placements"):
            authorizer.check_caller(principal_of(caller), "workloads.dry_run")
