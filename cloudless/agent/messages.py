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


TerminalSize = Annotated[int, msgspec.Meta(ge=1, le=4096)]
EXEC_CHUNK = 64 * 1024  # stdin and output travel in pieces of at most this


class ExecRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`agent.exec` (duplex, node → the node running the allocation): start a process in its container.

    Then the caller sends `ExecInput` items and the node streams `ExecEvent`s, the last an `ExecExit`.
    """

    allocation: Annotated[str, msgspec.Meta(max_length=128)]
    args: Annotated[
        tuple[Annotated[str, msgspec.Meta(max_length=4096)], ...], msgspec.Meta(min_length=1, max_length=256)
    ]
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] | None = None  # None: as long as it runs
    tty: bool = False  # a pseudo-terminal for the process (stdout and stderr become one stream)
    stdin: bool = False  # keep the process's stdin open for ExecStdin items
    rows: TerminalSize = 24
    cols: TerminalSize = 80


class ExecStdin(msgspec.Struct, frozen=True, tag="stdin", forbid_unknown_fields=True):
    data: Annotated[bytes, msgspec.Meta(max_length=EXEC_CHUNK)]


class ExecStdinClose(msgspec.Struct, frozen=True, tag="close", forbid_unknown_fields=True):
    """The caller's stdin ended (with a tty: the terminal's EOF character is typed)."""


class ExecResize(msgspec.Struct, frozen=True, tag="resize", forbid_unknown_fields=True):
    rows: TerminalSize
    cols: TerminalSize


ExecInput = ExecStdin | ExecStdinClose | ExecResize


class ExecOutput(msgspec.Struct, frozen=True, tag="out"):
    stream: Literal["stdout", "stderr"]
    data: Annotated[bytes, msgspec.Meta(max_length=EXEC_CHUNK)]


class ExecExit(msgspec.Struct, frozen=True, tag="exit"):
    exit_code: int


ExecEvent = ExecOutput | ExecExit
