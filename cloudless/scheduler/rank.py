"""Scorers and their normalisation.

Each scorer gives a node a score in a fixed range — locality (affinities)
[-1, 1], reliability [0, 1], cost [0, 1], utilization [0, 1], spread [-1, 1],
anti-affinity [-1, 0] — and the total is their weighted mean (Nomad's
`ScoreNormalizationIterator`), so the total is in [-1, 1] too. Rule weights
(an affinity's or spread's `weight`, 50 = 1×) scale their scorer's share.

Normalising by fixed ranges rather than by the spread of the current
candidates is what keeps placement incremental: a node's score never
depends on the other nodes' scores, so placing a replica changes only the
chosen node's terms and the spread terms of its values.

Scores are kept as integers (total × 10⁹) split into a per-node part and a
per-spread-group part. Integer addition is exact, so the incremental
selector (best node per group + group term) and a full rescore rank nodes
identically — floats could round a sum into a tie one way and not the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec

from cloudless.scheduler.feasible import rule_match, scope_mask
from cloudless.scheduler.select import TieBreak
from cloudless.scheduler.view import ClusterView, NodeInfo, mask_indices
from cloudless.state.workload import Spread, WorkloadSpec

SCALE = 1_000_000_000
RULE_UNIT = 50.0  # a rule weight of 50 counts as one scorer


Weight = Annotated[float, msgspec.Meta(ge=0, le=1000)]


class Weights(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How much each scorer counts in the normalised total (0 switches it off)."""

    locality: Weight = 1.0
    reliability: Weight = 1.0
    cost: Weight = 0.5
    utilization: Weight = 1.0
    spread: Weight = 1.0
    anti_affinity: Weight = 1.0


class SchedulerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    weights: Weights = Weights()
    # binpack fills nodes (fewer devices busy, others free for big work);
    # spread levels load across devices.
    utilization: Literal["binpack", "spread"] = "binpack"
    cost_label: str = "cost"
    # A soft per-node spread for workloads without one, so replicas do not
    # pile onto one device (Kubernetes' default spreading). 0 turns it off.
    default_node_spread_weight: int = 50


DEFAULT_CONFIG = SchedulerConfig()


def reliability_score(node: NodeInfo) -> float:
    """How dependable a home this node is, in [0, 1].

    Mains power beats battery (a charging battery nearly as good), wired
    beats wifi beats cellular and metered links are penalised — a phone on
    mobile data is the worst host for a server — and long uptime without
    recent flaps counts for stability.
    """
    if node.power == "ac":
        power = 1.0
    else:
        power = 0.6 * (node.battery_percent or 0) / 100.0 + (0.3 if node.charging else 0.0)
    network = {"wired": 1.0, "wifi": 0.8, "cellular": 0.5}[node.network]
    if node.metered:
        network *= 0.5
    # log-scaled uptime, saturating after ~34 hours (2^11 minutes)
    uptime = min(1.0, math.log2(1.0 + max(0.0, node.uptime_s) / 60.0) / 11.0)
    stability = 1.0 / (1.0 + max(0, node.flaps))
    return 0.35 * power + 0.25 * network + 0.2 * uptime + 0.2 * stability


def reliability_scores(view: ClusterView) -> tuple[float, ...]:
    return view.memo(("reliability",), lambda: tuple(reliability_score(node) for node in view.nodes))


def cost_scores(view: ClusterView, label: str) -> tuple[tuple[float, ...], bool]:
    """Per-node cost score in [0, 1] (1: free), and whether any node is priced at all.

    The label holds a non-negative price (per hour, say); a node without it —
    a device someone already owns — costs nothing. Unparseable prices count
    as unpriced.
    """

    def compute() -> tuple[tuple[float, ...], bool]:
        prices = []
        for node in view.nodes:
            raw = node.labels.get(label)
            try:
                price = float(raw) if raw is not None else 0.0
            except ValueError:
                price = 0.0
            prices.append(price if math.isfinite(price) and price > 0 else 0.0)
        top = max(prices, default=0.0)
        if top <= 0:
            return tuple(1.0 for _ in prices), False
        return tuple(1.0 - p / top for p in prices), True

    return view.memo(("cost", label), compute)


def spread_score(target: float, count: int) -> float:
    """(target − count) / target, clamped to [-1, 1]: below target attracts, above repels."""
    if target <= 0:
        return -1.0
    s = (target - count) / target
    return 1.0 if s > 1.0 else (-1.0 if s < -1.0 else s)


class SpreadTerm:
    """One spread rule prepared for a plan: per-node values and per-value targets."""

    __slots__ = ("attribute", "coef", "default_target", "max_per", "targets", "values", "weight")

    def __init__(
        self,
        spread: Spread,
        values: Sequence[str | None],
        present: set[str | None],
        total: int,
        coef: float,
    ) -> None:
        self.attribute = spread.attribute
        self.values = values
        self.weight = spread.weight
        self.coef = coef
        self.max_per = spread.max_per
        listed = {t.value: t.percent for t in spread.targets}
        self.targets = {v: p / 100.0 * total for v, p in listed.items()}
        if listed:
            unlisted = len(present - set(listed))
            rest = max(0, 100 - sum(listed.values())) / 100.0 * total
            self.default_target = rest / unlisted if unlisted else 0.0
        else:
            self.default_target = total / len(present) if present else 0.0

    def target(self, value: str | None) -> float:
        return self.targets.get(value, self.default_target)  # type: ignore[arg-type]

    def score(self, value: str | None, count: int) -> float:
        return spread_score(self.target(value), count)


class Scoring:
    """The scorers prepared for one plan: weights, static per-node terms, spread targets."""

    def __init__(
        self,
        spec: WorkloadSpec,
        view: ClusterView,
        config: SchedulerConfig,
        total_replicas: int,
        feasible_mask: int,
    ) -> None:
        w = config.weights
        self.view = view
        self.cpu_need = spec.resources.cpu_millis
        self.mem_need = spec.resources.memory_bytes
        self.cpu_need_f = float(self.cpu_need)
        self.mem_need_f = float(self.mem_need)
        self.binpack = config.utilization == "binpack"
        self.reliability = reliability_scores(view)
        self.cost_label = config.cost_label
        self.cost, priced = cost_scores(view, config.cost_label)
        self.w_rel = w.reliability
        self.w_cost = w.cost if priced else 0.0
        self.w_util = w.utilization
        denominator = self.w_rel + self.w_cost + self.w_util

        # Affinities: per-node value lookups against the set of matching values.
        self.affinities: list[tuple[Sequence[str | None], frozenset[str | None], float]] = []
        self.affinity_units: list[float] = []  # each affinity's weight / 50, unweighted by the scorer
        affinity_weight = sum(abs(a.weight) for a in spec.affinities) / RULE_UNIT
        self.locality_denominator = affinity_weight
        for a in spec.affinities:
            _, values = rule_match(view, a)
            self.affinities.append((view.attribute(a.attribute).values, values, w.locality * a.weight / RULE_UNIT))
            self.affinity_units.append(a.weight / RULE_UNIT)
        denominator += w.locality * affinity_weight

        # Soft anti-affinity: a fixed penalty on nodes sharing scope with the other workload.
        soft = [r for r in spec.anti_affinities if not r.hard]
        self.anti_denominator = sum(r.weight for r in soft) / RULE_UNIT
        self.anti_masks: list[tuple[int, float]] = []
        for r in soft:
            self.anti_masks.append((scope_mask(view, r.workload, r.attribute), r.weight / RULE_UNIT))
        denominator += w.anti_affinity * self.anti_denominator
        # Expand the anti-affinity masks into a per-node penalty only for penalised nodes.
        self.anti_penalty: dict[int, float] = {}
        for mask, coef in self.anti_masks:
            for i in mask_indices(mask & feasible_mask):
                self.anti_penalty[i] = self.anti_penalty.get(i, 0.0) - w.anti_affinity * coef

        # Spreads: "node" ones are per-node terms, others are shared by every
        # node with the same value (a spread group).
        spreads = list(spec.spreads)
        if config.default_node_spread_weight and not any(s.attribute == "node" for s in spreads):
            spreads.append(Spread(attribute="node", weight=config.default_node_spread_weight))
        spread_weight = sum(s.weight for s in spreads) / RULE_UNIT
        self.spread_denominator = spread_weight
        denominator += w.spread * spread_weight
        feasible_count = feasible_mask.bit_count()
        self.node_spreads: list[SpreadTerm] = []
        self.group_spreads: list[SpreadTerm] = []
        for s in spreads:
            coef = w.spread * s.weight / RULE_UNIT
            if s.attribute == "node":
                ids = view.attribute("node").values
                present: set[str | None] = set()
                if s.targets:
                    present = {ids[i] for i in mask_indices(feasible_mask)}
                term = SpreadTerm(s, ids, present, total_replicas, coef)
                if not s.targets:
                    term.default_target = total_replicas / feasible_count if feasible_count else 0.0
                self.node_spreads.append(term)
            else:
                index = view.attribute(s.attribute)
                present = {v for v, m in index.masks.items() if m & feasible_mask}
                self.group_spreads.append(SpreadTerm(s, index.values, present, total_replicas, coef))
        self.node_limit = next((s.max_per for s in self.node_spreads if s.max_per), 0)
        self.denominator = denominator if denominator > 0 else 1.0  # every weight 0: all nodes tie
        self.k = SCALE / self.denominator

    # -- per-node ---------------------------------------------------------------
    # `static`/`node_part` score one node; `entries` scores many with list
    # comprehensions (the first decision's hot loop). Both must do the same
    # float operations in the same order, so their integers agree exactly —
    # the incremental-vs-full-rescore property test checks it.

    def static(self, i: int) -> float:
        """Weighted terms that do not change while the plan places replicas."""
        x = self.w_rel * self.reliability[i] + self.w_cost * self.cost[i]
        for values, matching, coef in self.affinities:
            if values[i] in matching:
                x += coef
        if self.anti_penalty:
            x += self.anti_penalty.get(i, 0.0)
        return x

    # Utilization works on floats (exact for integers below 2**53): float
    # arithmetic is cheaper than on multi-digit ints such as memory sizes.
    def utilization(self, i: int, used_cpu: int, used_mem: int) -> float:
        view = self.view
        u = (
            (float(used_cpu) + self.cpu_need_f) / view.cap_cpu_f[i]
            + (float(used_mem) + self.mem_need_f) / view.cap_mem_f[i]
        ) * 0.5
        return u if self.binpack else 1.0 - u

    def node_part(self, i: int, static: float, used_cpu: int, used_mem: int, count: int) -> int:
        view = self.view
        u = (
            (float(used_cpu) + self.cpu_need_f) / view.cap_cpu_f[i]
            + (float(used_mem) + self.mem_need_f) / view.cap_mem_f[i]
        ) * 0.5
        x = static + self.w_util * (u if self.binpack else 1.0 - u)
        for term in self.node_spreads:
            x += term.coef * term.score(term.values[i], count)
        return int(x * self.k)

    def entries(
        self,
        fit: Sequence[int],
        used_cpu: Sequence[int],
        used_mem: Sequence[int],
        node_counts: dict[int, int],
        tie: TieBreak,
    ) -> list[tuple[int, int, int]]:
        """Selection entries (−node part, tie-break rank, node) for the nodes `fit`.

        The first decision's hot loop: two list comprehensions over the
        feasible nodes, no per-node calls in the common case.
        """
        view = self.view
        w_rel, w_cost, rel, cost = self.w_rel, self.w_cost, self.reliability, self.cost
        base = view.memo(
            ("base", w_rel, w_cost, self.cost_label),
            lambda: tuple(w_rel * r + w_cost * c for r, c in zip(rel, cost, strict=True)),
        )
        cap_cpu, cap_mem = view.cap_cpu_f, view.cap_mem_f
        nc, nm, wu = self.cpu_need_f, self.mem_need_f, self.w_util
        if used_cpu is view.used_cpu and used_mem is view.used_mem:
            used_cpu, used_mem = view.used_floats()
        else:
            used_cpu, used_mem = [float(u) for u in used_cpu], [float(u) for u in used_mem]
        if self.affinities or self.anti_penalty:
            st = [base[i] for i in fit]
            for values, matching, coef in self.affinities:
                st = [s + coef if values[i] in matching else s for s, i in zip(st, fit, strict=True)]
            if self.anti_penalty:
                penalty = self.anti_penalty
                st = [s + penalty.get(i, 0.0) for s, i in zip(st, fit, strict=True)]
            if self.binpack:
                xs = [
                    s + wu * (((used_cpu[i] + nc) / cap_cpu[i] + (used_mem[i] + nm) / cap_mem[i]) * 0.5)
                    for s, i in zip(st, fit, strict=True)
                ]
            else:
                xs = [
                    s + wu * (1.0 - ((used_cpu[i] + nc) / cap_cpu[i] + (used_mem[i] + nm) / cap_mem[i]) * 0.5)
                    for s, i in zip(st, fit, strict=True)
                ]
        elif self.binpack:
            xs = [
                base[i] + wu * (((used_cpu[i] + nc) / cap_cpu[i] + (used_mem[i] + nm) / cap_mem[i]) * 0.5) for i in fit
            ]
        else:
            xs = [
                base[i] + wu * (1.0 - ((used_cpu[i] + nc) / cap_cpu[i] + (used_mem[i] + nm) / cap_mem[i]) * 0.5)
                for i in fit
            ]
        k, a, b, m = self.k, tie.a, tie.b, tie.mask
        if not self.node_spreads:
            return [(-int(x * k), (i * a + b) & m, i) for x, i in zip(xs, fit, strict=True)]
        term = self.node_spreads[0]  # spread attributes are unique: at most one per-node spread
        coef = term.coef
        if term.targets:
            values, score = term.values, term.score
            return [
                (-int((x + coef * score(values[i], node_counts.get(i, 0))) * k), (i * a + b) & m, i)
                for x, i in zip(xs, fit, strict=True)
            ]
        target = term.default_target
        empty = coef * spread_score(target, 0)
        return [
            (
                -int((x + (empty if i not in node_counts else coef * spread_score(target, node_counts[i]))) * k),
                (i * a + b) & m,
                i,
            )
            for x, i in zip(xs, fit, strict=True)
        ]

    def group_part(self, key: tuple[str | None, ...], counts: Sequence[dict[str | None, int]]) -> int:
        x = 0.0
        for term, value, per_value in zip(self.group_spreads, key, counts, strict=True):
            x += term.coef * term.score(value, per_value.get(value, 0))
        return int(x * self.k)

    def group_key(self, i: int) -> tuple[str | None, ...]:
        return tuple(term.values[i] for term in self.group_spreads)

    # -- explanations ---------------------------------------------------------------

    def components(
        self, i: int, used_cpu: int, used_mem: int, count: int, counts: Sequence[dict[str | None, int]]
    ) -> dict[str, float]:
        """Each scorer's own score for node i (before weighting), for `cloudless inspect`."""
        out = {
            "reliability": round(self.reliability[i], 4),
            "utilization": round(self.utilization(i, used_cpu, used_mem), 4),
        }
        if self.w_cost:
            out["cost"] = round(self.cost[i], 4)
        if self.affinities:
            matched = sum(
                unit
                for (values, matching, _), unit in zip(self.affinities, self.affinity_units, strict=True)
                if values[i] in matching
            )
            out["locality"] = round(matched / self.locality_denominator, 4)
        if self.anti_masks:
            out["anti_affinity"] = round(-sum(c for m, c in self.anti_masks if (m >> i) & 1) / self.anti_denominator, 4)
        if self.node_spreads or self.group_spreads:
            total = 0.0
            for term in self.node_spreads:
                total += term.weight * term.score(term.values[i], count)
            for term, per_value in zip(self.group_spreads, counts, strict=True):
                value = term.values[i]
                total += term.weight * term.score(value, per_value.get(value, 0))
            out["spread"] = round(total / (self.spread_denominator * RULE_UNIT), 4)
        return out
