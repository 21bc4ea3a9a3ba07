"""Autopilot: which members should be Raft voters, and the next safe step
towards that.

Pure (no clock, no IO): the leader calls `plan()` with what gossip and Raft
know about every member and `now`, applies the first returned action through
a Raft configuration change, waits for it to commit, and asks again. One
change at a time keeps every intermediate configuration safe.

Policy, in priority order:
1. Drop members that left or are dead as learners (no quorum effect).
2. Promote a chosen learner once it is caught up.
3. Add a chosen, stable non-member as a learner (it catches up first).
4. Remove a dead or unsuitable voter when the remaining voters still form a
   quorum among themselves, or when there are more voters than desired.
5. Hand leadership away before demoting ourselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

MemberState = Literal["alive", "suspect", "dead", "left"]
RaftRole = Literal["voter", "learner", "none"]


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    state: MemberState
    raft_role: RaftRole = "none"
    power: Literal["ac", "battery"] = "ac"
    battery_pct: float | None = None
    charging: bool = False
    network: Literal["wired", "wifi", "metered"] = "wired"
    zone: str = ""
    alive_since: float = 0.0  # when gossip last saw it become alive
    flaps: int = 0  # failures (alive -> suspect/dead) in the recent window
    caught_up: bool = False  # a learner whose match index is near the leader's
    down_since: float | None = None  # when it became suspect/dead, if it is
    trusted: bool = True  # enrolled to coordinate; the caller says (a device without it never votes)


@dataclass(frozen=True, slots=True)
class AutopilotConfig:
    # (minimum eligible members, voters wanted), highest threshold first
    voter_targets: tuple[tuple[int, int], ...] = ((7, 5), (3, 3), (1, 1))
    stabilization_s: float = 10.0
    min_battery_pct: float = 30.0
    max_flaps: int = 3
    zone_spread_bonus: float = 15.0
    # A member that failed this recently still counts when sizing the voter
    # set, so one crash in a 3-node cluster does not shrink it to 1 voter.
    down_grace_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Action:
    kind: Literal["add_learner", "promote", "demote", "remove", "transfer_leadership"]
    node_id: str
    reason: str


@dataclass(slots=True)
class Plan:
    desired_voters: tuple[str, ...]
    actions: list[Action] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    ineligible: dict[str, str] = field(default_factory=dict)  # node -> why


def reliability_score(c: Candidate, now: float) -> float:
    """Higher is a better coordinator: mains power, wired, long uptime, no flaps."""
    score = 0.0
    if c.power == "ac":
        score += 40.0
    else:
        score += 10.0 * (c.battery_pct or 0.0) / 100.0 + (10.0 if c.charging else 0.0)
    score += {"wired": 20.0, "wifi": 10.0, "metered": 0.0}[c.network]
    uptime = max(0.0, now - c.alive_since)
    score += min(20.0, 4.0 * math.log2(1.0 + uptime / 60.0))  # saturates after ~2 hours
    score -= 10.0 * c.flaps
    if c.state == "suspect" and c.raft_role != "voter":
        score -= 50.0
    return score


def ineligibility(c: Candidate, now: float, config: AutopilotConfig) -> str | None:
    if not c.trusted:
        return "not trusted to coordinate (enrolled without --trust coordinator)"
    if c.state in ("dead", "left"):
        return f"member is {c.state}"
    if c.state == "suspect" and c.raft_role != "voter":
        # A suspicion is often refuted within seconds: a voter keeps its seat
        # until it is declared dead; others wait before being promoted.
        return "member is suspect"
    if c.power == "battery" and not c.charging and (c.battery_pct or 0.0) < config.min_battery_pct:
        return f"on battery at {c.battery_pct or 0:.0f}% (< {config.min_battery_pct:.0f}%)"
    if c.flaps > config.max_flaps:
        return f"flapped {c.flaps} times recently"
    return None


def voters_wanted(eligible: int, config: AutopilotConfig) -> int:
    for threshold, voters in config.voter_targets:
        if eligible >= threshold:
            return voters
    return 1


def choose_voters(
    candidates: list[Candidate], now: float, config: AutopilotConfig, leader_id: str = ""
) -> tuple[list[str], dict[str, float], dict[str, str]]:
    scores = {c.node_id: reliability_score(c, now) for c in candidates}
    ineligible: dict[str, str] = {}
    eligible: list[Candidate] = []
    for c in candidates:
        why = ineligibility(c, now, config)
        if why is None:
            eligible.append(c)
        else:
            ineligible[c.node_id] = why
    recently_down = [
        c
        for c in candidates
        if c.state in ("suspect", "dead")
        and c.node_id in ineligible
        and c.down_since is not None
        and now - c.down_since < config.down_grace_s
    ]
    wanted = min(voters_wanted(len(eligible) + len(recently_down), config), len(eligible))

    # Incumbents get a small edge so near-ties do not churn the configuration.
    # The leader breaks ties in its own favour: keeping it avoids a transfer.
    def base(c: Candidate) -> float:
        return scores[c.node_id] + (5.0 if c.raft_role == "voter" else 0.0) + (1.0 if c.node_id == leader_id else 0.0)

    chosen: list[Candidate] = []
    pool = list(eligible)
    zones: set[str] = set()
    while pool and len(chosen) < wanted:
        best = max(
            pool,
            key=lambda c: (base(c) + (config.zone_spread_bonus if c.zone not in zones else 0.0), c.node_id),
        )
        chosen.append(best)
        zones.add(best.zone)
        pool.remove(best)
    return sorted(c.node_id for c in chosen), scores, ineligible


def plan(candidates: list[Candidate], leader_id: str, now: float, config: AutopilotConfig = AutopilotConfig()) -> Plan:
    by_id = {c.node_id: c for c in candidates}
    desired, scores, ineligible = choose_voters(candidates, now, config, leader_id)
    result = Plan(desired_voters=tuple(desired), scores=scores, ineligible=ineligible)
    desired_set = set(desired)
    voters = [c for c in candidates if c.raft_role == "voter"]
    learners = [c for c in candidates if c.raft_role == "learner"]
    acts = result.actions

    for c in sorted(learners, key=lambda c: c.node_id):
        if c.state in ("dead", "left"):
            acts.append(Action("remove", c.node_id, f"learner is {c.state}"))
    for c in sorted(learners, key=lambda c: -scores[c.node_id]):
        if c.node_id in desired_set and c.caught_up and c.state == "alive":
            acts.append(Action("promote", c.node_id, f"chosen as voter (score {scores[c.node_id]:.0f}) and caught up"))
    for node_id in desired:
        c = by_id[node_id]
        if c.raft_role == "none" and now - c.alive_since >= config.stabilization_s:
            acts.append(
                Action(
                    "add_learner",
                    node_id,
                    f"chosen as voter (score {scores[node_id]:.0f}); joins as learner to catch up",
                )
            )

    healthy_voters = [v for v in voters if v.state == "alive"]
    for v in sorted(voters, key=lambda v: (v.state == "alive", scores[v.node_id])):
        if v.node_id in desired_set:
            continue
        remaining = len(voters) - 1
        if remaining < 1:
            continue
        healthy_after = len([h for h in healthy_voters if h.node_id != v.node_id])
        keeps_quorum = healthy_after >= remaining // 2 + 1
        # Shrink only once the replacements are in place, unless the voter is
        # dead (then it only weakens the quorum by staying).
        replaced = len([x for x in voters if x.node_id in desired_set]) >= len(desired)
        if not keeps_quorum or not (replaced or v.state in ("dead", "left")):
            continue
        why = ineligible.get(v.node_id) or f"better voters available (score {scores[v.node_id]:.0f})"
        if v.node_id == leader_id:
            successor = max(
                (h for h in healthy_voters if h.node_id != leader_id and h.node_id in desired_set),
                key=lambda h: scores[h.node_id],
                default=None,
            )
            if successor is not None:
                acts.append(Action("transfer_leadership", successor.node_id, f"leader {leader_id} steps down: {why}"))
            continue
        kind = "remove" if v.state in ("dead", "left") else "demote"
        acts.append(Action(kind, v.node_id, why))
    return result
