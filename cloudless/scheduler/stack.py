"""The placement pipeline, top to bottom (Nomad's `stack.go`):

    static filters (feasible.py) → per-node checks and scorers (rank.py)
    → normalised integer scores → selection (select.py) → Plan (plan.py)

`plan_placements` scores every feasible node once, then places replicas one
by one, re-scoring only the chosen node and the spread groups it touched.
`plan_stop` picks which replicas to stop when scaling down, `admit` rejects
specs that no node in the cluster could ever run.

All functions read the view and return data; none mutates its arguments.
"""

from __future__ import annotations

import heapq
import logging
import random
import zlib
from collections.abc import Collection, Iterable, Sequence

from cloudless.scheduler.feasible import (
    INSUFFICIENT_CPU,
    INSUFFICIENT_MEMORY,
    SpreadLimit,
    StaticFeasibility,
    Usage,
    architecture_rule,
    explain_rejections,
    rule_match,
    rule_text,
    static_filters,
    unenforced_limits,
)
from cloudless.scheduler.plan import FailedPlacement, Placement, Plan, StopChoice
from cloudless.scheduler.rank import DEFAULT_CONFIG, SCALE, SchedulerConfig, Scoring
from cloudless.scheduler.select import GroupedHeaps, TieBreak
from cloudless.scheduler.view import ClusterView, mask_indices
from cloudless.state.workload import Allocation, WorkloadSpec

log = logging.getLogger(__name__)


def default_rng(spec: WorkloadSpec) -> random.Random:
    """A generator seeded by the workload's name and version: reproducible, and
    different workloads break ties differently (so equal nodes share the load)."""
    return random.Random(zlib.crc32(f"{spec.name}/{spec.version}".encode()))


def _free_replica_indexes(existing: Sequence[Allocation], count: int) -> list[int]:
    taken = {a.replica for a in existing}
    out: list[int] = []
    replica = 0
    while len(out) < count:
        if replica not in taken:
            out.append(replica)
        replica += 1
    return out


class _Run:
    """One plan's working state: the prepared scorers, the usage overlay, limits."""

    def __init__(
        self,
        spec: WorkloadSpec,
        view: ClusterView,
        existing: Sequence[Allocation],
        total: int,
        rng: random.Random,
        config: SchedulerConfig,
        architectures: Collection[str] | None,
    ) -> None:
        self.spec = spec
        self.view = view
        self.static: StaticFeasibility = static_filters(spec, view, architectures)
        self.scoring = Scoring(spec, view, config, total, self.static.mask)
        node_counts: dict[int, int] = {}
        for a in existing:
            i = view.index.get(a.node)
            if i is not None:
                node_counts[i] = node_counts.get(i, 0) + 1
        self.usage = Usage(spec, view, node_counts, [t.values for t in self.scoring.group_spreads])
        self.limits = [
            (pos, SpreadLimit(t.attribute, t.values, t.max_per))
            for pos, t in enumerate(self.scoring.group_spreads)
            if t.max_per
        ]
        self.node_limit = self.scoring.node_limit
        self.tie = TieBreak(rng, view.n)

    def placement(self, replica: int, i: int, score: int, feasible: int) -> Placement:
        usage = self.usage
        components = self.scoring.components(
            i, usage.used_cpu(i), usage.used_mem(i), usage.node_counts.get(i, 0), usage.value_counts
        )
        node = self.view.nodes[i]
        unenforced = unenforced_limits(node.runtime, node.labels)
        return Placement(
            replica=replica,
            node=node.node_id,
            score=score / SCALE,
            components=components,
            feasible=feasible,
            caveat=f"rootless node: {', '.join(unenforced)} limits not enforced" if unenforced else "",
        )

    def explain(self) -> tuple[dict[str, int], dict[str, str], int]:
        counts, per_node, feasible = explain_rejections(self.static, self.usage, self.node_limit, self.limits)
        nodes = self.view.nodes
        return counts, {nodes[i].node_id: why for i, why in sorted(per_node.items())}, feasible

    def node_part(self, i: int, static: float) -> int:
        usage = self.usage
        return self.scoring.node_part(i, static, usage.used_cpu(i), usage.used_mem(i), usage.node_counts.get(i, 0))


def plan_placements(
    spec: WorkloadSpec,
    count: int,
    view: ClusterView,
    existing_allocations: Iterable[Allocation] | None = None,
    *,
    rng: random.Random | None = None,
    config: SchedulerConfig = DEFAULT_CONFIG,
    explain_nodes: bool = False,
    incremental: bool = True,
    architectures: Collection[str] | None = None,
    replica_indexes: Sequence[int] | None = None,
) -> Plan:
    """Place `count` more replicas of `spec` on `view`.

    `existing_allocations` are the workload's replicas that stay (default:
    its live allocations in the view); they count towards spreads and take
    their replica indexes. Their resources are whatever the view reserves.
    `replica_indexes` names the replicas to place (e.g. the one a rolling
    update replaces); by default the lowest indexes no existing replica holds.
    `architectures` are the image's platforms when known (None: any).
    `explain_nodes` fills `Plan.node_reasons` even when everything was placed.
    `incremental=False` re-scores every node for every replica — the
    reference the incremental path is tested against.
    """
    if count < 0:
        raise ValueError("count must be ≥ 0")
    existing = [
        a
        for a in (view.live_allocations(spec.name) if existing_allocations is None else existing_allocations)
        if a.live and a.workload == spec.name
    ]
    if replica_indexes is None:
        replicas = _free_replica_indexes(existing, count)
    else:
        replicas = list(replica_indexes)
        if len(replicas) != count or len(set(replicas)) != count or any(r < 0 for r in replicas):
            raise ValueError("replica_indexes must be `count` distinct indexes ≥ 0")
    total = max(spec.replicas, len(existing) + count)
    run = _Run(spec, view, existing, total, rng if rng is not None else default_rng(spec), config, architectures)
    if incremental:
        placements, first_counts = _place_incremental(run, replicas)
    else:
        placements, first_counts = _place_by_full_rescore(run, replicas)

    node_reasons: dict[str, str] = {}
    failures: list[FailedPlacement] = []
    if len(placements) < len(replicas):
        counts, node_reasons, feasible = run.explain()
        for replica in replicas[len(placements) :]:
            failures.append(FailedPlacement(replica=replica, nodes=view.n, feasible=feasible, rejections=counts))
    elif explain_nodes:
        # Reasons as they stood at the first decision: re-run the filters on a fresh overlay.
        fresh = _Run(spec, view, existing, total, random.Random(0), config, architectures)
        _, node_reasons, _ = fresh.explain()
    if log.isEnabledFor(logging.DEBUG):
        fields = {
            "workload": spec.name,
            "version": spec.version,
            "nodes": view.n,
            "placed": len(placements),
            "failed": len(failures),
        }
        log.debug("scheduler.plan", extra={"fields": fields})
    return Plan(
        workload=spec.name,
        version=spec.version,
        nodes=view.n,
        placements=tuple(placements),
        failures=tuple(failures),
        rejections=first_counts,
        node_reasons=node_reasons,
    )


def _place_incremental(run: _Run, replicas: list[int]) -> tuple[list[Placement], dict[str, int]]:
    view, scoring, usage, tie = run.view, run.scoring, run.usage, run.tie
    used_cpu, used_mem = view.used_cpu, view.used_mem  # the overlay is empty before the first placement
    need_cpu, need_mem = usage.cpu_need, usage.mem_need
    extra_checks = bool(usage.port_taken or run.node_limit or run.limits)
    node_limit, limits = run.node_limit, run.limits
    grouped = bool(scoring.group_spreads)
    node_counts = usage.node_counts

    counts = run.static.counts()
    candidates = mask_indices(run.static.mask)
    free_cpu, free_mem = view.free()
    fit = [i for i in candidates if free_cpu[i] >= need_cpu]
    if len(fit) < len(candidates):
        counts[INSUFFICIENT_CPU] = len(candidates) - len(fit)
    fit_mem = [i for i in fit if free_mem[i] >= need_mem]
    if len(fit_mem) < len(fit):
        counts[INSUFFICIENT_MEMORY] = len(fit) - len(fit_mem)
    fit = fit_mem
    if extra_checks:
        # Only nodes with a taken port or replicas already need the full check.
        suspects = set(usage.port_taken).union(node_counts) if not limits else None
        kept = []
        for i in fit:
            if suspects is not None and i not in suspects:
                kept.append(i)
                continue
            why = usage.reason(i, node_limit, limits)
            if why is None:
                kept.append(i)
            else:
                counts[why] = counts.get(why, 0) + 1
        fit = kept
    entries_flat = scoring.entries(fit, used_cpu, used_mem, node_counts, tie)
    entries: dict[tuple, list[tuple[int, int, int]]] = {}  # type: ignore[type-arg]
    if grouped:
        keys = zip(*[[term.values[i] for i in fit] for term in scoring.group_spreads], strict=True)
        for key, entry in zip(keys, entries_flat, strict=True):
            group = entries.get(key)
            if group is None:
                entries[key] = [entry]
            else:
                group.append(entry)
    else:
        entries[()] = entries_flat

    # (spread position, value) -> group keys holding it, to invalidate group terms and close groups.
    holding: dict[tuple[int, str | None], list[tuple]] = {}  # type: ignore[type-arg]
    for key in entries:
        for pos, value in enumerate(key):
            holding.setdefault((pos, value), []).append(key)

    def keys_sharing(key: tuple) -> Iterable[tuple]:  # type: ignore[type-arg]
        for pos, value in enumerate(key):
            yield from holding.get((pos, value), ())

    heaps = GroupedHeaps(
        entries,
        lambda key: scoring.group_part(key, usage.value_counts),
        keys_sharing,
    )
    placements: list[Placement] = []
    for replica in replicas:
        choice = heaps.best()
        if choice is None:
            break
        i, key, score = choice
        placements.append(run.placement(replica, i, score, len(heaps)))
        usage.place(i)
        if usage.reason(i, node_limit, limits) is None:
            heaps.rescore(key, i, tie(i), run.node_part(i, scoring.static(i)))
        else:
            heaps.rescore(key, i, tie(i), None)
        for pos, limit in limits:
            if usage.value_counts[pos].get(key[pos], 0) >= limit.max_per:
                heaps.close(holding.get((pos, key[pos]), ()))
    return placements, counts


def _place_by_full_rescore(run: _Run, replicas: list[int]) -> tuple[list[Placement], dict[str, int]]:
    scoring, usage, tie = run.scoring, run.usage, run.tie
    candidates = mask_indices(run.static.mask)

    def scan() -> tuple[dict[str, int], int, int, int]:
        """(rejection counts, best node or -1, its score, feasible count) over every node."""
        counts = run.static.counts()
        best: tuple[int, int] | None = None
        best_i = -1
        feasible = 0
        for i in candidates:
            why = usage.reason(i, run.node_limit, run.limits)
            if why is not None:
                counts[why] = counts.get(why, 0) + 1
                continue
            feasible += 1
            total = run.node_part(i, scoring.static(i)) + scoring.group_part(scoring.group_key(i), usage.value_counts)
            candidate = (-total, tie(i))
            if best is None or candidate < best:
                best, best_i = candidate, i
        return counts, best_i, (-best[0] if best is not None else 0), feasible

    placements: list[Placement] = []
    first_counts, best_i, score, feasible = scan()
    for n, replica in enumerate(replicas):
        if n:
            _, best_i, score, feasible = scan()
        if best_i < 0:
            break
        placements.append(run.placement(replica, best_i, score, feasible))
        usage.place(best_i)
    return placements, first_counts


# ---------------------------------------------------------------- scaling down


def plan_stop(
    spec: WorkloadSpec,
    count: int,
    allocations: Iterable[Allocation],
    view: ClusterView | None = None,
    *,
    config: SchedulerConfig = DEFAULT_CONFIG,
) -> list[StopChoice]:
    """Which `count` of the workload's live allocations to stop, first to stop first.

    Preference, most stoppable first: replicas on nodes gone from the view or
    not alive; on nodes that no longer satisfy the constraints or take no new
    work; of an older version; not yet running; on the most over-represented
    spread value (per node, per zone...); on the least suitable, most loaded
    node; the highest replica index.
    """
    live = [a for a in allocations if a.live and a.workload == spec.name]
    count = max(0, min(count, len(live)))
    if count == 0:
        return []
    if view is None:
        view = ClusterView((), ())
    remaining = len(live) - count
    static = static_filters(spec, view)
    scoring = Scoring(spec, view, config, remaining, static.mask | _nodes_of(live, view))
    constraint_ok = view.all_mask
    failed_rule: list[tuple[int, str]] = []
    for c in spec.constraints:
        mask = rule_match(view, c)[0]
        failed_rule.append((mask, f"node no longer satisfies constraint {rule_text(c)}"))
        constraint_ok &= mask

    spreads = scoring.node_spreads + scoring.group_spreads
    counts: list[dict[str | None, int]] = [{} for _ in spreads]
    index_of = [view.index.get(a.node) for a in live]
    for i in index_of:
        if i is None:
            continue
        for term, per_value in zip(spreads, counts, strict=True):
            v = term.values[i]
            per_value[v] = per_value.get(v, 0) + 1

    fixed: list[tuple[int, float, str]] = []  # (tier, suitability, reason) per allocation
    for a, i in zip(live, index_of, strict=True):
        if i is None:
            fixed.append((5, 0.0, "node is gone"))
            continue
        node = view.nodes[i]
        load = (view.used_cpu[i] / max(1, view.cap_cpu[i]) + view.used_mem[i] / max(1, view.cap_mem[i])) / 2
        suitability = scoring.static(i) / scoring.denominator - load
        if node.state != "alive":
            fixed.append((4, suitability, f"node is {node.state}"))
        elif not (constraint_ok >> i) & 1:
            why = next(reason for mask, reason in failed_rule if not (mask >> i) & 1)
            fixed.append((3, suitability, why))
        elif not node.eligible:
            fixed.append((3, suitability, "node takes no new work"))
        elif a.version != spec.version:
            fixed.append((2, suitability, f"older version {a.version}"))
        elif a.state != "running":
            fixed.append((1, suitability, f"not running yet ({a.state})"))
        else:
            fixed.append((0, suitability, "least suitable node"))

    def excess(k: int) -> tuple[float, str]:
        i = index_of[k]
        if i is None:
            return 0.0, ""
        worst, why = 0.0, ""
        for term, per_value in zip(spreads, counts, strict=True):
            v = term.values[i]
            over = (per_value.get(v, 0) - term.target(v)) * term.weight
            if over > worst:
                worst = over
                where = "node" if term.attribute == "node" else f"{term.attribute}={v}"
                why = f"{where} holds {per_value.get(v, 0)} replicas, target {term.target(v):.1f}"
        return worst, why

    def key(k: int) -> tuple[int, float, float, int]:
        tier, suitability, _ = fixed[k]
        return (-tier, -excess(k)[0], suitability, -live[k].replica)

    # Lazy greedy: removing a replica only lowers spread excess, so a stale
    # key is an upper bound; re-check the top until it is fresh.
    heap = [(key(k), k) for k in range(len(live))]
    heapq.heapify(heap)
    chosen: list[StopChoice] = []
    while len(chosen) < count:
        stored, k = heapq.heappop(heap)
        fresh = key(k)
        if fresh != stored:
            heapq.heappush(heap, (fresh, k))
            continue
        tier, _, reason = fixed[k]
        over, spread_reason = excess(k)
        if tier == 0 and over > 0:
            reason = spread_reason
        a = live[k]
        chosen.append(StopChoice(allocation=a.id, node=a.node, replica=a.replica, reason=reason))
        i = index_of[k]
        if i is not None:
            for term, per_value in zip(spreads, counts, strict=True):
                per_value[term.values[i]] -= 1
    return chosen


def _nodes_of(allocations: Sequence[Allocation], view: ClusterView) -> int:
    mask = 0
    for a in allocations:
        i = view.index.get(a.node)
        if i is not None:
            mask |= 1 << i
    return mask


# ---------------------------------------------------------------- admission


def admit(spec: WorkloadSpec, view: ClusterView, architectures: Collection[str] | None = None) -> str | None:
    """None if some node of the cluster could run one replica of `spec` on an
    empty node; otherwise the reason it never could.

    Looks at every node in the view whatever its state (a dead device may come
    back) and at capacity, not current use (work may move away). Spread limits
    and anti-affinity depend on what else runs, so they are not admission
    questions.
    """
    if view.n == 0:
        return "no nodes in the cluster"
    matching = view.all_mask
    if architectures is not None:
        rule = architecture_rule(architectures)
        matching = rule_match(view, rule)[0]
        if not matching:
            return f"no node has an architecture the image is built for ({', '.join(rule.value)})"
    for c in spec.constraints:
        mask = rule_match(view, c)[0]
        if not mask:
            return f"no node satisfies constraint {rule_text(c)}"
        matching &= mask
    if not matching:
        texts = ", ".join(rule_text(c) for c in spec.constraints)
        return f"no node satisfies all constraints together ({texts})"
    nodes = [view.nodes[i] for i in mask_indices(matching)]
    need = spec.resources
    if max(node.cpu_millis for node in nodes) < need.cpu_millis:
        top = max(node.cpu_millis for node in nodes)
        return f"needs {need.cpu_millis}m cpu; the largest matching node has {top}m"
    if max(node.memory_bytes for node in nodes) < need.memory_bytes:
        top = max(node.memory_bytes for node in nodes)
        return f"needs {_bytes(need.memory_bytes)} memory; the largest matching node has {_bytes(top)}"
    if not any(n.cpu_millis >= need.cpu_millis and n.memory_bytes >= need.memory_bytes for n in nodes):
        return f"no matching node has both {need.cpu_millis}m cpu and {_bytes(need.memory_bytes)} memory"
    return None


def _bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


__all__ = ["admit", "default_rng", "plan_placements", "plan_stop"]
