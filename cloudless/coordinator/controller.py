"""The workload controller: on the Raft leader, make the allocations match the
workloads.

`reconcile(state, now, rng)` is the whole decision, pure: it reads the
workloads, their allocations and the nodes (as the scheduler sees them) and
returns at most one `CommitPlan` — one Raft entry for the round — plus the
time at which a waiting decision (a reschedule backoff, a rollout's health
gate) becomes due. Per workload, in order:

1. live allocations on nodes gossip declares dead or left (or that were
   removed) become `lost`, and are replaced at once;
2. a stopped workload gets nothing new;
3. a rollout in progress (live allocations of an older version) advances per
   the update strategy: new replicas up to `max_surge` extra, old ones stopped
   while at least `replicas - max_unavailable` stay available, new ones count
   only once healthy for `min_healthy_time_s`; a new version that fails its
   health gate (failed, unhealthy, crash-looping, or not healthy within
   `healthy_deadline_s`) is reverted to the last stable version when
   `auto_revert` is set, and otherwise held;
4. otherwise the replica count is enforced: failed replicas are rescheduled
   after the reschedule policy's backoff (on another node), lost ones at
   once, missing ones placed and extra ones stopped (`plan_stop`);
5. old terminal allocations are forgotten, and the placement explanations
   stored for `cloudless inspect`.

The trio driver (`cloudless.node.controller.WorkloadController`) gathers
the inputs from Raft and gossip, calls `reconcile`, proposes the plan and
sleeps until something changes; nothing here does IO.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from cloudless.scheduler import ClusterView, NodeInfo, admit, allocation_for, allocation_id, plan_placements, plan_stop
from cloudless.state.commands import CommitPlan
from cloudless.state.fsm import AllocationRecord, WorkloadRecord
from cloudless.state.workload import Allocation, WorkloadSpec

log = logging.getLogger(__name__)

# Terminal allocations kept for `inspect`, per workload, and how long at most.
KEEP_TERMINAL = 10
TERMINAL_TTL_S = 600.0
# Restarts of a new version's replica that count as failing its health gate.
ROLLOUT_MAX_RESTARTS = 3
TERMINAL = frozenset({"exited", "failed", "lost"})


@dataclass(frozen=True)
class ControllerState:
    """What one round reads: the replicated state's workloads and allocations,
    and every node the scheduler may use (state from gossip)."""

    workloads: Mapping[str, WorkloadRecord]
    allocations: Mapping[str, AllocationRecord]
    nodes: Sequence[NodeInfo]


@dataclass
class Decision:
    plan: CommitPlan | None
    wake_at: float | None = None  # when a waiting decision falls due (None: only on change)
    view: ClusterView | None = None  # the view after the plan, for the next round


@dataclass
class _Round:
    """Accumulates one round's plan."""

    view: ClusterView
    create: list[Allocation] = field(default_factory=list)
    replaces: dict[str, str] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    forget: list[str] = field(default_factory=list)
    explanations: dict[str, tuple[str, ...]] = field(default_factory=dict)
    stable: dict[str, int] = field(default_factory=dict)
    revert: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    wake_at: float | None = None

    def wake(self, at: float) -> None:
        self.wake_at = at if self.wake_at is None else min(self.wake_at, at)

    def add(self, allocations: Iterable[Allocation]) -> None:
        allocations = list(allocations)
        self.create.extend(allocations)
        self.view = self.view.with_allocations(upsert=allocations)

    def release(self, ids: Iterable[str]) -> None:
        self.view = self.view.with_allocations(remove=list(ids))

    def plan(self) -> CommitPlan | None:
        if not (
            self.create
            or self.stop
            or self.lost
            or self.forget
            or self.explanations
            or self.stable
            or self.revert
            or self.failed
        ):
            return None
        return CommitPlan(
            create=tuple(self.create),
            replaces=self.replaces,
            stop=tuple(dict.fromkeys(self.stop)),
            lost=tuple(self.lost),
            forget=tuple(self.forget),
            explanations=self.explanations,
            stable=self.stable,
            revert=self.revert,
            failed=self.failed,
        )


def reschedule_delay(spec: WorkloadSpec, reschedules: int) -> float | None:
    """Seconds to wait before replacing a replica that failed after `reschedules`
    earlier replacements; None when the policy allows no more."""
    policy = spec.reschedule
    if not policy.unlimited and reschedules >= policy.attempts:
        return None
    if policy.delay_function == "constant":
        return policy.delay_s
    return min(policy.max_delay_s, policy.delay_s * (2 ** min(reschedules, 32)))


def unavailable_allowed(spec: WorkloadSpec) -> int:
    u = spec.update
    if u.max_unavailable is not None:
        return u.max_unavailable
    if u.min_available is not None:
        return max(0, spec.replicas - u.min_available)
    return 0


def build_view(state: ControllerState) -> ClusterView:
    return ClusterView(state.nodes, (r.allocation for r in state.allocations.values()))


def reconcile(state: ControllerState, now: float, rng: random.Random, view: ClusterView | None = None) -> Decision:
    """One round of decisions for every workload (pure; see the module docstring).

    `view` may be the view a previous round returned, when neither nodes nor
    allocations changed since; otherwise it is built from `state`.
    """
    rnd = _Round(view if view is not None else build_view(state))
    gone = {n.node_id for n in state.nodes if n.state in ("dead", "left")}
    known = {n.node_id for n in state.nodes}
    by_workload: dict[str, list[AllocationRecord]] = {}
    for rec in state.allocations.values():
        by_workload.setdefault(rec.allocation.workload, []).append(rec)
    for name in sorted(state.workloads):
        record = state.workloads[name]
        recs = sorted(by_workload.get(name, []), key=lambda r: (r.created_at, r.allocation.id))
        _reconcile_workload(rnd, record, recs, gone, known, now, rng)
    # Allocations of workloads that no longer exist.
    for name, recs in by_workload.items():
        if name not in state.workloads:
            rnd.forget.extend(r.allocation.id for r in recs)
    return Decision(rnd.plan(), rnd.wake_at, rnd.view)


def _reconcile_workload(
    rnd: _Round,
    record: WorkloadRecord,
    recs: list[AllocationRecord],
    gone: set[str],
    known: set[str],
    now: float,
    rng: random.Random,
) -> None:
    spec = record.spec
    name = spec.name
    lines: list[str] = []

    # 1. Node death → lost.
    current: list[AllocationRecord] = []
    for rec in recs:
        a = rec.allocation
        if a.live and (a.node in gone or a.node not in known):
            rnd.lost.append(a.id)
            lost = msgspec.structs.replace(a, state="lost")
            rec = msgspec.structs.replace(rec, allocation=lost, state_since=now)
            rnd.release([a.id])
        current.append(rec)

    _forget_old(rnd, record, current, now)

    if record.stopped:
        rnd.stop.extend(r.allocation.id for r in current if r.desired == "run")
        _explain(rnd, record, lines)
        return

    holding = [r for r in current if r.desired == "run" and (r.allocation.live or _completed(r))]
    waiting = [
        r for r in current if r.desired == "run" and r.allocation.state in ("failed", "lost") and not r.replaced_by
    ]
    version = spec.version
    # Versions whose spec only differs in replica count run the same containers
    # (scaling and reverting do not restart anything).
    same = {v for v, s in record.history.items() if _content(s) == _content(spec)} | {version}
    old = [r for r in holding if r.allocation.version not in same]
    new = [r for r in holding if r.allocation.version in same]

    if version in record.failed_versions:
        lines.append(f"version {version} failed its rollout and is held; submit a new version")
        _explain(rnd, record, lines)
        return

    failure = _rollout_failure(
        spec, [r for r in current if r.allocation.version == version and r.desired == "run"], now
    )
    if not old and record.stable_version is not None and record.stable_version in same:
        failure = None  # nothing rolls out: the running containers are the stable ones
    if failure is not None and (old or record.stable_version not in (None, version)):
        lines.append(f"version {version} failed its health gate: {failure}")
        if spec.update.auto_revert and record.stable_version is not None and record.stable_version != version:
            rnd.revert[name] = version
            lines.append(f"reverting to version {record.stable_version}")
        else:
            rnd.failed[name] = version
        _explain(rnd, record, lines)
        return

    if old:
        _rollout(rnd, spec, old, new, waiting, now, rng, lines)
    else:
        _enforce_count(rnd, spec, holding, waiting, now, rng, lines)

    healthy = [r for r in new if _healthy_for(r, spec, now)]
    if not old and spec.replicas > 0 and len(healthy) >= spec.replicas and record.stable_version != version:
        rnd.stable[name] = version
    _explain(rnd, record, lines)


def _content(spec: WorkloadSpec) -> WorkloadSpec:
    return msgspec.structs.replace(spec, version=0, replicas=0)


def _completed(rec: AllocationRecord) -> bool:
    a = rec.allocation
    return a.state == "exited" and not rec.replaced_by


def _healthy_for(rec: AllocationRecord, spec: WorkloadSpec, now: float) -> bool:
    return rec.healthy_since is not None and now - rec.healthy_since >= spec.update.min_healthy_time_s


def _rollout_failure(spec: WorkloadSpec, recs: list[AllocationRecord], now: float) -> str | None:
    u = spec.update
    for rec in recs:
        a = rec.allocation
        if a.state == "failed":
            return f"{a.id} failed (exit code {a.exit_code})"
        if rec.health == "unhealthy":
            return f"{a.id} is unhealthy"
        if a.restarts >= ROLLOUT_MAX_RESTARTS and rec.healthy_since is None:
            return f"{a.id} restarted {a.restarts} times"
        if a.live and rec.healthy_since is None and now - rec.created_at > u.healthy_deadline_s:
            return f"{a.id} not healthy within {u.healthy_deadline_s:g}s"
    return None


def _rollout(
    rnd: _Round,
    spec: WorkloadSpec,
    old: list[AllocationRecord],
    new: list[AllocationRecord],
    waiting: list[AllocationRecord],
    now: float,
    rng: random.Random,
    lines: list[str],
) -> None:
    n = spec.replicas
    healthy_new = [r for r in new if _healthy_for(r, spec, now)]
    for r in new:
        if r.healthy_since is not None and r not in healthy_new:
            rnd.wake(r.healthy_since + spec.update.min_healthy_time_s)
        elif r.healthy_since is None:
            rnd.wake(r.created_at + spec.update.healthy_deadline_s)
    old_ok = [r for r in old if r.allocation.state == "running" and r.health != "unhealthy"]
    old_bad = [r for r in old if r not in old_ok]
    # Old replicas that serve nothing go at once; failed/lost ones are not replaced by old versions.
    stop = [r.allocation.id for r in old_bad]
    stop.extend(r.allocation.id for r in waiting)
    available = len(old_ok) + len(healthy_new)
    floor = n - unavailable_allowed(spec)
    k = max(0, min(len(old_ok), available - floor))
    victims = sorted(old_ok, key=lambda r: (r.allocation.version, -r.allocation.replica))[:k]
    stop.extend(r.allocation.id for r in victims)
    rnd.stop.extend(stop)
    rnd.release(stop)
    live_after = len(old) + len(new) - len(old_bad) - len(victims)
    room = min(n - len(new), n + spec.update.max_surge - live_after)
    if room > 0:
        plan = plan_placements(spec, room, rnd.view, [r.allocation for r in new if r.allocation.live], rng=rng)
        rnd.add(allocation_for(spec, p, allocation_id(spec, p.replica, rng)) for p in plan.placements)
        lines.extend(plan.explain())
    lines.append(
        f"rolling out version {spec.version}: {len(healthy_new)}/{n} new replicas healthy, {len(old) - len(victims) - len(old_bad)} old remain"
    )


def _enforce_count(
    rnd: _Round,
    spec: WorkloadSpec,
    holding: list[AllocationRecord],
    waiting: list[AllocationRecord],
    now: float,
    rng: random.Random,
    lines: list[str],
) -> None:
    n = spec.replicas
    live = [r for r in holding if r.allocation.live]
    if len(holding) > n:
        choices = plan_stop(spec, len(holding) - n, [r.allocation for r in live], rnd.view)
        rnd.stop.extend(c.allocation for c in choices)
        rnd.release(c.allocation for c in choices)
        lines.extend(f"stopping {c.allocation} on {c.node}: {c.reason}" for c in choices)
        rnd.stop.extend(r.allocation.id for r in waiting)  # enough replicas: failed ones are not replaced
        return
    missing = n - len(holding)
    taken = {r.allocation.replica for r in holding}
    for rec in sorted(waiting, key=lambda r: r.state_since):
        if missing <= 0:
            rnd.stop.append(rec.allocation.id)
            continue
        missing -= 1
        a = rec.allocation
        if a.state == "lost":
            delay: float | None = 0.0
        else:
            delay = reschedule_delay(spec, rec.reschedules)
        if delay is None:
            lines.append(f"replica {a.replica} failed ({a.id}); the reschedule policy allows no more attempts")
            continue
        due = rec.state_since + delay
        if due > now:
            rnd.wake(due)
            lines.append(f"replica {a.replica} failed ({a.id}); rescheduling after a {delay:g}s backoff")
            continue
        replica = a.replica if a.replica not in taken else None
        view = rnd.view
        if a.state == "failed":
            view = _without_node(view, a.node)
        indexes = [replica] if replica is not None else None
        plan = plan_placements(spec, 1, view, [r.allocation for r in live], rng=rng, replica_indexes=indexes)
        if not plan.placements:
            lines.extend(plan.explain())
            continue
        placed = allocation_for(spec, plan.placements[0], allocation_id(spec, plan.placements[0].replica, rng))
        taken.add(placed.replica)
        rnd.add([placed])
        rnd.replaces[placed.id] = a.id
        rnd.stop.append(a.id)
        lines.append(f"replica {a.replica} rescheduled ({a.state} {a.id}) → {placed.node}")
    if missing > 0:
        plan = plan_placements(spec, missing, rnd.view, [r.allocation for r in live], rng=rng)
        rnd.add(allocation_for(spec, p, allocation_id(spec, p.replica, rng)) for p in plan.placements)
        lines.extend(plan.explain())


def _without_node(view: ClusterView, node_id: str) -> ClusterView:
    """The view with `node_id` taking no new work (a failed replica moves elsewhere if it can)."""
    if node_id not in view.index:
        return view
    nodes = [msgspec.structs.replace(n, eligible=False) if n.node_id == node_id else n for n in view.nodes]
    candidate = ClusterView(nodes, view.allocations.values())
    if not any(n.eligible and n.state == "alive" for n in nodes):
        return view
    return candidate


def _forget_old(rnd: _Round, record: WorkloadRecord, recs: list[AllocationRecord], now: float) -> None:
    done = [r for r in recs if r.allocation.state in TERMINAL and (r.desired == "stop" or r.replaced_by)]
    done.sort(key=lambda r: r.state_since)
    excess = max(0, len(done) - max(KEEP_TERMINAL, record.spec.replicas))
    for i, r in enumerate(done):
        if i < excess or now - r.state_since > TERMINAL_TTL_S:
            rnd.forget.append(r.allocation.id)


def _explain(rnd: _Round, record: WorkloadRecord, lines: list[str]) -> None:
    # The last explanation stays until there is a new one: inspect shows why
    # replicas went where they are even when this round had nothing to decide.
    if lines and tuple(lines) != tuple(record.explanations):
        rnd.explanations[record.spec.name] = tuple(lines)


def admission_error(spec: WorkloadSpec, nodes: Sequence[NodeInfo]) -> str | None:
    """Why `spec` could never be placed on these nodes (None: it could)."""
    return admit(spec, ClusterView(nodes, ()))
