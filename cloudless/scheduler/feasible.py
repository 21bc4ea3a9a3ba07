"""Feasibility: which nodes could take one more replica, and why the others cannot.

Filters run in a fixed order and a node is charged to the first one that
rejects it, so the counts add up to the node total (Nomad's
`AllocMetric.ConstraintFiltered` / `DimensionExhausted`):

1. static, per plan — node state, container runtime (`runtime=none` nodes
   take no container; `rootless` nodes none with ports), then each constraint in spec order, then hard
   anti-affinity. Evaluated per distinct attribute value on bitmasks, so
   they cost O(values), not O(nodes).
2. dynamic, per decision — cpu, memory, host ports, spread limits
   (`max_per`). These change as the plan places replicas, so `Usage` keeps
   them as an overlay on the view (which is never written).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from cloudless.scheduler.view import ClusterView, mask_indices, mask_of
from cloudless.state.workload import Affinity, AntiAffinity, Constraint, WorkloadSpec

Rule = Constraint | Affinity

STATE_REASONS = {
    "suspect": "node suspect",
    "dead": "node dead",
    "left": "node left",
    "ineligible": "node not eligible",
    "no_capacity": "node reports no capacity",
}
NO_RUNTIME = "node cannot run containers (runtime=none)"
ROOTLESS_PORTS = "rootless node has no container network (ports need a bridge, which needs root)"
# Gossip label a rootless node sets to the cgroup limits it can enforce
# (comma-separated, "" for none); see sandbox/rootless.py.
LIMITS_LABEL = "cloudless/limits"
LIMIT_NAMES: tuple[str, ...] = ("memory", "cpu", "pids")
INSUFFICIENT_CPU = "insufficient cpu"
INSUFFICIENT_MEMORY = "insufficient memory"


def rule_text(rule: Rule) -> str:
    """How a rule reads in explanations: `node.zone=a`, `node.arch in amd64,arm64`."""
    if rule.operator == "exists":
        return f"{rule.attribute} exists"
    value = ",".join(rule.value) if isinstance(rule.value, tuple) else rule.value
    if rule.operator in ("=", "!="):
        return f"{rule.attribute}{rule.operator}{value}"
    return f"{rule.attribute} {rule.operator} {value}"


def rule_predicate(rule: Rule) -> Callable[[str | None], bool]:
    """A test on one attribute value (None: the node lacks the attribute).

    A node without the attribute satisfies != and not_in (its value is not
    the one excluded) and fails everything else.
    """
    op, value = rule.operator, rule.value
    if op == "=":
        return lambda v: v is not None and v == value
    if op == "!=":
        return lambda v: v != value
    if op == "in":
        allowed = frozenset(value)
        return lambda v: v is not None and v in allowed
    if op == "not_in":
        excluded = frozenset(value)
        return lambda v: v not in excluded
    if op == "regex":
        pattern = re.compile(str(value))
        return lambda v: v is not None and pattern.search(v) is not None
    if op == "exists":
        return lambda v: v is not None and v != ""
    raise ValueError(f"unknown operator {op!r}")  # validate() admits none other


def rule_match(view: ClusterView, rule: Rule) -> tuple[int, frozenset[str | None]]:
    """(mask of matching nodes, matching values), memoised on the view."""
    key = ("rule", rule.attribute, rule.operator, rule.value)
    return view.memo(key, lambda: view.attribute(rule.attribute).matching(rule_predicate(rule)))


def scope_mask(view: ClusterView, workload: str, attribute: str) -> int:
    """Nodes that share `attribute` (a node, a zone...) with a live replica of `workload`."""
    placed = view.placed.get(workload)
    if not placed:
        return 0
    if attribute == "node":
        return mask_of(placed, view.n)
    index = view.attribute(attribute)
    mask = 0
    for value in {index.values[i] for i in placed}:
        if value is not None:
            mask |= index.masks[value]
    return mask


def anti_affinity_text(rule: AntiAffinity) -> str:
    return f"anti-affinity with {rule.workload} per {rule.attribute}"


class StaticFeasibility:
    """Nodes passing the per-plan filters, and who was rejected by which filter."""

    __slots__ = ("mask", "rejected")

    def __init__(self, mask: int, rejected: list[tuple[str, int]]) -> None:
        self.mask = mask
        self.rejected = rejected  # (reason, mask of the nodes it rejected first), in filter order

    def counts(self) -> dict[str, int]:
        return {reason: mask.bit_count() for reason, mask in self.rejected}


def runtime_none_mask(view: ClusterView) -> int:
    """Nodes that said they cannot run containers."""
    return view.attribute("node.runtime").masks.get("none", 0)


def rootless_mask(view: ClusterView) -> int:
    return view.attribute("node.runtime").masks.get("rootless", 0)


def unenforced_limits(runtime: str, labels: dict[str, str]) -> list[str]:
    """The resource limits a node cannot enforce: on a rootless node, those
    outside its delegated cgroup (all of them when it did not say)."""
    if runtime != "rootless":
        return []
    enforced = set(labels.get(LIMITS_LABEL, "").split(","))
    return [name for name in LIMIT_NAMES if name not in enforced]


def architecture_rule(architectures: Iterable[str]) -> Constraint:
    return Constraint("node.arch", "in", tuple(sorted(set(architectures))))


def static_filters(
    spec: WorkloadSpec, view: ClusterView, architectures: Iterable[str] | None = None
) -> StaticFeasibility:
    """`architectures`: the image's platforms when known (None: any node arch)."""
    remaining = view.all_mask
    rejected: list[tuple[str, int]] = []

    def apply(reason: str, keep: int) -> None:
        nonlocal remaining
        out = remaining & ~keep
        if out:
            rejected.append((reason, out))
            remaining &= keep

    for state, mask in sorted(view.state_masks.items()):
        if state != "alive":
            apply(STATE_REASONS.get(state, f"node {state}"), ~mask)
    apply(NO_RUNTIME, ~runtime_none_mask(view))
    if spec.ports:
        apply(ROOTLESS_PORTS, ~rootless_mask(view))
    if architectures is not None:
        rule = architecture_rule(architectures)
        apply(
            f"image has no variant for the node architecture (only {', '.join(rule.value)})", rule_match(view, rule)[0]
        )
    for constraint in spec.constraints:
        apply(f"constraint {rule_text(constraint)}", rule_match(view, constraint)[0])
    for rule in spec.anti_affinities:
        if rule.hard:
            apply(anti_affinity_text(rule), ~scope_mask(view, rule.workload, rule.attribute))
    return StaticFeasibility(remaining, rejected)


class SpreadLimit:
    """A hard `max_per` on one spread attribute."""

    __slots__ = ("attribute", "max_per", "reason", "values")

    def __init__(self, attribute: str, values: Sequence[str | None], max_per: int) -> None:
        self.attribute = attribute
        self.values = values
        self.max_per = max_per
        self.reason = f"spread limit {max_per} per {attribute}"


class Usage:
    """What the plan so far has used, over the view: cpu, memory, host ports
    and this workload's replica counts per node and per spread value."""

    def __init__(
        self,
        spec: WorkloadSpec,
        view: ClusterView,
        node_counts: dict[int, int],
        spread_values: Sequence[Sequence[str | None]],
    ) -> None:
        self.view = view
        self.cpu_need = spec.resources.cpu_millis
        self.mem_need = spec.resources.memory_bytes
        self.cpu: dict[int, int] = {}  # overlay on view.used_cpu for nodes this plan used
        self.mem: dict[int, int] = {}
        self.host_ports = spec.host_ports
        # Nodes where one of our host ports is taken, with the first such port.
        self.port_taken: dict[int, str] = {}
        if self.host_ports:
            for i, ports in view.ports.items():
                for port, proto in self.host_ports:
                    if ports.get((port, proto)):
                        self.port_taken[i] = f"port {port}/{proto} in use"
                        break
        self.node_counts = dict(node_counts)
        # Per spread attribute (in spec order, "node" excluded): value -> live replicas.
        self.spread_values = spread_values
        self.value_counts: list[dict[str | None, int]] = [{} for _ in spread_values]
        for i, n in node_counts.items():
            for values, counts in zip(spread_values, self.value_counts, strict=True):
                v = values[i]
                counts[v] = counts.get(v, 0) + n

    def used_cpu(self, i: int) -> int:
        used = self.cpu.get(i)
        return self.view.used_cpu[i] if used is None else used

    def used_mem(self, i: int) -> int:
        used = self.mem.get(i)
        return self.view.used_mem[i] if used is None else used

    def reason(self, i: int, node_limit: int, limits: Sequence[tuple[int, SpreadLimit]]) -> str | None:
        """Why node i cannot take one more replica now, or None.

        `limits` pairs each group-level spread limit with its position in
        `value_counts`; `node_limit` is the per-node max_per (0: none).
        """
        view = self.view
        if view.cap_cpu[i] - self.used_cpu(i) < self.cpu_need:
            return INSUFFICIENT_CPU
        if view.cap_mem[i] - self.used_mem(i) < self.mem_need:
            return INSUFFICIENT_MEMORY
        taken = self.port_taken.get(i)
        if taken is not None:
            return taken
        if node_limit and self.node_counts.get(i, 0) >= node_limit:
            return f"spread limit {node_limit} per node"
        for position, limit in limits:
            if self.value_counts[position].get(limit.values[i], 0) >= limit.max_per:
                return limit.reason
        return None

    def place(self, i: int) -> None:
        self.cpu[i] = self.used_cpu(i) + self.cpu_need
        self.mem[i] = self.used_mem(i) + self.mem_need
        if self.host_ports:
            port, proto = self.host_ports[0]
            self.port_taken[i] = f"port {port}/{proto} in use"
        self.node_counts[i] = self.node_counts.get(i, 0) + 1
        for values, counts in zip(self.spread_values, self.value_counts, strict=True):
            v = values[i]
            counts[v] = counts.get(v, 0) + 1


def explain_rejections(
    static: StaticFeasibility,
    usage: Usage,
    node_limit: int,
    limits: Sequence[tuple[int, SpreadLimit]],
) -> tuple[dict[str, int], dict[int, str], int]:
    """Every node's reason now: (counts by reason, node index -> reason, feasible count)."""
    per_node: dict[int, str] = {}
    for reason, mask in static.rejected:
        for i in mask_indices(mask):
            per_node[i] = reason
    feasible = 0
    for i in mask_indices(static.mask):
        why = usage.reason(i, node_limit, limits)
        if why is None:
            feasible += 1
        else:
            per_node[i] = why
    counts: dict[str, int] = {}
    for why in per_node.values():
        counts[why] = counts.get(why, 0) + 1
    return counts, per_node, feasible
