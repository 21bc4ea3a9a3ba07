"""The scheduler: a sans-IO placement pipeline (Nomad-style).

view.py      NodeInfo, ClusterView — what the scheduler reads
feasible.py  filters, each recording why it rejected a node
rank.py      scorers (locality, reliability, cost, utilization, spread,
             anti-affinity), weights and normalisation
select.py    best node with seeded tie-breaking, incremental per replica
plan.py      Plan, Placement, FailedPlacement, StopChoice — what it returns
stack.py     the wiring: plan_placements, plan_stop, admit
"""

from cloudless.scheduler.plan import FailedPlacement, Placement, Plan, StopChoice, allocation_for, allocation_id
from cloudless.scheduler.rank import DEFAULT_CONFIG, SchedulerConfig, Weights
from cloudless.scheduler.stack import admit, default_rng, plan_placements, plan_stop
from cloudless.scheduler.view import ClusterView, InvalidView, NodeInfo

__all__ = [
    "DEFAULT_CONFIG",
    "ClusterView",
    "FailedPlacement",
    "InvalidView",
    "NodeInfo",
    "Placement",
    "Plan",
    "SchedulerConfig",
    "StopChoice",
    "Weights",
    "admit",
    "allocation_for",
    "allocation_id",
    "default_rng",
    "plan_placements",
    "plan_stop",
]
