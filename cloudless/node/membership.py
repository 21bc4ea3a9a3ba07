"""`Membership`: the node's `ClusterView` (cloudless.ports) over gossip and the
replicated node registry, handed to every service that asks who is out there."""

from __future__ import annotations

from collections.abc import Callable

from cloudless.api.client_config import parse_endpoint
from cloudless.gossip.driver import GossipDriver
from cloudless.gossip.members import Member
from cloudless.gossip.metadata import Metadata
from cloudless.node.replicated import ReplicatedState


class Membership:
    def __init__(
        self,
        node_id: str,
        cluster_id: str,
        replicated: ReplicatedState,
        gossip: GossipDriver,
        metadata: Callable[[], Metadata],
    ) -> None:
        self._node_id = node_id
        self._cluster_id = cluster_id
        self._replicated = replicated
        self._gossip = gossip
        self._metadata = metadata

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    def address_of(self, node_id: str) -> tuple[str, int] | None:
        """The registered address (Raft) first, else the one gossip has heard."""
        record = self._replicated.fsm.nodes.get(node_id)
        if record is not None:
            return parse_endpoint(record.address)
        member = self._gossip.core.member(node_id)
        if member is not None:
            return parse_endpoint(member.addr)
        return None

    def leader_hint(self) -> str | None:
        for member in self._gossip.core.live_members():
            if "leader" in member.meta.roles:
                return member.name
        return None

    def leader_address(self) -> tuple[str, int] | None:
        """Where the leader is: Raft's view, else gossip's (for nodes outside Raft)."""
        leader = self._replicated.known_leader() or self.leader_hint()
        return self.address_of(leader) if leader else None

    def member(self, name: str) -> Member | None:
        return self._gossip.core.member(name)

    def member_names(self) -> set[str]:
        return set(self._gossip.core.members.rows)

    def live_members(self) -> list[Member]:
        return list(self._gossip.core.live_members())

    def metadata(self) -> Metadata:
        return self._metadata()

    def add_member_listener(self, listener: Callable[[object], None]) -> None:
        self._gossip.add_listener(listener)
