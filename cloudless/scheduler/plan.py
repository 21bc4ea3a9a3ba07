"""The scheduler's output: where each replica goes and why, and what could not
be placed and why. Plans are data (msgspec Structs): the controller turns
placements into allocations committed through Raft, and `cloudless inspect`
renders `explain()`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgspec

from cloudless.scheduler.feasible import NO_RUNTIME
from cloudless.state.workload import Allocation, WorkloadSpec

# How explain() words what `pending_reason` picks out again for ps/inspect.
NOT_PLACED = " not placed: "
NO_NODE_CAN_RUN = "no node can run containers"
SOME_NODES_CANNOT_RUN = "cannot run containers"


def pending_reason(explanations: Sequence[str]) -> str:
    """Why replicas wait, from the controller's last explanation ("" if it
    placed everything): the first unplaced replica's summary, and which nodes
    cannot run containers at all."""
    summary = next(
        (x.split(NOT_PLACED, 1)[1] for x in explanations if x.startswith("replica ") and NOT_PLACED in x), ""
    )
    runtime = next((x for x in explanations if x.startswith((NO_NODE_CAN_RUN + ":", SOME_NODES_CANNOT_RUN + ":"))), "")
    return "; ".join(part for part in (runtime, summary) if part)


def summarise(total: int, feasible: int, rejections: dict[str, int]) -> str:
    """ "0 of 5000 nodes feasible: 4000 insufficient memory, 1000 constraint node.zone=a"."""
    head = f"{feasible} of {total} nodes feasible"
    if not rejections:
        return head
    ordered = sorted(rejections.items(), key=lambda item: (-item[1], item[0]))
    return head + ": " + ", ".join(f"{count} {reason}" for reason, count in ordered)


class Placement(msgspec.Struct, frozen=True):
    """Replica `replica` goes to `node`; `score` is the normalised total in [-1, 1]
    and `components` each scorer's own score there."""

    replica: int
    node: str
    score: float
    components: dict[str, float]
    feasible: int  # nodes that could have taken it, all of them scored
    caveat: str = ""  # what the node cannot enforce (a rootless node's missing limits)


class FailedPlacement(msgspec.Struct, frozen=True):
    replica: int
    nodes: int
    feasible: int
    rejections: dict[str, int]  # reason -> nodes

    @property
    def message(self) -> str:
        return summarise(self.nodes, self.feasible, self.rejections)


class Plan(msgspec.Struct, frozen=True):
    workload: str
    version: int
    nodes: int  # in the view
    placements: tuple[Placement, ...] = ()
    failures: tuple[FailedPlacement, ...] = ()
    # Why nodes were not feasible at the first decision, by reason.
    rejections: dict[str, int] = {}
    # Node -> why it was not feasible: at the first failure, or at the first
    # decision when the caller asked for an explanation.
    node_reasons: dict[str, str] = {}

    @property
    def complete(self) -> bool:
        return not self.failures

    def explain(self) -> list[str]:
        """Human lines for `cloudless inspect`."""
        lines = []
        for p in self.placements:
            parts = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(p.components.items()))
            lines.append(
                f"replica {p.replica} → {p.node} (score {p.score:+.3f}; {parts}; {p.feasible} of {self.nodes} nodes feasible)"
                + (f"; {p.caveat}" if p.caveat else "")
            )
        for f in self.failures:
            lines.append(f"replica {f.replica}{NOT_PLACED}{f.message}")
        if self.failures:
            unable = sorted(n for n, why in self.node_reasons.items() if why == NO_RUNTIME)
            if unable:
                head = NO_NODE_CAN_RUN if len(unable) == self.nodes else SOME_NODES_CANNOT_RUN
                lines.append(f"{head}: " + ", ".join(f"{n} runtime=none" for n in unable))
        return lines


class StopChoice(msgspec.Struct, frozen=True):
    """An allocation to stop when scaling down, and why it was picked first."""

    allocation: str
    node: str
    replica: int
    reason: str


def allocation_id(spec: WorkloadSpec, replica: int, rng: random.Random) -> str:
    """`<workload>-<replica>-<8 hex>`: readable, and unique across reschedules of a replica."""
    return f"{spec.name}-{replica}-{rng.getrandbits(32):08x}"


def allocation_for(spec: WorkloadSpec, placement: Placement, allocation_id: str) -> Allocation:
    """The pending allocation a placement becomes. It carries the spec's
    resources and published ports, so later plans see them as taken."""
    return Allocation(
        id=allocation_id,
        workload=spec.name,
        version=spec.version,
        node=placement.node,
        replica=placement.replica,
        state="pending",
        resources=spec.resources,
        ports=tuple(p for p in spec.ports if p.host_port is not None),
    )
