"""The leader's view of one follower: how far it matches, what to send next.

Three states (etcd-io/raft tracker/progress.go):
  PROBE      we do not know where the logs match: one append per heartbeat
             until the follower answers, backing off on each rejection;
  REPLICATE  the logs match: stream appends optimistically, at most
             `max_inflight` unacknowledged messages in flight;
  SNAPSHOT   the entries it needs are compacted: send a snapshot in chunks,
             nothing else until it is installed.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from cloudless.raft.messages import Snapshot


class ProgressState(str, Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """Last indexes of the append messages sent but not yet acknowledged."""

    __slots__ = ("_indexes", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._indexes: deque[int] = deque()

    def add(self, last_index: int) -> None:
        self._indexes.append(last_index)

    def free_le(self, index: int) -> None:
        while self._indexes and self._indexes[0] <= index:
            self._indexes.popleft()

    def free_first_one(self) -> None:
        if self._indexes:
            self._indexes.popleft()

    def full(self) -> bool:
        return len(self._indexes) >= self.capacity

    def reset(self) -> None:
        self._indexes.clear()

    def __len__(self) -> int:
        return len(self._indexes)


class Progress:
    __slots__ = (
        "inflights",
        "is_learner",
        "match",
        "next",
        "pending_snapshot",
        "probe_sent",
        "recent_active",
        "snapshot",
        "snapshot_idle_heartbeats",
        "snapshot_offset",
        "state",
    )

    def __init__(self, next_index: int, max_inflight: int, is_learner: bool = False) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.recent_active = False
        self.inflights = Inflights(max_inflight)
        self.is_learner = is_learner
        self.pending_snapshot = 0
        self.snapshot: Snapshot | None = None
        self.snapshot_offset = 0
        self.snapshot_idle_heartbeats = 0

    def _reset(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.snapshot = None
        self.snapshot_offset = 0
        self.snapshot_idle_heartbeats = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self._reset(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot.meta.index
        self.snapshot = snapshot

    def maybe_update(self, index: int) -> bool:
        """The follower acknowledged `index`; True when that is news."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def optimistic_update(self, last_sent: int) -> None:
        self.next = last_sent + 1

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """An append at prev_index `rejected` failed; False when the rejection is stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def describe(self) -> dict[str, object]:
        return {
            "match": self.match,
            "next": self.next,
            "state": self.state.value,
            "learner": self.is_learner,
            "inflight": len(self.inflights),
            "recent_active": self.recent_active,
        }
