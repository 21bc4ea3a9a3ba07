"""`Ready`: what the core asks of its driver, and the one order to do it in.

The core (core.py) hands out a `Ready`; `Ready.steps()` cuts it into the
effects a driver carries out, in order, before `advance(ready)`. The trio
driver (driver.py), the simulator and the scenario harness
(testing/raft_sim.py) all execute these same steps, so the rules that keep
Raft safe under crashes are decided here once:

    Send(before_sync=True)   a leader's appends and heartbeats, when its term
                             and vote are already durable (thesis §10.2.1)
    Apply(before_sync=True)  committed entries that are already on disk
    Write                    stage hard state, entries, snapshot (no fsync)
    Sync                     make the write durable (when `must_sync`)
    Send                     everything else: votes and acknowledgements
                             promise what the sync made durable
    Restore                  install a snapshot into the state machine
    Apply                    the remaining committed entries, in order
    ServeReads               register read states; answer those applied

A crash between any two steps is safe: the simulator kills nodes at each of
these points (tests/sim/test_raft_sim.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from cloudless.raft.messages import AppendEntries, Entry, HardState, Heartbeat, Message, Snapshot

__all__ = [
    "STEP_NAMES",
    "Apply",
    "ReadState",
    "Ready",
    "Restore",
    "Role",
    "Send",
    "ServeReads",
    "SoftState",
    "Step",
    "Sync",
    "Write",
]


class Role(str, Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"
    LEARNER = "learner"  # a follower that is a non-voting member


@dataclass(frozen=True)
class SoftState:
    leader: str | None
    role: Role


@dataclass(frozen=True)
class ReadState:
    """Reads issued with `ctx` are linearizable once `index` has been applied."""

    index: int
    ctx: bytes


# -- the steps ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Hand `messages` to the transport (each may be lost: Raft retries)."""

    messages: list[Message]
    before_sync: bool = False

    @property
    def name(self) -> str:
        return "send_before_sync" if self.before_sync else "send"


@dataclass(frozen=True, slots=True)
class Apply:
    """Apply committed `entries` to the state machine, in order."""

    entries: list[Entry]
    before_sync: bool = False

    @property
    def name(self) -> str:
        return "apply_before_sync" if self.before_sync else "apply"


@dataclass(frozen=True, slots=True)
class Write:
    """Stage a batch to storage: `storage.write(hard_state, entries, snapshot)`, no fsync."""

    hard_state: HardState | None
    entries: list[Entry]
    snapshot: Snapshot | None

    name = "write"


@dataclass(frozen=True, slots=True)
class Sync:
    """Make everything written so far durable: `storage.sync()`."""

    name = "sync"


@dataclass(frozen=True, slots=True)
class Restore:
    """Replace the state machine with `snapshot` (already written and synced)."""

    snapshot: Snapshot

    name = "restore"


@dataclass(frozen=True, slots=True)
class ServeReads:
    """Reads of `read_states` may be answered once their index is applied."""

    read_states: list[ReadState]

    name = "serve_reads"


Step = Send | Apply | Write | Sync | Restore | ServeReads

# Every point between two steps, by the name of the step just done.
STEP_NAMES = ("send_before_sync", "apply_before_sync", "write", "sync", "send", "restore", "apply", "serve_reads")


@dataclass
class Ready:
    """What the driver must do; `steps()` says in which order.

    `hard_state` (if changed), `entries` and `snapshot` are to be persisted,
    durably before anything that depends on them when `must_sync`;
    `messages` are to be sent, `committed_entries` applied and `read_states`
    answered. `replicate_before_sync` is the core's permission to send the
    leader's appends before the sync (set only for a leader whose term and
    vote are already durable, and never with a snapshot). Nothing may be
    called on the core between `ready()` and `advance(ready)`.
    """

    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    messages: list[Message] = field(default_factory=list)
    committed_entries: list[Entry] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    soft_state: SoftState | None = None
    must_sync: bool = False
    replicate_before_sync: bool = False

    def steps(self, *, replicate_before_sync: bool = True) -> list[Step]:
        """The effects of this Ready in the order that keeps Raft safe across a crash.

        `replicate_before_sync=False` keeps every message behind the sync
        (the textbook order), for drivers that want it.
        """
        out: list[Step] = []
        messages = self.messages
        committed = self.committed_entries
        if self.must_sync and replicate_before_sync and self.replicate_before_sync and self.snapshot is None:
            # Thesis §10.2.1: a leader may write its log in parallel with
            # replicating it, because it counts itself toward a commit
            # quorum only through its own match index, which the core
            # consults only when it next steps a response: after this sync,
            # since nothing reaches the core until advance(). Votes and
            # acknowledgements still wait.
            early: list[Message] = [m for m in messages if isinstance(m, (AppendEntries, Heartbeat))]
            if early:
                messages = [m for m in messages if not isinstance(m, (AppendEntries, Heartbeat))]
                out.append(Send(early, before_sync=True))
        if self.must_sync and self.snapshot is None and committed:
            # Entries committed before this Ready's new ones are already on
            # disk (every earlier Ready with entries was synced, and a
            # committed entry is never overwritten): apply them now rather
            # than behind this fsync, which is for the next batch.
            first_new = self.entries[0].index if self.entries else committed[-1].index + 1
            stable = 0
            while stable < len(committed) and committed[stable].index < first_new:
                stable += 1
            if stable:
                out.append(Apply(committed[:stable], before_sync=True))
                committed = committed[stable:]
        if self.hard_state is not None or self.entries or self.snapshot is not None:
            out.append(Write(self.hard_state, self.entries, self.snapshot))
        if self.must_sync:
            out.append(Sync())
        if messages:
            out.append(Send(messages))
        if self.snapshot is not None:
            out.append(Restore(self.snapshot))
        if committed:
            out.append(Apply(committed))
        if self.read_states:
            out.append(ServeReads(self.read_states))
        return out
