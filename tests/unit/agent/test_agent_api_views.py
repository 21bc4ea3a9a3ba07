"""The workload API's views of the state: what `ps` reports, what a node's
watch receives, which allocation logs/exec go to."""

from __future__ import annotations

import msgspec
import pytest

from cloudless.api.workloads import node_allocations, pick_allocations, workload_state
from cloudless.errors import NotFound
from cloudless.state.commands import (
    AllocationReport,
    CommitPlan,
    Proposal,
    ReportAllocations,
    StopWorkload,
    SubmitWorkload,
    encode_proposal,
)
from cloudless.state.fsm import StateMachine
from cloudless.state.workload import Allocation, WorkloadSpec, validate

SPEC = validate(WorkloadSpec(name="web", image="busybox:latest", replicas=2))


def machine(*commands) -> StateMachine:
    fsm = StateMachine()
    for i, command in enumerate(commands, 1):
        fsm.apply(i, encode_proposal(Proposal(command=command, now=float(i))))
    return fsm


def alloc(replica: int, node: str, suffix: str = "00000000", version: int = 1) -> Allocation:
    return Allocation(id=f"web-{replica}-{suffix}", workload="web", version=version, node=node, replica=replica)


def test_ps_state_follows_the_replicas():
    fsm = machine(SubmitWorkload(SPEC), CommitPlan(create=(alloc(0, "a"), alloc(1, "b"))))
    assert workload_state(fsm.workloads["web"], fsm.allocations_of_workload("web")) == ("pending", 0)
    fsm.apply(
        10,
        encode_proposal(
            Proposal(command=ReportAllocations("a", (AllocationReport("web-0-00000000", "running"),)), now=10.0)
        ),
    )
    fsm.apply(
        11,
        encode_proposal(
            Proposal(command=ReportAllocations("b", (AllocationReport("web-1-00000000", "running"),)), now=11.0)
        ),
    )
    assert workload_state(fsm.workloads["web"], fsm.allocations_of_workload("web")) == ("running", 2)
    fsm.apply(12, encode_proposal(Proposal(command=StopWorkload("web"), now=12.0)))
    assert workload_state(fsm.workloads["web"], fsm.allocations_of_workload("web"))[0] == "stopped"


def test_a_node_watch_carries_its_allocations_with_the_spec_version_they_run():
    fsm = machine(
        SubmitWorkload(SPEC),
        CommitPlan(create=(alloc(0, "a"), alloc(1, "b"))),
        SubmitWorkload(msgspec.structs.replace(SPEC, image="busybox:1.36")),
        CommitPlan(create=(alloc(0, "a", "11111111", version=2),), stop=("web-0-00000000",)),
    )
    mine = node_allocations(fsm, "a")
    by_id = {i.allocation.id: i for i in mine.items}
    assert set(by_id) == {"web-0-00000000", "web-0-11111111"}
    assert by_id["web-0-00000000"].desired == "stop" and by_id["web-0-00000000"].spec.image == "busybox:latest"
    assert by_id["web-0-11111111"].desired == "run" and by_id["web-0-11111111"].spec.image == "busybox:1.36"
    assert set(mine.wanted()) == {"web-0-11111111"}
    assert [i.allocation.id for i in node_allocations(fsm, "b").items] == ["web-1-00000000"]


def test_logs_and_exec_pick_the_wanted_replica_and_name_what_is_missing():
    fsm = machine(SubmitWorkload(SPEC), CommitPlan(create=(alloc(0, "a"), alloc(1, "b"))))
    assert [r.allocation.id for r in pick_allocations(fsm, "web", None)] == ["web-0-00000000", "web-1-00000000"]
    assert [r.allocation.node for r in pick_allocations(fsm, "web", 1)] == ["b"]
    with pytest.raises(NotFound, match="replica 5"):
        pick_allocations(fsm, "web", 5)
    with pytest.raises(NotFound, match="no workload"):
        pick_allocations(fsm, "api", None)
