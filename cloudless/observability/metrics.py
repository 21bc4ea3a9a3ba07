"""Prometheus metrics, named cloudless_<subsystem>_<name>_<unit>.

Read at scrape time from the live node (a custom collector), so nothing has
to remember to update a gauge. One registry per node, not the global
default, so several nodes can run in one test process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_MEMBER_STATES = ("alive", "suspect", "dead", "left")


class RaftSource(Protocol):
    """What the collector reads of a node's Raft (node.replicated.ReplicatedState)."""

    @property
    def core(self) -> Any: ...
    @property
    def driver(self) -> Any: ...
    @property
    def is_leader(self) -> bool: ...


class RpcSource(Protocol):
    calls_total: int


class GossipSource(Protocol):
    @property
    def core(self) -> Any: ...
    @property
    def counters(self) -> Mapping[str, int]: ...


class NodeCollector:
    """Reads the node's subsystems at scrape time; the composition root hands them in."""

    def __init__(self, raft: RaftSource, server: RpcSource, gossip: GossipSource) -> None:
        self._raft, self._server, self._gossip = raft, server, gossip

    def collect(self) -> Iterator[Metric]:
        replicated: Any = self._raft
        if replicated is not None:
            core = replicated.core
            stats = replicated.driver.statistics()
            yield GaugeMetricFamily("cloudless_raft_term", "Current Raft term", value=core.term)
            yield GaugeMetricFamily("cloudless_raft_commit_index", "Raft commit index", value=core.commit_index)
            yield GaugeMetricFamily("cloudless_raft_applied_index", "Raft applied index", value=stats.get("applied", 0))
            yield GaugeMetricFamily(
                "cloudless_raft_is_leader", "1 when this node leads", value=1 if replicated.is_leader else 0
            )
            conf = core.conf_state
            yield GaugeMetricFamily("cloudless_raft_voters", "Voters in the configuration", value=len(conf.voters))
            yield GaugeMetricFamily(
                "cloudless_raft_learners", "Learners in the configuration", value=len(conf.learners)
            )
            for key, help_text in (
                ("syncs", "Durable log syncs (group commits)"),
                ("entries_written", "Log entries written"),
                ("entries_applied", "Entries applied to the state machine"),
                ("messages_sent", "Raft messages sent"),
                ("messages_dropped", "Raft messages dropped (peer outbox full)"),
            ):
                yield CounterMetricFamily(f"cloudless_raft_{key}", help_text, value=stats.get(key, 0))
        yield CounterMetricFamily("cloudless_rpc_calls", "RPC calls served", value=self._server.calls_total)
        gossip: Any = self._gossip
        if gossip is not None:
            members = GaugeMetricFamily("cloudless_gossip_members", "Members by state", labels=["state"])
            counts = dict.fromkeys(_MEMBER_STATES, 0)
            for member in gossip.core.members.rows.values():
                counts[_MEMBER_STATES[member.state]] += 1
            for state, n in counts.items():
                members.add_metric([state], n)
            yield members
            for key, value in gossip.core.stats.items():
                yield CounterMetricFamily(f"cloudless_gossip_{key}", f"Gossip {key.replace('_', ' ')}", value=value)
            dropped = CounterMetricFamily(
                "cloudless_gossip_packets_dropped", "Gossip packets dropped", labels=["reason"]
            )
            for key, value in gossip.counters.items():
                dropped.add_metric([key], value)
            yield dropped


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.autopilot_decisions = Counter(
            "cloudless_autopilot_decisions", "Membership changes made by autopilot", ["kind"], registry=r
        )

    def observe(self, raft: RaftSource, server: RpcSource, gossip: GossipSource) -> None:
        """Read these subsystems at every scrape (the composition root calls this once)."""
        self.registry.register(NodeCollector(raft, server, gossip))

    def render(self) -> bytes:
        return generate_latest(self.registry)
