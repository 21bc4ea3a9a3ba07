"""The state machine's workload and allocation commands."""

from __future__ import annotations

import msgspec
import pytest

from cloudless.state.commands import (
    AllocationReport,
    CommitPlan,
    Done,
    InvalidCommand,
    Proposal,
    Rejected,
    ReportAllocations,
    ScaleWorkload,
    StopWorkload,
    SubmitWorkload,
    decode_proposal,
    encode_proposal,
)
from cloudless.state.fsm import StateMachine
from cloudless.state.workload import Allocation, WorkloadSpec, validate

SPEC = validate(WorkloadSpec(name="web", image="busybox:latest", replicas=2))


class Machine:
    def __init__(self) -> None:
        self.fsm = StateMachine()
        self.index = 0
        self.now = 100.0

    def apply(self, command):
        self.index += 1
        return self.fsm.apply(self.index, encode_proposal(Proposal(command=command, now=self.now)))


def alloc(i: int, node: str = "a", version: int = 1) -> Allocation:
    return Allocation(id=f"web-{i}-0000000{i}", workload="web", version=version, node=node, replica=i)


def test_submit_numbers_versions_and_an_identical_spec_is_a_no_op():
    m = Machine()
    assert isinstance(m.apply(SubmitWorkload(SPEC)), Done)
    assert m.fsm.workloads["web"].spec.version == 1
    m.apply(SubmitWorkload(msgspec.structs.replace(SPEC, version=7)))  # the client's number is ignored
    assert m.fsm.workloads["web"].spec.version == 1
    m.apply(SubmitWorkload(msgspec.structs.replace(SPEC, image="busybox:1.36")))
    record = m.fsm.workloads["web"]
    assert record.spec.version == 2 and sorted(record.history) == [1, 2]


def test_history_keeps_the_last_versions_and_the_stable_one():
    m = Machine()
    m.apply(SubmitWorkload(SPEC))
    m.apply(CommitPlan(stable={"web": 1}))
    for n in range(8):
        m.apply(SubmitWorkload(msgspec.structs.replace(SPEC, image=f"busybox:{n}")))
    history = m.fsm.workloads["web"].history
    assert 1 in history and len(history) == 6  # five latest + stable


def test_scale_and_stop_need_an_existing_workload():
    m = Machine()
    assert isinstance(m.apply(ScaleWorkload("web", 3)), Rejected)
    assert isinstance(m.apply(StopWorkload("web")), Rejected)
    m.apply(SubmitWorkload(SPEC))
    m.apply(ScaleWorkload("web", 3))
    assert m.fsm.workloads["web"].spec.replicas == 3 and m.fsm.workloads["web"].spec.version == 1


def test_stop_marks_every_allocation_desired_stop_and_submit_runs_it_again():
    m = Machine()
    m.apply(SubmitWorkload(SPEC))
    m.apply(CommitPlan(create=(alloc(0), alloc(1, "b"))))
    m.apply(StopWorkload("web"))
    assert m.fsm.workloads["web"].stopped
    assert {r.desired for r in m.fsm.allocations.values()} == {"stop"}
    m.apply(SubmitWorkload(SPEC))
    assert not m.fsm.workloads["web"].stopped


def test_reports_update_state_and_only_from_the_allocations_own_node():
    m = Machine()
    m.apply(SubmitWorkload(SPEC))
    m.apply(CommitPlan(create=(alloc(0, "a"),)))
    a_id = alloc(0).id
    m.apply(ReportAllocations("b", (AllocationReport(a_id, "running"),)))  # not its node: ignored
    assert m.fsm.allocations[a_id].allocation.state == "pending"
    m.now = 105.0
    m.apply(ReportAllocations("a", (AllocationReport(a_id, "running", restarts=2),)))
    rec = m.fsm.allocations[a_id]
    assert rec.allocation.state == "running" and rec.allocation.restarts == 2
    assert rec.running_since == 105.0 and rec.healthy_since == 105.0
    m.apply(ReportAllocations("a", (AllocationReport(a_id, "exited", exit_code=0),)))
    m.apply(ReportAllocations("a", (AllocationReport(a_id, "pending"),)))  # a restarted agent knows less
    assert m.fsm.allocations[a_id].allocation.state == "exited"


def test_lost_allocation_replaced_stays_lost_when_its_node_reports_it_running():
    m = Machine()
    m.apply(SubmitWorkload(SPEC))
    m.apply(CommitPlan(create=(alloc(0, "a"),)))
    old = alloc(0).id
    m.apply(CommitPlan(lost=(old,)))
    assert m.fsm.allocations[old].allocation.state == "lost"
    new = Allocation(id="web-0-99999999", workload="web", version=1, node="b", replica=0)
    m.apply(CommitPlan(create=(new,), replaces={new.id: old}, stop=(old,)))
    assert m.fsm.allocations[old].replaced_by == new.id
    assert m.fsm.allocations[new.id].reschedules == 1
    m.apply(ReportAllocations("a", (AllocationReport(old, "running"),)))
    assert m.fsm.allocations[old].allocation.state == "lost"
    m.apply(ReportAllocations("a", (AllocationReport(old, "exited", exit_code=137),)))
    assert m.fsm.allocations[old].allocation.state == "exited"
    m.apply(CommitPlan(forget=(old,)))
    assert old not in m.fsm.allocations
    assert [r.allocation.id for r in m.fsm.allocations_of_node("a")] == []


def test_revert_restores_the_stable_spec_as_a_new_version():
    m = Machine()
    m.apply(SubmitWorkload(SPEC))
    m.apply(CommitPlan(stable={"web": 1}))
    m.apply(SubmitWorkload(msgspec.structs.replace(SPEC, image="busybox:broken")))
    m.apply(CommitPlan(revert={"web": 2}))
    record = m.fsm.workloads["web"]
    assert record.spec.version == 3 and record.spec.image == "busybox:latest" and record.failed_versions == [2]
    m.apply(CommitPlan(revert={"web": 2}))  # stale: the current version is 3 now
    assert m.fsm.workloads["web"].spec.version == 3


def test_workload_commands_round_trip_and_bad_ones_are_typed_errors():
    proposal = Proposal(command=CommitPlan(create=(alloc(0),), explanations={"web": ("replica 0 → a",)}), now=1.0)
    assert decode_proposal(encode_proposal(proposal)) == proposal
    bad = msgspec.msgpack.encode({"command": {"c": "workload.scale", "name": "Web!", "replicas": 1}, "now": 1.0})
    with pytest.raises(InvalidCommand):
        decode_proposal(bad)


def test_a_health_checked_replica_is_healthy_only_once_its_check_passes():
    from cloudless.state.workload import HealthCheckSpec

    m = Machine()
    checked = msgspec.structs.replace(
        SPEC, health_check=HealthCheckSpec(kind="exec", command=("true",), interval_s=1, timeout_s=1)
    )
    m.apply(SubmitWorkload(validate(checked)))
    m.apply(CommitPlan(create=(alloc(0, "a"),)))
    a_id = alloc(0).id
    m.apply(ReportAllocations("a", (AllocationReport(a_id, "running"),)))  # not probed yet
    assert m.fsm.allocations[a_id].healthy_since is None
    m.now = 120.0
    m.apply(ReportAllocations("a", (AllocationReport(a_id, "running", health="healthy"),)))
    assert m.fsm.allocations[a_id].healthy_since == 120.0
