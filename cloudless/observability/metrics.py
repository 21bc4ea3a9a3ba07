"""Prometheus metrics, named cloudless_<subsystem>_<name>_<unit>.

Read at scrape time from the live node (a custom collector), so nothing has
to remember to update a gauge. One registry per node, not the global
default, so several nodes can run in one test process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_MEMBER_STATES = ("alive", "suspect", "dead", "left")


class NodeCollector:
    def __init__(self, node_getter: Callable[[], object]) -> None:
        self._node = node_getter

    def collect(self) -> Iterator[Metric]:
        node = self._node()
        replicated = getattr(node, "replicated", None)
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
        server = getattr(node, "server", None)
        if server is not None:
            yield CounterMetricFamily(
                "cloudless_rpc_calls", "RPC calls served", value=getattr(server, "calls_total", 0)
            )
        gossip = getattr(node, "gossip", None)
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
    def __init__(self, node_getter: Callable[[], object] | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        if node_getter is not None:
            r.register(NodeCollector(node_getter))
        self.autopilot_decisions = Counter(
            "cloudless_autopilot_decisions", "Membership changes made by autopilot", ["kind"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
