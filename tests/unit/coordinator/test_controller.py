"""The workload controller's decisions, pure: a state machine driven by
proposals, `reconcile` run against it, no trio."""

from __future__ import annotations

import random

import msgspec

from cloudless.coordinator.controller import ControllerState, reconcile, reschedule_delay
from cloudless.scheduler import NodeInfo
from cloudless.state.commands import (
    AllocationReport,
    CommitPlan,
    Proposal,
    ReportAllocations,
    ScaleWorkload,
    StopWorkload,
    SubmitWorkload,
    encode_proposal,
)
from cloudless.state.fsm import StateMachine
from cloudless.state.workload import HealthCheckSpec, ReschedulePolicy, UpdateStrategy, WorkloadSpec, validate

GIB = 1 << 30


def nodes(*names: str, dead: tuple[str, ...] = ()) -> list[NodeInfo]:
    return [
        NodeInfo(node_id=n, state="dead" if n in dead else "alive", cpu_millis=4000, memory_bytes=8 * GIB)
        for n in names
    ]


class Cluster:
    """A state machine plus the controller loop, with a hand-moved clock."""

    def __init__(self, *names: str) -> None:
        self.fsm = StateMachine()
        self.index = 0
        self.now = 1000.0
        self.nodes = nodes(*names)
        self.rng = random.Random(7)

    def apply(self, command) -> object:
        self.index += 1
        return self.fsm.apply(self.index, encode_proposal(Proposal(command=command, now=self.now)))

    def step(self) -> CommitPlan | None:
        state = ControllerState(self.fsm.workloads, self.fsm.allocations, self.nodes)
        decision = reconcile(state, self.now, self.rng)
        self.wake_at = decision.wake_at
        if decision.plan is not None:
            self.apply(decision.plan)
        return decision.plan

    def settle(self, rounds: int = 10) -> None:
        for _ in range(rounds):
            if self.step() is None:
                return

    def live(self, name: str) -> list:
        return [
            r.allocation for r in self.fsm.allocations_of_workload(name) if r.allocation.live and r.desired == "run"
        ]

    def report_all(self, state: str = "running", health: str = "", only=None, **kw) -> None:
        """Every node's agent reports its desired allocations (stopped ones as exited)."""
        by_node: dict[str, list[AllocationReport]] = {}
        for rec in self.fsm.allocations.values():
            a = rec.allocation
            if a.state == "lost":
                continue
            if rec.desired == "stop":
                report = AllocationReport(a.id, "exited", exit_code=0)
            elif only is not None and not only(a):
                continue
            else:
                report = AllocationReport(a.id, state, health=health, **kw)
            by_node.setdefault(a.node, []).append(report)
        for node, reports in by_node.items():
            self.apply(ReportAllocations(node, tuple(reports)))


def spec(**kw) -> WorkloadSpec:
    return validate(WorkloadSpec(name="web", image="busybox:latest", **kw))


def test_submit_places_every_replica_on_distinct_nodes_when_spread():
    c = Cluster("a", "b", "c")
    c.apply(SubmitWorkload(spec(replicas=3)))
    plan = c.step()
    assert plan is not None and len(plan.create) == 3
    assert sorted(a.replica for a in plan.create) == [0, 1, 2]
    assert len({a.node for a in plan.create}) == 3  # default spread over nodes
    assert c.step() is None  # nothing more to do: the plan is committed
    assert c.fsm.workloads["web"].explanations  # inspect has placement lines


def test_scale_up_and_down_keeps_exactly_the_desired_count():
    c = Cluster("a", "b", "c")
    c.apply(SubmitWorkload(spec(replicas=1)))
    c.settle()
    c.report_all()
    c.apply(ScaleWorkload("web", 3))
    c.settle()
    assert len(c.live("web")) == 3
    c.report_all()
    c.apply(ScaleWorkload("web", 1))
    plan = c.step()
    assert plan is not None and len(plan.stop) == 2
    assert len(c.live("web")) == 1
    c.report_all()  # the agents stop them and report exits
    c.settle()
    assert len(c.live("web")) == 1


def test_node_death_marks_allocations_lost_and_replaces_them_elsewhere_at_once():
    c = Cluster("a", "b", "c")
    c.apply(SubmitWorkload(spec(replicas=3)))
    c.settle()
    c.report_all()
    victim = c.live("web")[0]
    c.nodes = nodes("a", "b", "c", dead=(victim.node,))
    plan = c.step()
    assert plan is not None
    assert plan.lost == (victim.id,)
    assert len(plan.create) == 1
    replacement = plan.create[0]
    assert replacement.node != victim.node
    assert replacement.replica == victim.replica
    assert plan.replaces == {replacement.id: victim.id}
    assert c.fsm.allocations[victim.id].allocation.state == "lost"
    assert len(c.live("web")) == 3


def test_returning_node_gets_its_replaced_allocation_stopped_no_duplicate_survives():
    c = Cluster("a", "b", "c")
    c.apply(SubmitWorkload(spec(replicas=2)))
    c.settle()
    c.report_all()
    victim = c.live("web")[0]
    c.nodes = nodes("a", "b", "c", dead=(victim.node,))
    c.settle()
    c.nodes = nodes("a", "b", "c")  # the node is back; its agent still runs the old replica
    c.apply(ReportAllocations(victim.node, (AllocationReport(victim.id, "running"),)))
    c.settle()
    rec = c.fsm.allocations.get(victim.id)
    assert rec is None or rec.desired == "stop"
    assert len(c.live("web")) == 2


def test_stopped_workload_stops_every_replica():
    c = Cluster("a", "b")
    c.apply(SubmitWorkload(spec(replicas=2)))
    c.settle()
    c.apply(StopWorkload("web"))
    c.settle()
    assert all(r.desired == "stop" for r in c.fsm.allocations.values())
    assert c.live("web") == []


def test_unplaceable_replicas_are_explained():
    c = Cluster("a")
    c.apply(
        SubmitWorkload(
            spec(
                replicas=2,
                spreads=(
                    msgspec.convert(
                        {"attribute": "node", "max_per": 1},
                        type=__import__("cloudless.state.workload", fromlist=["Spread"]).Spread,
                    ),
                ),
            )
        )
    )
    plan = c.step()
    assert plan is not None and len(plan.create) == 1
    lines = c.fsm.workloads["web"].explanations
    assert any("not placed" in line for line in lines), lines


def test_failed_replica_is_rescheduled_after_exponential_backoff_on_another_node():
    c = Cluster("a", "b", "c")
    c.apply(SubmitWorkload(spec(replicas=1, reschedule=ReschedulePolicy(delay_s=2.0, max_delay_s=60.0))))
    c.settle()
    first = c.live("web")[0]
    c.apply(ReportAllocations(first.node, (AllocationReport(first.id, "failed", exit_code=1),)))
    assert c.step() is None or not c.fsm.allocations[first.id].replaced_by  # backoff: not yet
    assert c.wake_at == c.now + 2.0
    c.now += 2.0
    plan = c.step()
    assert plan is not None and len(plan.create) == 1
    second = plan.create[0]
    assert second.node != first.node  # a failed replica moves away from its node
    assert c.fsm.allocations[second.id].reschedules == 1
    # It fails too: the next wait doubles.
    c.apply(ReportAllocations(second.node, (AllocationReport(second.id, "failed", exit_code=1),)))
    c.step()
    assert c.wake_at == c.now + 4.0
    assert reschedule_delay(c.fsm.workloads["web"].spec, 10) == 60.0


def test_limited_reschedule_attempts_stop_rescheduling():
    s = spec(reschedule=ReschedulePolicy(attempts=1, interval_s=60.0, unlimited=False))
    assert reschedule_delay(s, 0) is not None
    assert reschedule_delay(s, 1) is None


def _rolling(auto_revert: bool) -> Cluster:
    c = Cluster("a", "b", "c", "d")
    update = UpdateStrategy(max_surge=1, min_healthy_time_s=5.0, healthy_deadline_s=60.0, auto_revert=auto_revert)
    c.apply(SubmitWorkload(spec(replicas=3, update=update)))
    c.settle()
    c.report_all()
    c.now += 10
    c.settle()
    assert c.fsm.workloads["web"].stable_version == 1
    return c


def test_rolling_update_surges_one_and_stops_old_only_after_new_is_healthy():
    c = _rolling(auto_revert=False)
    c.apply(SubmitWorkload(msgspec.structs.replace(c.fsm.workloads["web"].spec, image="busybox:1.36")))
    plan = c.step()
    assert plan is not None and len(plan.create) == 1 and plan.stop == ()
    c.settle()
    assert len(c.live("web")) == 4  # new replica not healthy yet: hold at one surge
    c.report_all()
    c.now += 2
    c.settle()
    assert len(c.live("web")) == 4  # healthy for 2s < min_healthy_time 5s
    assert c.wake_at is not None
    for _ in range(10):
        c.now += 6
        c.settle()
        c.report_all()
    versions = sorted(a.version for a in c.live("web"))
    assert versions == [2, 2, 2]
    c.now += 6
    c.settle()
    assert c.fsm.workloads["web"].stable_version == 2


def test_rolling_update_failing_health_gate_reverts_to_the_stable_version():
    c = _rolling(auto_revert=True)
    c.apply(SubmitWorkload(msgspec.structs.replace(c.fsm.workloads["web"].spec, image="busybox:broken")))
    plan = c.step()
    assert plan is not None and len(plan.create) == 1
    bad = plan.create[0]
    c.apply(ReportAllocations(bad.node, (AllocationReport(bad.id, "running", health="unhealthy"),)))
    plan = c.step()
    assert plan is not None and plan.revert == {"web": 2}
    record = c.fsm.workloads["web"]
    assert record.spec.version == 3 and record.spec.image == "busybox:latest"
    assert 2 in record.failed_versions
    c.settle()
    c.report_all()
    c.settle()
    live = c.live("web")
    assert len(live) == 3 and all(a.version == 1 for a in live)  # the stable replicas were never restarted
    assert c.fsm.allocations[bad.id].desired == "stop"


def test_failed_rollout_without_auto_revert_is_held_with_old_replicas_kept():
    c = _rolling(auto_revert=False)
    c.apply(SubmitWorkload(msgspec.structs.replace(c.fsm.workloads["web"].spec, image="busybox:broken")))
    bad = c.step().create[0]
    c.apply(ReportAllocations(bad.node, (AllocationReport(bad.id, "failed", exit_code=2),)))
    plan = c.step()
    assert plan is not None and plan.failed == {"web": 2}
    c.settle()
    assert sorted(a.version for a in c.live("web")) == [1, 1, 1]
    assert any("held" in line for line in c.fsm.workloads["web"].explanations)


def test_health_checked_replica_counts_only_once_healthy():
    c = Cluster("a", "b")
    hc = HealthCheckSpec(kind="exec", command=("true",), interval_s=1.0, timeout_s=1.0)
    c.apply(SubmitWorkload(spec(replicas=1, health_check=hc, update=UpdateStrategy(min_healthy_time_s=0.0))))
    c.settle()
    c.report_all(health="starting")
    c.settle()
    assert c.fsm.workloads["web"].stable_version is None
    c.report_all(health="healthy")
    c.settle()
    assert c.fsm.workloads["web"].stable_version == 1


def test_snapshot_round_trip_keeps_workloads_and_allocations():
    c = Cluster("a", "b")
    c.apply(SubmitWorkload(spec(replicas=2)))
    c.settle()
    restored = StateMachine()
    restored.restore(c.fsm.snapshot())
    assert restored.workloads == c.fsm.workloads
    assert restored.allocations == c.fsm.allocations
    assert [r.allocation.id for r in restored.allocations_of_node("a")] == [
        r.allocation.id for r in c.fsm.allocations_of_node("a")
    ]
