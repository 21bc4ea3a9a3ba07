"""The Raft consensus core: a pure state machine in the style of etcd-io/raft.

Inputs: `step(message)`, `tick()`, `propose(data)`, `propose_conf_change`,
`read_index(ctx)`, `transfer_leadership(to)`. Output: a `Ready` pulled with
`ready()` and acknowledged with `advance(ready)`. No clock, no IO: time is a
tick count and election jitter comes from the injected `random.Random`.

Every driver (cloudless/raft/driver.py, cloudless/testing/raft_sim.py)
runs the same loop, with the order of the effects decided by ready.py:

    while node.has_ready():
        rd = node.ready()
        for step in rd.steps():    # send early, write, sync, send, apply...
            carry it out
        node.advance(rd)

Nothing may be called on the node between `ready()` and `advance()`.

Membership: single-server changes (thesis §4.1), each taking effect as soon
as its entry is appended to a log (not when committed), rolled back if the
entry is truncated. A leader accepts a change only after it has committed an
entry of its own term (the no-op it appends on election; the fix for the
single-server bug described on raft-dev, 2015) and only when the previous
change is committed. We chose this over joint consensus because every change
Cloudless makes (autopilot promotes/demotes one voter at a time) is a single
server change, and the argument for its safety is short: any majority of the
old voters overlaps any majority of the new. A leader that removes itself
keeps leading until the change commits, then steps down (thesis §4.2.2).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from dataclasses import dataclass

from cloudless.errors import InvalidInput, Unavailable
from cloudless.raft.log import RaftInvariantError, RaftLog
from cloudless.raft.messages import (
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    RequestVote,
    Snapshot,
    SnapshotResponse,
    TimeoutNow,
    VoteResponse,
    decode_conf_change,
    encode_conf_change,
)
from cloudless.raft.progress import Progress, ProgressState
from cloudless.raft.quorum import VoteResult, apply_conf_change, committed_index, has_quorum, vote_result
from cloudless.raft.ready import ReadState, Ready, Role, SoftState
from cloudless.raft.storage import Compacted, EntryUnavailable, LogStorage

log = logging.getLogger(__name__)

__all__ = [
    "ConfChangeRejected",
    "NotLeader",
    "ProposalDropped",
    "RaftConfig",
    "RaftInvariantError",
    "RaftNode",
    "ReadState",
    "Ready",
    "Role",
    "SoftState",
]


class NotLeader(Unavailable):
    """This node is not the leader; `leader` is the one it knows of, or None."""

    def __init__(self, message: str, leader: str | None = None, **context: object) -> None:
        super().__init__(message, leader=leader or "", **context)
        self.leader = leader


class ProposalDropped(Unavailable):
    """The leader cannot take this proposal now (transfer, pending change, backlog)."""


class ConfChangeRejected(InvalidInput):
    """The configuration change is malformed or would leave no voters."""


@dataclass(frozen=True)
class RaftConfig:
    """Tunables of one core. Times are in ticks (the driver decides a tick's length).

    `applied`: the index the application's state already reflects when the
    core starts (never less than the storage's snapshot index, which the
    core assumes the application restored). `max_size_per_msg` bounds the
    entry bytes of one AppendEntries (at least one entry is always sent);
    `max_inflight_msgs` bounds unacknowledged appends per follower;
    `max_uncommitted_bytes` (None: unbounded) drops proposals while the
    uncommitted tail is larger.
    """

    id: str
    election_tick: int = 10
    heartbeat_tick: int = 1
    max_inflight_msgs: int = 256
    max_size_per_msg: int = 1 << 20
    max_uncommitted_bytes: int | None = None
    snapshot_chunk_bytes: int = 1 << 20
    pre_vote: bool = True
    check_quorum: bool = True
    applied: int = 0

    def __post_init__(self) -> None:
        if not self.id:
            raise InvalidInput("raft node id must not be empty")
        if self.heartbeat_tick <= 0 or self.election_tick <= self.heartbeat_tick:
            raise InvalidInput(
                "election_tick must exceed heartbeat_tick > 0",
                election_tick=self.election_tick,
                heartbeat_tick=self.heartbeat_tick,
            )
        if self.max_inflight_msgs <= 0 or self.snapshot_chunk_bytes <= 0:
            raise InvalidInput("max_inflight_msgs and snapshot_chunk_bytes must be positive")


@dataclass
class _PendingRead:
    index: int
    requester: str  # our id, or the follower that forwarded the request
    ctx: bytes
    acks: set[str]


class RaftNode:
    def __init__(self, config: RaftConfig, storage: LogStorage, rng: random.Random) -> None:
        self.config = config
        self._id = config.id
        self.storage = storage
        self._rng = rng
        self.log = RaftLog(storage)
        hard_state, conf_state = storage.initial_state()
        self._term = hard_state.term
        self._vote = hard_state.vote
        snapshot_index = storage.snapshot().meta.index
        # A durable snapshot is committed and applied, even if the hard
        # state's commit (written without sync) was lost in a crash.
        self.log.commit_to(max(hard_state.commit, snapshot_index, self.log.committed))
        self.log.applied = max(config.applied, snapshot_index, self.log.applied)
        if self.log.applied > self.log.committed:
            raise RaftInvariantError("applied beyond commit", applied=self.log.applied, commit=self.log.committed)
        # (index, conf) pairs: the configuration from each conf entry on;
        # [0] is the snapshot's. Rebuilt from the log after a restart.
        self._confs: list[tuple[int, ConfState]] = [(snapshot_index, conf_state)]
        self._rebuild_confs_from_log(max(snapshot_index + 1, storage.first_index()))

        self._leader: str | None = None
        self._role = Role.FOLLOWER
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, Progress] = {}
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._pending_reads: OrderedDict[bytes, _PendingRead] = OrderedDict()
        self._reads_awaiting_commit: list[tuple[str, bytes]] = []
        self._read_seq = 0
        self._lead_transferee: str | None = None
        self._broadcast_pending = False
        # Bytes this leader proposed that have not been handed out committed
        # yet (an estimate, as in etcd: reset on every role change).
        self._uncommitted_bytes = 0
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self.config.election_tick
        self._incoming_snapshot: tuple[InstallSnapshot, bytearray] | None = None
        self._prev_hard_state = hard_state
        self._prev_soft_state = SoftState(None, self.role)
        self._become_follower(self._term, None)

    # ------------------------------------------------------------------
    # properties

    @property
    def id(self) -> str:
        return self._id

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> str:
        return self._vote

    @property
    def leader(self) -> str | None:
        return self._leader

    @property
    def role(self) -> Role:
        if self._role is Role.FOLLOWER and self._id in self.conf_state.learners:
            return Role.LEARNER
        return self._role

    @property
    def commit_index(self) -> int:
        return self.log.committed

    @property
    def applied(self) -> int:
        return self.log.applied

    @property
    def conf_state(self) -> ConfState:
        """The configuration in force: the latest one in this node's log."""
        return self._confs[-1][1]

    def conf_state_at(self, index: int) -> ConfState:
        """The configuration as of `index` (for a snapshot taken there)."""
        for at, conf in reversed(self._confs):
            if at <= index:
                return conf
        raise Compacted("configuration before the log's start", index=index)

    @property
    def _promotable(self) -> bool:
        return self._id in self.conf_state.voters

    def status(self) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self._id,
            "term": self._term,
            "vote": self._vote,
            "role": self.role.value,
            "leader": self._leader,
            "commit": self.log.committed,
            "applied": self.log.applied,
            "first_index": self.log.first_index(),
            "last_index": self.log.last_index(),
            "voters": list(self.conf_state.voters),
            "learners": list(self.conf_state.learners),
        }
        if self._role is Role.LEADER:
            out["progress"] = {peer: pr.describe() for peer, pr in sorted(self._progress.items())}
            out["lead_transferee"] = self._lead_transferee
        return out

    # ------------------------------------------------------------------
    # configuration tracking

    def _rebuild_confs_from_log(self, lo: int) -> None:
        hi = self.storage.last_index() + 1
        while lo < hi:
            batch = self.storage.entries(lo, hi, 4 << 20)
            for entry in batch:
                self._note_conf_entry(entry)
            lo = batch[-1].index + 1

    def _note_conf_entry(self, entry: Entry) -> None:
        if entry.kind == EntryKind.CONF_CHANGE:
            change = decode_conf_change(entry.data)
            self._confs.append((entry.index, apply_conf_change(self.conf_state, change)))

    def _truncate_confs(self, from_index: int) -> None:
        while len(self._confs) > 1 and self._confs[-1][0] >= from_index:
            self._confs.pop()

    def _append_entries(self, entries: list[Entry]) -> None:
        """Append to our log, keeping the in-force configuration in step with it."""
        if not entries:
            return
        before = self.conf_state
        self._truncate_confs(entries[0].index)
        self.log.append(entries)
        for entry in entries:
            self._note_conf_entry(entry)
        if self.conf_state != before:
            self._on_conf_changed()

    def _on_conf_changed(self) -> None:
        conf = self.conf_state
        log.info("raft.conf_changed", extra={"node": self._id, "voters": conf.voters, "learners": conf.learners})
        if self._role is not Role.LEADER:
            return
        # sorted: iteration order decides message order, and runs must replay
        members = sorted(set(conf.voters) | set(conf.learners))
        for peer in list(self._progress):
            if peer not in members:
                del self._progress[peer]
        for peer in members:
            pr = self._progress.get(peer)
            if pr is None:
                pr = self._progress[peer] = Progress(self.log.last_index() + 1, self.config.max_inflight_msgs)
                if peer == self._id:
                    pr.match = self.log.last_index()
                pr.recent_active = True  # give a new member a full election timeout
            pr.is_learner = peer in conf.learners
        if self._lead_transferee is not None and self._lead_transferee not in conf.voters:
            self._lead_transferee = None

    # ------------------------------------------------------------------
    # role changes

    def _reset(self, term: int) -> None:
        if self._term != term:
            self._term = term
            self._vote = ""
        self._leader = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self.config.election_tick + self._rng.randrange(self.config.election_tick)
        self._votes = {}
        self._progress = {}
        self._lead_transferee = None
        self._pending_reads.clear()
        self._reads_awaiting_commit.clear()
        self._broadcast_pending = False
        self._uncommitted_bytes = 0

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self._leader = leader
        self._role = Role.FOLLOWER

    def _become_pre_candidate(self) -> None:
        # Pre-vote changes neither term nor vote (thesis §9.6).
        self._votes = {}
        self._leader = None
        self._role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self._term + 1)
        self._vote = self._id
        self._role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self._term)
        self._leader = self._id
        self._role = Role.LEADER
        last = self.log.last_index()
        conf = self.conf_state
        for peer in sorted(set(conf.voters) | set(conf.learners)):
            pr = Progress(last + 1, self.config.max_inflight_msgs, is_learner=peer in conf.learners)
            pr.recent_active = True
            self._progress[peer] = pr
        if self._id in self._progress:
            self._progress[self._id].match = last
        log.info("raft.became_leader", extra={"node": self._id, "term": self._term})
        # The no-op commits the entries of earlier terms (§5.4.2) and opens
        # the leader for reads and configuration changes.
        self._append_as_leader([Entry(self._term, last + 1, EntryKind.NORMAL, b"")])
        self._broadcast_append()

    # ------------------------------------------------------------------
    # inputs

    def tick(self) -> None:
        if self._role is Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._promotable and self._election_elapsed >= self._randomized_timeout:
            self._election_elapsed = 0
            self._campaign(transfer=False)

    def _tick_heartbeat(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.config.election_tick:
            self._election_elapsed = 0
            if self.config.check_quorum:
                active = [p for p, pr in self._progress.items() if pr.recent_active or p == self._id]
                if not has_quorum(self.conf_state.voters, active):
                    log.info("raft.check_quorum_step_down", extra={"node": self._id, "term": self._term})
                    self._become_follower(self._term, None)
                    return
                for peer, pr in self._progress.items():
                    if peer != self._id:
                        pr.recent_active = False
            if self._lead_transferee is not None:
                self._lead_transferee = None  # transfer took too long: abort
        if self._heartbeat_elapsed >= self.config.heartbeat_tick:
            self._heartbeat_elapsed = 0
            self._retransmit_stalled_snapshots()
            self._broadcast_heartbeat(self._last_pending_read_ctx())

    def propose(self, data: bytes) -> int:
        """Append `data` as a new entry; returns its index (committed later, maybe never)."""
        return self._propose(EntryKind.NORMAL, data)

    def propose_conf_change(self, change: ConfChange) -> int:
        if change.type not in ConfChangeType.__members__.values() or not change.node_id:
            raise ConfChangeRejected("unknown configuration change", type=change.type, node=change.node_id)
        if self._role is Role.LEADER:
            if not self.log.match_term(self.log.committed, self._term):
                raise ProposalDropped("leader has not committed an entry of its term yet", term=self._term)
            if self._confs[-1][0] > self.log.committed:
                raise ProposalDropped("a configuration change is still uncommitted", index=self._confs[-1][0])
            after = apply_conf_change(self.conf_state, change)
            if not after.voters:
                raise ConfChangeRejected("change would leave no voters", node=change.node_id)
        return self._propose(EntryKind.CONF_CHANGE, encode_conf_change(change))

    def _propose(self, kind: EntryKind, data: bytes) -> int:
        if self._role is not Role.LEADER:
            raise NotLeader("not the leader", leader=self._leader, node=self._id)
        if self._lead_transferee is not None:
            raise ProposalDropped("leadership transfer in progress", to=self._lead_transferee)
        limit = self.config.max_uncommitted_bytes
        if limit is not None and self._uncommitted_bytes > 0 and self._uncommitted_bytes + len(data) > limit:
            raise ProposalDropped("too many uncommitted bytes", limit=limit, uncommitted=self._uncommitted_bytes)
        index = self.log.last_index() + 1
        self._uncommitted_bytes += len(data)
        self._append_as_leader([Entry(self._term, index, kind, data)])
        self._broadcast_pending = True
        return index

    def read_index(self, ctx: bytes) -> None:
        """Ask for a linearizable read point; it arrives as a ReadState with `ctx` (thesis §6.4).

        On a follower the request is forwarded to the leader; if the leader
        is unknown this raises NotLeader, and a request lost on the way
        simply never produces a ReadState (callers time out).
        """
        if self._role is Role.LEADER:
            self._leader_read_index(self._id, ctx)
        elif self._leader is not None:
            self._send(ReadIndexRequest(self._id, self._leader, self._term, ctx))
        else:
            raise NotLeader("no leader known for a read", leader=None, node=self._id)

    def transfer_leadership(self, to: str) -> None:
        """Hand leadership to `to` once its log is caught up (thesis §3.10)."""
        if self._role is not Role.LEADER:
            raise NotLeader("only the leader transfers leadership", leader=self._leader)
        if to == self._id:
            return
        if to not in self.conf_state.voters:
            raise InvalidInput("transfer target is not a voter", to=to)
        if self._lead_transferee == to:
            return
        self._lead_transferee = to
        self._election_elapsed = 0  # abort after one election timeout
        pr = self._progress[to]
        if pr.match == self.log.last_index():
            self._send(TimeoutNow(self._id, to, self._term))
        else:
            self._send_append(to)

    def step(self, m: Message) -> None:
        """Feed one message from a peer. Messages for another node are ignored."""
        if m.to != self._id:
            return
        if m.term > self._term:
            if isinstance(m, RequestVote):
                in_lease = (
                    self.config.check_quorum
                    and self._leader is not None
                    and self._election_elapsed < self.config.election_tick
                )
                if in_lease and not m.transfer:
                    # Leader lease (thesis §4.2.3): we heard from a live
                    # leader recently, so this candidate cannot disrupt it.
                    return
                if m.pre_vote:
                    self._handle_vote(m)
                    return
            if isinstance(m, VoteResponse) and m.pre_vote:
                if m.granted:
                    self._step_role(m)
                    return
                # a rejected pre-vote from a higher term: adopt that term below
            if isinstance(m, (AppendEntries, Heartbeat, InstallSnapshot)):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, None)
        elif m.term < self._term:
            if isinstance(m, (AppendEntries, Heartbeat)):
                # Tell a stale leader about our term so it steps down; with
                # pre-vote/check-quorum it would otherwise never find out.
                self._send(AppendResponse(self._id, m.frm, self._term, 0))
            elif isinstance(m, RequestVote) and m.pre_vote:
                self._send(VoteResponse(self._id, m.frm, self._term, False, pre_vote=True))
            return

        if isinstance(m, RequestVote):
            self._handle_vote(m)
            return
        self._step_role(m)

    def _handle_vote(self, m: RequestVote) -> None:
        can_vote = (
            self._vote == m.frm or (self._vote == "" and self._leader is None) or (m.pre_vote and m.term > self._term)
        )
        if can_vote and self.log.is_up_to_date(m.last_index, m.last_term):
            # A granted pre-vote answers in the requested term so the
            # pre-candidate can count it (etcd does the same).
            self._send(VoteResponse(self._id, m.frm, m.term, True, pre_vote=m.pre_vote))
            if not m.pre_vote:
                self._election_elapsed = 0
                self._vote = m.frm
        else:
            self._send(VoteResponse(self._id, m.frm, self._term, False, pre_vote=m.pre_vote))

    def _step_role(self, m: Message) -> None:
        if self._role is Role.LEADER:
            self._step_leader(m)
        elif self._role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    # ------------------------------------------------------------------
    # elections

    def _campaign(self, transfer: bool) -> None:
        if self.config.pre_vote and not transfer:
            self._become_pre_candidate()
            term = self._term + 1
        else:
            self._become_candidate()
            term = self._term
        pre = self._role is Role.PRE_CANDIDATE
        self._votes[self._id] = True
        if self._poll() is VoteResult.WON:
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        for peer in self.conf_state.voters:
            if peer != self._id:
                self._send(RequestVote(self._id, peer, term, last_index, last_term, pre_vote=pre, transfer=transfer))

    def _poll(self) -> VoteResult:
        result = vote_result(self.conf_state.voters, self._votes)
        if result is VoteResult.WON:
            if self._role is Role.PRE_CANDIDATE:
                self._campaign_after_pre_vote()
            else:
                self._become_leader()
        elif result is VoteResult.LOST:
            self._become_follower(self._term, None)
        return result

    def _campaign_after_pre_vote(self) -> None:
        self._become_candidate()
        self._votes[self._id] = True
        if vote_result(self.conf_state.voters, self._votes) is VoteResult.WON:
            self._become_leader()
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        for peer in self.conf_state.voters:
            if peer != self._id:
                self._send(RequestVote(self._id, peer, self._term, last_index, last_term))

    def _step_candidate(self, m: Message) -> None:
        if isinstance(m, VoteResponse):
            if m.pre_vote != (self._role is Role.PRE_CANDIDATE):
                return  # a late answer to the other kind of campaign
            if m.frm not in self._votes:
                self._votes[m.frm] = m.granted
            self._poll()
        elif isinstance(m, (AppendEntries, Heartbeat, InstallSnapshot)):
            # A leader exists in this term (§5.2): follow it.
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
        elif isinstance(m, TimeoutNow):
            pass

    def _step_follower(self, m: Message) -> None:
        if isinstance(m, AppendEntries):
            self._election_elapsed = 0
            self._leader = m.frm
            self._handle_append(m)
        elif isinstance(m, Heartbeat):
            self._election_elapsed = 0
            self._leader = m.frm
            if m.commit > self.log.last_index():
                raise RaftInvariantError("heartbeat commit beyond our log", commit=m.commit)
            self.log.commit_to(m.commit)
            self._send(HeartbeatResponse(self._id, m.frm, self._term, m.ctx))
        elif isinstance(m, InstallSnapshot):
            self._election_elapsed = 0
            self._leader = m.frm
            self._handle_snapshot_chunk(m)
        elif isinstance(m, TimeoutNow):
            if self._promotable:
                log.info("raft.timeout_now", extra={"node": self._id, "term": self._term, "from": m.frm})
                self._campaign(transfer=True)
        elif isinstance(m, ReadIndexResponse):
            if not m.reject:
                self._read_states.append(ReadState(m.index, m.ctx))

    # ------------------------------------------------------------------
    # follower: appends and snapshots

    def _handle_append(self, m: AppendEntries) -> None:
        if m.prev_index < self.log.committed:
            self._send(AppendResponse(self._id, m.frm, self._term, self.log.committed))
            return
        if self.log.match_term(m.prev_index, m.prev_term):
            last_new = m.prev_index + len(m.entries)
            conflict = self.log.find_conflict(m.entries)
            if conflict:
                if conflict <= self.log.committed:
                    raise RaftInvariantError("leader overwrites a committed entry", index=conflict)
                self._append_entries(list(m.entries[conflict - m.prev_index - 1 :]))
            self.log.commit_to(min(m.commit, last_new))
            self._send(AppendResponse(self._id, m.frm, self._term, last_new))
            return
        hint = self.log.find_conflict_by_term(min(m.prev_index, self.log.last_index()), m.prev_term)
        try:
            hint_term = self.log.term(hint)
        except (Compacted, EntryUnavailable):
            hint_term = 0
        self._send(
            AppendResponse(self._id, m.frm, self._term, m.prev_index, reject=True, hint_index=hint, hint_term=hint_term)
        )

    def _handle_snapshot_chunk(self, m: InstallSnapshot) -> None:
        if m.meta.index <= self.log.committed:
            self._incoming_snapshot = None
            self._send(AppendResponse(self._id, m.frm, self._term, self.log.committed))
            return
        pending = self._incoming_snapshot
        if m.offset == 0:
            pending = self._incoming_snapshot = (m, bytearray(m.data))
        elif pending is not None and pending[0].meta == m.meta and m.offset == len(pending[1]):
            pending[1].extend(m.data)
        else:
            received = len(pending[1]) if pending is not None and pending[0].meta == m.meta else 0
            self._send(SnapshotResponse(self._id, m.frm, self._term, m.meta.index, received))
            return
        if not m.done:
            self._send(SnapshotResponse(self._id, m.frm, self._term, m.meta.index, len(pending[1])))
            return
        self._incoming_snapshot = None
        snapshot = Snapshot(m.meta, bytes(pending[1]))
        if self._restore(snapshot):
            log.info("raft.snapshot_restored", extra={"node": self._id, "index": m.meta.index})
            self._send(AppendResponse(self._id, m.frm, self._term, self.log.last_index()))
        else:
            self._send(AppendResponse(self._id, m.frm, self._term, self.log.committed))

    def _restore(self, snapshot: Snapshot) -> bool:
        meta = snapshot.meta
        if meta.index <= self.log.committed:
            return False
        if self.log.match_term(meta.index, meta.term):
            # We hold that entry already: the snapshot only says it committed.
            self.log.commit_to(meta.index)
            return False
        before = self.conf_state
        self.log.restore(snapshot)
        self._confs = [(meta.index, meta.conf_state)]
        if self.conf_state != before:
            self._on_conf_changed()
        return True

    # ------------------------------------------------------------------
    # leader

    def _append_as_leader(self, entries: list[Entry]) -> None:
        self._append_entries(entries)
        pr = self._progress.get(self._id)
        if pr is not None:
            pr.maybe_update(self.log.last_index())
        self._maybe_commit()

    def _maybe_commit(self) -> bool:
        match = {peer: pr.match for peer, pr in self._progress.items()}
        index = committed_index(self.conf_state.voters, match)
        if not self.log.maybe_commit(index, self._term):
            return False
        self._after_commit()
        return True

    def _after_commit(self) -> None:
        # Reads that waited for the first commit of this term can go ahead.
        if self._reads_awaiting_commit and self.log.match_term(self.log.committed, self._term):
            waiting, self._reads_awaiting_commit = self._reads_awaiting_commit, []
            for requester, ctx in waiting:
                self._leader_read_index(requester, ctx)
        # A leader no longer among the voters steps down once that is committed.
        if self._id not in self.conf_state.voters and self._confs[-1][0] <= self.log.committed:
            log.info("raft.removed_leader_steps_down", extra={"node": self._id, "term": self._term})
            self._broadcast_append()  # tell followers the commit before leaving
            self._become_follower(self._term, None)

    def _send(self, m: Message) -> None:
        self._msgs.append(m)

    def _send_append(self, to: str, allow_empty: bool = True) -> bool:
        pr = self._progress[to]
        if pr.is_paused():
            return False
        prev_index = pr.next - 1
        try:
            prev_term = self.log.term(prev_index)
            entries = self.log.entries(pr.next, self.log.last_index() + 1, self.config.max_size_per_msg)
        except Compacted:
            return self._send_snapshot(to, pr)
        if not entries and not allow_empty:
            return False
        self._send(AppendEntries(self._id, to, self._term, prev_index, prev_term, tuple(entries), self.log.committed))
        if entries:
            last = entries[-1].index
            if pr.state is ProgressState.REPLICATE:
                pr.optimistic_update(last)
                pr.inflights.add(last)
            elif pr.state is ProgressState.PROBE:
                pr.probe_sent = True
        elif pr.state is ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def _send_snapshot(self, to: str, pr: Progress) -> bool:
        if not pr.recent_active:
            return False  # do not stream a snapshot into the void
        snapshot = self.storage.snapshot()
        pr.become_snapshot(snapshot)
        log.info("raft.sending_snapshot", extra={"node": self._id, "to": to, "index": snapshot.meta.index})
        self._send_snapshot_chunk(to, pr)
        return True

    def _send_snapshot_chunk(self, to: str, pr: Progress) -> None:
        snapshot = pr.snapshot
        assert snapshot is not None
        size = self.config.snapshot_chunk_bytes
        offset = pr.snapshot_offset
        chunk = snapshot.data[offset : offset + size]
        done = offset + len(chunk) >= len(snapshot.data)
        self._send(InstallSnapshot(self._id, to, self._term, snapshot.meta, offset, chunk, done))

    def _broadcast_append(self) -> None:
        self._broadcast_pending = False
        for peer in self._progress:
            if peer != self._id:
                self._send_append(peer)

    def _flush_proposals(self) -> None:
        # Proposals since the last Ready leave as one batch per follower.
        if self._broadcast_pending and self._role is Role.LEADER:
            self._broadcast_pending = False
            for peer in self._progress:
                if peer != self._id:
                    while self._send_append(peer, allow_empty=False):
                        if self._progress[peer].state is not ProgressState.REPLICATE:
                            break

    def _retransmit_stalled_snapshots(self) -> None:
        # Chunks travel stop-and-wait; one lost chunk or answer stalls the
        # transfer, so resend the current chunk after a heartbeat interval
        # without an answer (but not on every heartbeat: chunks are big).
        for peer, pr in self._progress.items():
            if pr.state is ProgressState.SNAPSHOT and pr.snapshot is not None:
                pr.snapshot_idle_heartbeats += 1
                if pr.snapshot_idle_heartbeats >= 2:
                    pr.snapshot_idle_heartbeats = 0
                    self._send_snapshot_chunk(peer, pr)

    def _broadcast_heartbeat(self, ctx: bytes) -> None:
        for peer, pr in self._progress.items():
            if peer == self._id:
                continue
            commit = min(pr.match, self.log.committed)
            self._send(Heartbeat(self._id, peer, self._term, commit, ctx))

    def _step_leader(self, m: Message) -> None:
        if isinstance(m, ReadIndexRequest):
            self._leader_read_index(m.frm, m.ctx)
            return
        pr = self._progress.get(m.frm)
        if pr is None:
            return
        if isinstance(m, AppendResponse):
            pr.recent_active = True
            self._handle_append_response(m, pr)
        elif isinstance(m, HeartbeatResponse):
            pr.recent_active = True
            pr.probe_sent = False
            if pr.state is ProgressState.REPLICATE and pr.inflights.full():
                pr.inflights.free_first_one()
            if pr.match < self.log.last_index():
                self._send_append(m.frm)
            if m.ctx:
                self._ack_read(m.frm, m.ctx)
        elif isinstance(m, SnapshotResponse):
            pr.recent_active = True
            if pr.state is ProgressState.SNAPSHOT and pr.pending_snapshot == m.index and pr.snapshot is not None:
                pr.snapshot_idle_heartbeats = 0
                if m.next_offset != pr.snapshot_offset or m.next_offset < len(pr.snapshot.data):
                    pr.snapshot_offset = min(m.next_offset, len(pr.snapshot.data))
                    self._send_snapshot_chunk(m.frm, pr)

    def _handle_append_response(self, m: AppendResponse, pr: Progress) -> None:
        if m.reject:
            hint = m.hint_index
            if m.hint_term > 0:
                hint = self.log.find_conflict_by_term(m.hint_index, m.hint_term)
            if pr.maybe_decr_to(m.index, hint):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        was_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_probe()
            pr.become_replicate()
        elif pr.state is ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        if self._maybe_commit():
            if self._role is not Role.LEADER:
                return
            self._broadcast_append()
        elif was_paused:
            self._send_append(m.frm)
        while self._send_append(m.frm, allow_empty=False):
            pass
        if m.frm == self._lead_transferee and pr.match == self.log.last_index():
            self._send(TimeoutNow(self._id, m.frm, self._term))

    # ------------------------------------------------------------------
    # ReadIndex (thesis §6.4)

    def _leader_read_index(self, requester: str, ctx: bytes) -> None:
        if not self.log.match_term(self.log.committed, self._term):
            # Until our no-op commits we do not know the commit index (§6.4 step 1).
            self._reads_awaiting_commit.append((requester, ctx))
            return
        index = self.log.committed
        if len(self.conf_state.voters) == 1 and self._id in self.conf_state.voters:
            self._release_read(requester, index, ctx)
            return
        self._read_seq += 1
        key = b"r%d" % self._read_seq
        self._pending_reads[key] = _PendingRead(index, requester, ctx, {self._id})
        self._broadcast_heartbeat(key)

    def _last_pending_read_ctx(self) -> bytes:
        return next(reversed(self._pending_reads)) if self._pending_reads else b""

    def _ack_read(self, peer: str, key: bytes) -> None:
        read = self._pending_reads.get(key)
        if read is None:
            return
        read.acks.add(peer)
        if not has_quorum(self.conf_state.voters, read.acks):
            return
        # A quorum answered a heartbeat sent after this request, and so
        # after every earlier one: release them all, in order.
        while self._pending_reads:
            k, r = self._pending_reads.popitem(last=False)
            self._release_read(r.requester, r.index, r.ctx)
            if k == key:
                break

    def _release_read(self, requester: str, index: int, ctx: bytes) -> None:
        if requester == self._id:
            self._read_states.append(ReadState(index, ctx))
        else:
            self._send(ReadIndexResponse(self._id, requester, self._term, index, ctx))

    # ------------------------------------------------------------------
    # Ready

    def _hard_state(self) -> HardState:
        return HardState(self._term, self._vote, self.log.committed)

    def _soft_state(self) -> SoftState:
        return SoftState(self._leader, self.role)

    def has_ready(self) -> bool:
        return bool(
            self._msgs
            or self._broadcast_pending
            or self.log.unstable
            or self.log.unstable_snapshot is not None
            or self.log.has_next_committed()
            or self._read_states
            or self._hard_state() != self._prev_hard_state
            or self._soft_state() != self._prev_soft_state
        )

    def ready(self) -> Ready:
        self._flush_proposals()
        hard = self._hard_state()
        soft = self._soft_state()
        rd = Ready(
            hard_state=hard if hard != self._prev_hard_state else None,
            entries=list(self.log.unstable),
            snapshot=self.log.unstable_snapshot,
            messages=self._msgs,
            committed_entries=self.log.next_committed(),
            read_states=self._read_states,
            soft_state=soft if soft != self._prev_soft_state else None,
        )
        # _prev_hard_state is what the last Ready persisted, and a Ready that
        # changes term or vote is synced before advance(): it is durable.
        term_vote_changed = hard.term != self._prev_hard_state.term or hard.vote != self._prev_hard_state.vote
        rd.must_sync = bool(rd.entries or rd.snapshot is not None or term_vote_changed)
        # Only a leader whose term and vote are durable may replicate before
        # its sync: its appends then promise nothing a crash could take back.
        rd.replicate_before_sync = self._role is Role.LEADER and rd.snapshot is None and not term_vote_changed
        self._msgs = []
        self._read_states = []
        if rd.soft_state is not None:
            self._prev_soft_state = rd.soft_state
        return rd

    def advance(self, rd: Ready) -> None:
        if rd.hard_state is not None:
            self._prev_hard_state = rd.hard_state
        if rd.snapshot is not None:
            self.log.stable_snapshot_to(rd.snapshot.meta.index)
            self.log.applied_to(rd.snapshot.meta.index)
        if rd.entries:
            last = rd.entries[-1]
            self.log.stable_to(last.index, last.term)
        if rd.committed_entries:
            self.log.applied_to(rd.committed_entries[-1].index)
            if self._uncommitted_bytes:
                done = sum(len(e.data) for e in rd.committed_entries)
                self._uncommitted_bytes = max(0, self._uncommitted_bytes - done)
