"""Majority arithmetic over a configuration's voters, and configuration changes.

Membership changes are single-server (thesis §4.1/§4.2): each change adds or
removes one voter, so any majority of the old voters overlaps any majority
of the new. `apply_conf_change` is the one place a ConfState changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum

from cloudless.raft.messages import ConfChange, ConfChangeType, ConfState


class VoteResult(str, Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


def majority(n: int) -> int:
    return n // 2 + 1


def committed_index(voters: Iterable[str], match: Mapping[str, int]) -> int:
    """The largest index replicated on a majority of voters (0 for no voters)."""
    indexes = sorted((match.get(v, 0) for v in voters), reverse=True)
    if not indexes:
        return 0
    return indexes[majority(len(indexes)) - 1]


def vote_result(voters: Iterable[str], votes: Mapping[str, bool]) -> VoteResult:
    voters = tuple(voters)
    granted = sum(1 for v in voters if votes.get(v) is True)
    missing = sum(1 for v in voters if v not in votes)
    need = majority(len(voters))
    if granted >= need:
        return VoteResult.WON
    if granted + missing >= need:
        return VoteResult.PENDING
    return VoteResult.LOST


def has_quorum(voters: Iterable[str], active: Iterable[str]) -> bool:
    voters = set(voters)
    return len(voters & set(active)) >= majority(len(voters))


def apply_conf_change(conf: ConfState, change: ConfChange) -> ConfState:
    """The configuration after `change`; a change that does nothing returns `conf`."""
    voters = [v for v in conf.voters if v != change.node_id]
    learners = [v for v in conf.learners if v != change.node_id]
    if change.type == ConfChangeType.ADD_VOTER:
        voters.append(change.node_id)
    elif change.type == ConfChangeType.ADD_LEARNER:
        learners.append(change.node_id)
    return ConfState(voters=tuple(sorted(voters)), learners=tuple(sorted(learners)))
