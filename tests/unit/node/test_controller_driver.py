"""The workload controller's trio driver, built from ports alone (a
`ClusterView` and a `Proposer` twin over a real StateMachine): no Node, no
network. It proposes the plan `reconcile` decides, only on the leader, and
records lost allocations as events."""

from __future__ import annotations

import trio

from cloudless.node.controller import WorkloadController
from cloudless.observability.events import EventLog
from cloudless.scheduler import NodeInfo
from cloudless.state.commands import CommitPlan, Proposal, SubmitWorkload, encode_proposal
from cloudless.state.fsm import StateMachine
from cloudless.state.workload import WorkloadSpec, validate

GIB = 1 << 30


class TwinCluster:
    node_id = "a"
    cluster_id = "c-test"

    def __init__(self) -> None:
        self.listeners: list = []

    def add_member_listener(self, listener) -> None:
        self.listeners.append(listener)


class TwinProposer:
    """Applies each proposal to a real state machine at once, as a one-node Raft would."""

    def __init__(self) -> None:
        self.fsm = StateMachine()
        self.change_listeners: list = []
        self.is_leader = True
        self.proposed: list = []

    async def propose(self, command, **deadline):
        self.proposed.append(command)
        index = self.fsm.applied_index + 1
        result = self.fsm.apply(index, encode_proposal(Proposal(command=command, now=1000.0)))
        return result, index


def nodes(dead: tuple[str, ...] = ()) -> list[NodeInfo]:
    return [
        NodeInfo(node_id=n, state="dead" if n in dead else "alive", cpu_millis=4000, memory_bytes=8 * GIB)
        for n in ("a", "b", "c")
    ]


async def test_the_driver_proposes_reconciles_plan_and_records_lost_allocations():
    cluster, replicated, events = TwinCluster(), TwinProposer(), EventLog()
    view = {"nodes": nodes()}
    controller = WorkloadController(cluster, replicated, events, lambda: view["nodes"])  # type: ignore[arg-type]
    assert cluster.listeners and replicated.change_listeners  # it wakes on membership and state changes

    await replicated.propose(SubmitWorkload(validate(WorkloadSpec(name="web", image="busybox:latest", replicas=2))))
    await controller.step()
    plan = replicated.proposed[-1]
    assert isinstance(plan, CommitPlan) and len(plan.create) == 2
    placed = {a.node for a in plan.create}

    view["nodes"] = nodes(dead=tuple(placed))
    await controller.step()
    lost = replicated.proposed[-1]
    assert isinstance(lost, CommitPlan) and len(lost.lost) == 2
    assert [e.kind for e in events.last(5)] == ["workload.lost"]


async def test_the_driver_does_nothing_off_the_leader(autojump_clock):
    cluster, replicated = TwinCluster(), TwinProposer()
    replicated.is_leader = False
    controller = WorkloadController(cluster, replicated, EventLog(), nodes, interval=0.05)  # type: ignore[arg-type]
    await replicated.propose(SubmitWorkload(validate(WorkloadSpec(name="web", image="busybox:latest"))))
    with trio.move_on_after(5.0):  # virtual time: a hundred rounds of its loop
        await controller.run()
    assert len(replicated.proposed) == 1  # only the submit: a follower never plans
    assert controller.rounds == 0
