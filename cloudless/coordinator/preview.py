"""`cloudless apply --dry-run`: what submitting a spec would do now, decided
by the same scheduler the controller uses, without changing anything.

`preview(spec, state)` is pure, like `reconcile`: it reads the workloads,
allocations and nodes (`ControllerState`) and returns a `Preview` — whether
the spec creates, updates, rescales or leaves the workload unchanged; the
node each replica would go to; for any replica that cannot be placed, the
scheduler's rejection counts; and why each node that could not take a
replica was rejected. The reasons are the scheduler's own strings, passed
through as they are (a new feasibility filter needs nothing here).

Ties between equally scored nodes break with the workload's seeded
generator, so a preview is reproducible but the controller (which draws
from its own generator) may pick another node among equals.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from cloudless.coordinator.controller import ControllerState, admission_error, build_view
from cloudless.scheduler import default_rng, plan_placements, plan_stop
from cloudless.state.workload import WorkloadSpec

Action = Literal["create", "update", "scale", "unchanged"]


class PreviewPlacement(msgspec.Struct, frozen=True):
    """Replica `replica` would go to `node` (score in [-1, 1], each scorer's part)."""

    replica: int
    node: str
    score: float
    components: dict[str, float]
    feasible: int  # nodes that could have taken it


class PreviewFailure(msgspec.Struct, frozen=True):
    """Replica `replica` could not be placed now: `reasons` counts the nodes rejected for each reason."""

    replica: int
    nodes: int
    feasible: int
    reasons: dict[str, int]
    message: str


class PreviewKept(msgspec.Struct, frozen=True):
    """A replica that already runs and would stay where it is."""

    allocation: str
    node: str
    replica: int
    state: str


class PreviewStop(msgspec.Struct, frozen=True):
    """A replica that would be stopped (scaling down), and why it was picked."""

    allocation: str
    node: str
    replica: int
    reason: str


class Preview(msgspec.Struct, frozen=True):
    name: str
    action: Action
    version: int  # the version the spec would become (the current one when unchanged)
    current_version: int | None
    replicas: int
    nodes: int  # nodes the scheduler looked at
    refused: str = ""  # non-empty: the cluster would refuse the spec, and why
    placements: tuple[PreviewPlacement, ...] = ()
    failures: tuple[PreviewFailure, ...] = ()
    kept: tuple[PreviewKept, ...] = ()
    stops: tuple[PreviewStop, ...] = ()
    node_reasons: dict[str, str] = {}  # node -> why it could not take a replica
    notes: tuple[str, ...] = ()


def _content(spec: WorkloadSpec) -> WorkloadSpec:
    """What decides the containers (the controller's rule: replicas and version do not)."""
    return msgspec.structs.replace(spec, version=0, replicas=0)


def preview(spec: WorkloadSpec, state: ControllerState) -> Preview:
    """What submitting `spec` (validated) would do on `state` now; see the module docstring."""
    record = state.workloads.get(spec.name)
    view = build_view(state)
    recs = [r for r in state.allocations.values() if r.allocation.workload == spec.name]
    notes: list[str] = []
    kept_recs = []
    current = record.spec.version if record is not None else None
    if record is None or record.stopped:
        action: Action = "create"
        version = 1 if record is None else record.spec.version + 1
    elif msgspec.structs.replace(spec, version=record.spec.version) == record.spec:
        action, version = "unchanged", record.spec.version
    elif _content(spec) == _content(record.spec):
        action, version = "scale", record.spec.version + 1
    else:
        action, version = "update", record.spec.version + 1
    candidate = msgspec.structs.replace(spec, version=version)

    if action in ("scale", "unchanged"):
        # The running replicas stay; only the difference is placed or stopped.
        kept_recs = [
            r
            for r in recs
            if r.desired == "run" and (r.allocation.live or (r.allocation.state == "exited" and not r.replaced_by))
        ]
    elif action == "update":
        old = [r.allocation.id for r in recs if r.desired == "run" and r.allocation.live]
        view = view.with_allocations(remove=old)
        u = candidate.update
        notes.append(
            f"rolling update from version {current}: at most {u.max_surge} extra replica(s) at a time; "
            f"shown is where the {candidate.replicas} new replica(s) go once the old ones are released"
        )

    stops: list[PreviewStop] = []
    excess = len(kept_recs) - candidate.replicas
    if excess > 0:
        live = [r.allocation for r in kept_recs if r.allocation.live]
        for choice in plan_stop(candidate, excess, live, view):
            stops.append(PreviewStop(choice.allocation, choice.node, choice.replica, choice.reason))
    stopped = {s.allocation for s in stops}
    kept = tuple(
        PreviewKept(r.allocation.id, r.allocation.node, r.allocation.replica, r.allocation.state)
        for r in kept_recs
        if r.allocation.id not in stopped
    )
    missing = max(0, candidate.replicas - len(kept_recs))
    plan = plan_placements(
        candidate,
        missing,
        view,
        [r.allocation for r in kept_recs if r.allocation.live],
        rng=default_rng(candidate),
        explain_nodes=True,
    )
    return Preview(
        name=spec.name,
        action=action,
        version=version,
        current_version=current,
        replicas=candidate.replicas,
        nodes=plan.nodes,
        refused=admission_error(candidate, state.nodes) or "",
        placements=tuple(
            PreviewPlacement(p.replica, p.node, p.score, dict(p.components), p.feasible) for p in plan.placements
        ),
        failures=tuple(
            PreviewFailure(f.replica, f.nodes, f.feasible, dict(f.rejections), f.message) for f in plan.failures
        ),
        kept=kept,
        stops=tuple(stops),
        node_reasons=dict(plan.node_reasons),
        notes=tuple(notes),
    )
