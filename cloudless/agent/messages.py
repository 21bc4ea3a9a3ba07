"""What the agent and the cluster say to each other.

`allocations.watch` (server stream, node → leader): the leader sends the
node's whole allocation set (`NodeAllocations`) when it changes, and at
least every `HEARTBEAT_S` so a silent stream is known to be dead.
`allocations.report` (unary, node → any node, proposed through Raft): a batch
of the node's observations.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from cloudless.state.commands import AllocationReport, Name
from cloudless.state.workload import Allocation, WorkloadSpec

HEARTBEAT_S = 3.0


class WatchAllocations(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node: Name


class AssignedAllocation(msgspec.Struct, frozen=True):
    """One allocation of this node, with the spec version it runs."""

    allocation: Allocation
    desired: Literal["run", "stop"]
    spec: WorkloadSpec


class NodeAllocations(msgspec.Struct, frozen=True):
    """Everything the cluster wants of one node, as of Raft index `index`."""

    node: str
    index: int
    items: tuple[AssignedAllocation, ...] = ()

    def wanted(self) -> dict[str, AssignedAllocation]:
        return {a.allocation.id: a for a in self.items if a.desired == "run"}


class ReportBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node: Name
    reports: Annotated[tuple[AllocationReport, ...], msgspec.Meta(max_length=10_000)]


class ReportAck(msgspec.Struct, frozen=True):
    index: int


class LogsRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Logs of one allocation (by id) on the node that runs it."""

    allocation: Annotated[str, msgspec.Meta(max_length=128)]
    follow: bool = False
    tail: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = 200


class LogLine(msgspec.Struct, frozen=True):
    allocation: str
    replica: int
    stream: str
    text: str
    ts: float


class ExecRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    allocation: Annotated[str, msgspec.Meta(max_length=128)]
    args: Annotated[
        tuple[Annotated[str, msgspec.Meta(max_length=4096)], ...], msgspec.Meta(min_length=1, max_length=256)
    ]
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0


class ExecReply(msgspec.Struct, frozen=True):
    exit_code: int
    stdout: bytes
    stderr: bytes
