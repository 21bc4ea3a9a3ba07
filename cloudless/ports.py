"""The narrow interfaces services receive from `cloudless.node` (the composition root).

A service (the client API, the agent, the workload controller, blob storage in
the node) names here what it uses of the running node, so it can be read and
tested alone: `node/` constructs the real implementations and hands them out;
tests hand out twins. Nothing here depends on `node/`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from cloudless.gossip.members import Member
from cloudless.gossip.metadata import Metadata
from cloudless.raft.core import RaftNode
from cloudless.raft.messages import ConfChange
from cloudless.state.commands import Command, Result
from cloudless.state.fsm import Change, StateMachine


class ClusterView(Protocol):
    """Membership and roles as this node sees them: gossip for liveness and
    metadata, the replicated node records for addresses."""

    @property
    def node_id(self) -> str: ...

    @property
    def cluster_id(self) -> str: ...

    def address_of(self, node_id: str) -> tuple[str, int] | None: ...

    def leader_hint(self) -> str | None:
        """The leader as gossip reports it, for nodes outside the Raft configuration."""
        ...

    def member(self, name: str) -> Member | None: ...

    def member_names(self) -> set[str]: ...

    def live_members(self) -> list[Member]: ...

    def metadata(self) -> Metadata:
        """This node's own metadata, fresher than what gossip holds of it."""
        ...

    def add_member_listener(self, listener: Callable[[object], None]) -> None:
        """Called with every gossip membership event (`cloudless.gossip.events`)."""
        ...


class Proposer(Protocol):
    """The replicated state: proposals through Raft, linearizable reads of the
    state machine, and who leads (`node/replicated.py`'s `ReplicatedState`)."""

    fsm: StateMachine
    core: RaftNode
    change_listeners: list[Callable[[list[Change]], None]]

    @property
    def is_leader(self) -> bool: ...

    @property
    def leader(self) -> str | None: ...

    @property
    def is_member(self) -> bool: ...

    def known_leader(self) -> str | None: ...

    # The timeouts mirror ReplicatedState's: each call bounds its own wait.
    async def wait_leader(self, timeout: float = ...) -> str: ...

    async def wait_leadership(self, leading: bool = ...) -> None: ...

    async def wait_changed(self) -> None: ...

    async def propose(
        self,
        command: Command,
        *,
        client_id: str = ...,
        seq: int = ...,
        timeout: float = ...,
    ) -> tuple[Result, int]: ...

    async def propose_conf_change(
        self,
        change: ConfChange,
        timeout: float = ...,
    ) -> int: ...

    async def linearizable(self, timeout: float = ...) -> None: ...


class EventRecorder(Protocol):
    """Where a service records decisions and observations (`cloudless events`)."""

    def record(self, kind: str, node: str, message: str, **fields: Any) -> Any: ...
