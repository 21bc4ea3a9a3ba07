"""Prometheus metrics, named cloudless_<subsystem>_<name>_<unit>.

One registry per node process (not the global default) so several nodes can
run in one test process without colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.raft_term = Gauge("cloudless_raft_term", "Current Raft term", registry=r)
        self.raft_commit_index = Gauge("cloudless_raft_commit_index", "Raft commit index", registry=r)
        self.raft_is_leader = Gauge("cloudless_raft_is_leader", "1 when this node leads", registry=r)
        self.raft_proposals = Counter("cloudless_raft_proposals_total", "Proposals submitted", registry=r)
        self.raft_sync_seconds = Histogram(
            "cloudless_raft_sync_seconds", "Durable log sync latency", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
        )
        self.gossip_members = Gauge("cloudless_gossip_members", "Members by state", ["state"], registry=r)
        self.gossip_packets_dropped = Counter(
            "cloudless_gossip_packets_dropped_total", "Gossip packets dropped", ["reason"], registry=r
        )
        self.rpc_requests = Counter("cloudless_rpc_requests_total", "RPCs served", ["method", "outcome"], registry=r)
        self.rpc_seconds = Histogram("cloudless_rpc_duration_seconds", "RPC handler latency", ["method"], registry=r)
        self.autopilot_decisions = Counter(
            "cloudless_autopilot_decisions_total", "Membership changes made by autopilot", ["kind"], registry=r
        )
        self.autopilot_voters = Gauge("cloudless_autopilot_voters", "Current Raft voters", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
