"""A deterministic Raft cluster simulator: N cores, one process, one seed.

Everything that could differ between runs comes from one `random.Random`:
the network (drop, duplicate, delay and so reorder, symmetric and asymmetric
partitions), the disks (a crash loses whatever was written but not synced,
keeping a random prefix of it, as a real WAL might), node crashes and
restarts (including a crash after every step of a Ready, in the order the
trio driver carries them out: cloudless/raft/ready.py),
leader transfers, membership changes, snapshots with compaction, and a
key-value workload whose history is checked for linearizability.

After every step the simulator checks the Raft safety properties (paper
Figure 3): election safety, log matching, leader completeness and
state-machine safety. `Simulation(seed).run()` returns a `SimResult`; every
failure message names the seed, and the same seed replays the same run.

Time is an integer count of simulated units; each node ticks every
`tick_interval` units with its own phase.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from cloudless.raft.core import NotLeader, ProposalDropped, RaftConfig, RaftNode, ReadState, Role
from cloudless.raft.log import RaftInvariantError
from cloudless.raft.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    Snapshot,
)
from cloudless.raft.ready import STEP_NAMES, Apply, Restore, Send, Step, Sync, Write
from cloudless.raft.sessions import Duplicate, Fresh, SessionTable
from cloudless.raft.storage import Compacted, EntryUnavailable, MemoryStorage, bootstrap_log
from cloudless.testing.linearizability import Operation, check_history

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# disk


class SimDisk:
    """A MemoryStorage whose writes become durable only at sync().

    Reads see every write (as a page cache would). `crash()` keeps what was
    synced plus a random prefix of what was not, since a real log may have
    flushed part of it on its own; writes are atomic batches, as RocksDB
    write batches are.
    """

    def __init__(self) -> None:
        self.durable = MemoryStorage()
        self.volatile = MemoryStorage()
        self._pending: list[tuple[str, tuple[Any, ...]]] = []

    # read side (LogStorage)
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self.volatile.initial_state()

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        return self.volatile.entries(lo, hi, max_bytes)

    def term(self, index: int) -> int:
        return self.volatile.term(index)

    def first_index(self) -> int:
        return self.volatile.first_index()

    def last_index(self) -> int:
        return self.volatile.last_index()

    def snapshot(self) -> Snapshot:
        return self.volatile.snapshot()

    # write side
    def write(self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None = None) -> None:
        if hard_state is None and not entries and snapshot is None:
            return
        self.volatile.write(hard_state, entries, snapshot)
        self._pending.append(("write", (hard_state, list(entries), snapshot)))

    def sync(self) -> None:
        for op in self._pending:
            self._replay(self.durable, op)
        self._pending.clear()

    def compact(self, index: int) -> None:
        self.volatile.compact(index)
        self._pending.append(("compact", (index,)))

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        snapshot = self.volatile.create_snapshot(index, conf_state, data)
        self._pending.append(("snapshot", (index, conf_state, data)))
        return snapshot

    def crash(self, rng: random.Random, keep: int | None = None) -> int:
        """Lose unsynced writes except a prefix (random unless `keep`); returns how many were lost."""
        keep = rng.randint(0, len(self._pending)) if keep is None else min(keep, len(self._pending))
        for op in self._pending[:keep]:
            self._replay(self.durable, op)
        lost = len(self._pending) - keep
        self._pending.clear()
        self.volatile = self.durable.clone()
        return lost

    @staticmethod
    def _replay(storage: MemoryStorage, op: tuple[str, tuple[Any, ...]]) -> None:
        kind, args = op
        if kind == "write":
            storage.write(*args)
        elif kind == "compact":
            storage.compact(*args)
        else:
            storage.create_snapshot(*args)


# ---------------------------------------------------------------------------
# network


class SimNetwork:
    """Seeded message delivery: delay (hence reorder), drop, duplicate, partitions."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.drop_rate = 0.0
        self.duplicate_rate = 0.0
        self.min_delay = 1
        self.max_delay = 10
        self.long_delay_rate = 0.0
        self.blocked: set[tuple[str, str]] = set()  # directed (from, to)
        self._queue: list[tuple[int, int, Message]] = []
        self._seq = 0
        self.sent = 0
        self.delivered = 0

    def send(self, message: Message, now: int) -> None:
        self.sent += 1
        if (message.frm, message.to) in self.blocked or self.rng.random() < self.drop_rate:
            return
        copies = 2 if self.rng.random() < self.duplicate_rate else 1
        for _ in range(copies):
            delay = self.rng.randint(self.min_delay, self.max_delay)
            if self.rng.random() < self.long_delay_rate:
                delay += self.rng.randint(self.max_delay, self.max_delay * 8)
            self._seq += 1
            heapq.heappush(self._queue, (now + delay, self._seq, message))

    def due(self, now: int) -> list[Message]:
        out: list[Message] = []
        queue = self._queue
        while queue and queue[0][0] <= now:
            message = heapq.heappop(queue)[2]
            # A partition also cuts messages already in flight.
            if (message.frm, message.to) not in self.blocked:
                out.append(message)
        self.delivered += len(out)
        return out

    def partition(self, groups: list[set[str]]) -> None:
        """Symmetric: nodes talk only within their group."""
        self.blocked = set()
        for a_group in groups:
            for b_group in groups:
                if a_group is b_group:
                    continue
                for a in a_group:
                    for b in b_group:
                        self.blocked.add((a, b))

    def block(self, frm: str, to: str) -> None:
        """Asymmetric: messages from `frm` to `to` are lost, the reverse still flows."""
        self.blocked.add((frm, to))

    def heal(self) -> None:
        self.blocked = set()


# ---------------------------------------------------------------------------
# the replicated key-value state machine


class KVCommand(msgspec.Struct, frozen=True, array_like=True):
    client: str
    seq: int
    op: str  # "put" | "cas"
    key: str
    value: str | None = None
    expected: str | None = None


class _KVImage(msgspec.Struct, array_like=True):
    kv: dict[str, str]
    sessions: bytes


class KVStateMachine:
    """put/cas with exactly-once client sessions; gets read `kv` directly."""

    def __init__(self) -> None:
        self.kv: dict[str, str] = {}
        self.sessions = SessionTable()
        self.applied_commands = 0

    def apply(self, entry: Entry) -> tuple[str, int, Any] | None:
        """Apply one committed entry; returns (client, seq, result) for commands."""
        if entry.kind != EntryKind.NORMAL or not entry.data:
            return None
        cmd = msgspec.msgpack.decode(entry.data, type=KVCommand)
        verdict = self.sessions.check(cmd.client, cmd.seq)
        if isinstance(verdict, Duplicate):
            return cmd.client, cmd.seq, verdict.result
        if not isinstance(verdict, Fresh):
            return None
        self.applied_commands += 1
        if cmd.op == "put":
            self.kv[cmd.key] = cmd.value or ""
            result: Any = None
        else:
            result = self.kv.get(cmd.key) == cmd.expected
            if result:
                self.kv[cmd.key] = cmd.value or ""
        self.sessions.record(cmd.client, cmd.seq, result, entry.index)
        return cmd.client, cmd.seq, result

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(_KVImage(dict(self.kv), self.sessions.encode()))

    @classmethod
    def restore(cls, data: bytes) -> KVStateMachine:
        fsm = cls()
        if data:
            image = msgspec.msgpack.decode(data, type=_KVImage)
            fsm.kv = dict(image.kv)
            fsm.sessions = SessionTable.decode(image.sessions)
        return fsm


# ---------------------------------------------------------------------------
# configuration and results


# A crash may come after any step of a Ready (ready.py), including the last.
CRASH_POINTS = tuple(f"after_{name}" for name in STEP_NAMES)


@dataclass
class SimConfig:
    nodes: int = 3
    spare_nodes: int = 2  # may join through membership changes
    clients: int = 3
    keys: int = 2
    duration: int = 2500  # units with faults on
    heal_duration: int = 2000  # then everything heals and restarts
    tick_interval: int = 10
    election_tick: int = 10
    heartbeat_tick: int = 2
    snapshot_every: int = 12  # applied entries between snapshots
    snapshot_chunk_bytes: int = 48
    max_size_per_msg: int = 512
    max_inflight_msgs: int = 4
    faults: bool = True
    membership: bool = True
    crash_points: bool = True
    crash_point_rate: float = 0.002  # chance of a crash after each step of a Ready
    crash_point_names: tuple[str, ...] = CRASH_POINTS
    check_linearizability: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.crash_point_names) - set(CRASH_POINTS)
        if unknown:
            raise ValueError(f"unknown crash points {sorted(unknown)}; one of {CRASH_POINTS}")


@dataclass
class SimStats:
    elections: int = 0
    crashes: int = 0
    lost_writes: int = 0
    partitions: int = 0
    transfers: int = 0
    conf_changes: int = 0
    snapshots_installed: int = 0
    snapshots_taken: int = 0
    ops_completed: int = 0
    ops_indeterminate: int = 0
    commands_applied: int = 0
    messages: int = 0
    max_term: int = 0
    crash_points: Counter[str] = field(default_factory=Counter)  # crashes by point


@dataclass
class SimResult:
    seed: int
    violations: list[str]
    history: list[Any]
    stats: SimStats
    linearizable: bool | None = None
    ops_checked: int = 0
    explanation: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations and self.linearizable is not False

    def describe(self) -> str:
        lines = [
            f"seed {self.seed}: {'ok' if self.ok else 'FAILED'} (replay: cloudless sim raft --first {self.seed} --seeds 1)"
        ]
        lines += [f"  violation: {v}" for v in self.violations]
        if self.linearizable is False:
            lines.append(f"  not linearizable: {self.explanation}")
        return "\n".join(lines)


class InvariantViolation(Exception):
    pass


# ---------------------------------------------------------------------------
# nodes and clients


class SimNode:
    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.disk = SimDisk()
        self.core: RaftNode | None = None
        self.fsm = KVStateMachine()
        self.incarnation = 0
        self.down_until = 0
        self.phase = 0
        self.reads_waiting: list[ReadState] = []
        self.last_applied = 0

    @property
    def up(self) -> bool:
        return self.core is not None


@dataclass
class _Attempt:
    node: str
    incarnation: int
    deadline: int
    index: int = 0  # writes: the log index the proposal got
    ctx: bytes = b""  # reads: the ReadIndex context


@dataclass
class _ClientOp:
    op: str
    key: str
    input: Any
    call: int
    seq: int = 0
    command: bytes = b""
    attempt: _Attempt | None = None


@dataclass
class SimClient:
    number: int
    name: str
    seq: int = 0
    current: _ClientOp | None = None
    next_action: int = 0
    leader_hint: str | None = None
    seen: dict[str, str | None] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# the simulation


class Simulation:
    def __init__(self, seed: int, config: SimConfig | None = None) -> None:
        self.seed = seed
        self.config = config or SimConfig()
        self.rng = random.Random(seed)
        self.net = SimNetwork(random.Random(self.rng.getrandbits(64)))
        self.fault_rng = random.Random(self.rng.getrandbits(64))
        self.client_rng = random.Random(self.rng.getrandbits(64))
        self.now = 0
        self.stats = SimStats()
        self.violations: list[str] = []
        self.history: list[Any] = []
        self._pending_history: list[tuple[SimClient, _ClientOp]] = []
        # Invariant bookkeeping
        self._leaders: dict[int, str] = {}
        self._entry_seen: dict[tuple[int, int], tuple[int, bytes, int]] = {}
        self._committed: dict[int, tuple[int, int, bytes]] = {}  # index -> (term, kind, data)
        self._max_committed = 0
        self._acked: dict[tuple[str, int], Any] = {}
        self._states: dict[int, tuple[tuple[str, str], ...]] = {}  # applied index -> key-value image

        c = self.config
        founders = [f"n{i}" for i in range(1, c.nodes + 1)]
        self.spares = [f"n{i}" for i in range(c.nodes + 1, c.nodes + c.spare_nodes + 1)]
        self.nodes: dict[str, SimNode] = {}
        for node_id in founders + self.spares:
            node = SimNode(node_id)
            node.phase = self.rng.randrange(c.tick_interval)
            if node_id in founders:
                bootstrap_log(node.disk, founders)
            self.nodes[node_id] = node
            self._start(node)
        self.clients = [SimClient(i, f"c{i}") for i in range(1, c.clients + 1)]
        self._keys = [f"k{i}" for i in range(1, c.keys + 1)]
        self._faults_on = c.faults
        self._next_fault = 50
        self._next_admin = 200
        if c.faults:
            self.net.drop_rate = self.fault_rng.choice([0.0, 0.01, 0.05, 0.1])
            self.net.duplicate_rate = self.fault_rng.choice([0.0, 0.02, 0.05])
            self.net.max_delay = self.fault_rng.choice([5, 10, 20])
            self.net.long_delay_rate = self.fault_rng.choice([0.0, 0.01, 0.03])

    # -- node lifecycle ----------------------------------------------------

    def _raft_config(self, node: SimNode) -> RaftConfig:
        c = self.config
        return RaftConfig(
            id=node.id,
            election_tick=c.election_tick,
            heartbeat_tick=c.heartbeat_tick,
            max_inflight_msgs=c.max_inflight_msgs,
            max_size_per_msg=c.max_size_per_msg,
            snapshot_chunk_bytes=c.snapshot_chunk_bytes,
            applied=node.disk.snapshot().meta.index,
        )

    def _start(self, node: SimNode) -> None:
        node.incarnation += 1
        snapshot = node.disk.snapshot()
        node.fsm = KVStateMachine.restore(snapshot.data)
        node.last_applied = snapshot.meta.index
        node.reads_waiting = []
        node.core = RaftNode(self._raft_config(node), node.disk, random.Random(self.rng.getrandbits(64)))

    def crash(self, node: SimNode, where: str) -> None:
        self.stats.crashes += 1
        self.stats.lost_writes += node.disk.crash(self.fault_rng)
        node.core = None
        node.down_until = self.now + self.fault_rng.randint(20, 400)
        log.debug("sim.crash", extra={"node": node.id, "where": where, "now": self.now})

    def _maybe_crash_at(self, node: SimNode, where: str) -> bool:
        c = self.config
        if (
            self._faults_on
            and c.crash_points
            and where in c.crash_point_names
            and self.fault_rng.random() < c.crash_point_rate
        ):
            self.crash(node, where)
            self.stats.crash_points[where] += 1
            return True
        return False

    # -- the driver loop: the steps cloudless/raft/driver.py carries out ------

    def _drive(self, node: SimNode) -> None:
        core = node.core
        while core is not None and core.has_ready():
            rd = core.ready()
            if rd.soft_state is not None and rd.soft_state.role is Role.LEADER:
                self._check_new_leader(node)
            # The production order (ready.py), with a chance of a crash after each step.
            for step in rd.steps():
                self._carry_out(node, step)
                if self._maybe_crash_at(node, f"after_{step.name}"):
                    return
            core.advance(rd)
            self._maybe_snapshot(node)

    def _carry_out(self, node: SimNode, step: Step) -> None:
        if isinstance(step, Send):
            for m in step.messages:
                self.net.send(m, self.now)
            self.stats.messages += len(step.messages)
        elif isinstance(step, Apply):
            for entry in step.entries:
                self._apply(node, entry)
            self._serve_reads(node)  # reads that waited for these entries
        elif isinstance(step, Write):
            node.disk.write(step.hard_state, step.entries, step.snapshot)
            self._check_appended(node, step.entries)
        elif isinstance(step, Sync):
            node.disk.sync()
        elif isinstance(step, Restore):
            node.fsm = KVStateMachine.restore(step.snapshot.data)
            node.last_applied = step.snapshot.meta.index
            self._check_state_agrees(node)
            self.stats.snapshots_installed += 1
        else:
            node.reads_waiting.extend(step.read_states)
            self._serve_reads(node)

    def _apply(self, node: SimNode, entry: Entry) -> None:
        if entry.index != node.last_applied + 1:
            self._violation(f"{node.id} applied index {entry.index} after {node.last_applied}")
        self._check_durable(node, entry)
        node.last_applied = entry.index
        # State-machine safety (Figure 3): one entry per index, everywhere.
        seen = self._committed.get(entry.index)
        mine = (entry.term, entry.kind, entry.data)
        if seen is None:
            self._committed[entry.index] = mine
            self._max_committed = max(self._max_committed, entry.index)
        elif seen != mine:
            self._violation(f"state-machine safety: {node.id} applied {mine[:2]} at {entry.index}, others {seen[:2]}")
        for client in self.clients:
            op = client.current
            attempt = op.attempt if op is not None else None
            if op is not None and attempt is not None and attempt.index == entry.index and attempt.node == node.id:
                if entry.data != op.command:
                    op.attempt = None  # lost to another leader: retry
        outcome = node.fsm.apply(entry)
        self._check_state_agrees(node)
        if outcome is None:
            return
        self.stats.commands_applied += 1
        client_name, seq, result = outcome
        for client in self.clients:
            op = client.current
            if client.name != client_name or op is None or op.seq != seq or op.attempt is None:
                continue
            if op.attempt.node == node.id and op.attempt.incarnation == node.incarnation:
                self._complete(client, result)

    def _serve_reads(self, node: SimNode) -> None:
        if not node.reads_waiting:
            return
        still: list[ReadState] = []
        for rs in node.reads_waiting:
            if node.last_applied < rs.index:
                still.append(rs)
                continue
            for client in self.clients:
                op = client.current
                if op is None or op.op != "get" or op.attempt is None:
                    continue
                if op.attempt.ctx == rs.ctx and op.attempt.node == node.id:
                    self._complete(client, node.fsm.kv.get(op.key))
        node.reads_waiting = still

    def _maybe_snapshot(self, node: SimNode) -> None:
        core = node.core
        if core is None:
            return
        snap_index = node.disk.snapshot().meta.index
        if node.last_applied - snap_index < self.config.snapshot_every:
            return
        index = node.last_applied
        node.disk.create_snapshot(index, core.conf_state_at(index), node.fsm.snapshot())
        keep = self.fault_rng.randint(0, 4)
        node.disk.compact(max(index - keep, node.disk.first_index() - 1))
        self.stats.snapshots_taken += 1

    # -- invariants --------------------------------------------------------

    def _violation(self, text: str) -> None:
        self.violations.append(f"t={self.now}: {text}")
        raise InvariantViolation(text)

    def _check_durable(self, node: SimNode, entry: Entry) -> None:
        # A node applies only what its own disk holds durably: a state
        # machine must never run ahead of the log it restarts from.
        try:
            durable = node.disk.durable.term(entry.index) == entry.term
        except Compacted:
            durable = True  # inside the durable snapshot
        except EntryUnavailable:
            durable = False
        if not durable:
            self._violation(f"{node.id} applied entry {entry.index} (term {entry.term}) before it was synced")

    def _check_state_agrees(self, node: SimNode) -> None:
        # State machines agree: every node's key-value state after applying
        # index i (or restoring a snapshot of it) is the same.
        image = tuple(sorted(node.fsm.kv.items()))
        seen = self._states.setdefault(node.last_applied, image)
        if seen != image:
            self._violation(
                f"state machines disagree at index {node.last_applied}: {node.id} has {image}, others {seen}"
            )

    def _check_appended(self, node: SimNode, entries: list[Entry]) -> None:
        # Log matching (§5.3), checked inductively: an (index, term) pair
        # always names the same entry with the same predecessor term.
        seen = self._entry_seen
        for entry in entries:
            prev_term = node.disk.term(entry.index - 1)
            mine = (entry.kind, entry.data, prev_term)
            key = (entry.index, entry.term)
            other = seen.get(key)
            if other is None:
                seen[key] = mine
            elif other != mine:
                self._violation(
                    f"log matching: {node.id} holds a different entry at index {entry.index} term {entry.term}"
                )

    def _check_new_leader(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        term = core.term
        self.stats.elections += 1
        self.stats.max_term = max(self.stats.max_term, term)
        other = self._leaders.get(term)
        if other is not None and other != node.id:
            self._violation(f"election safety: {other} and {node.id} both led term {term}")
        self._leaders[term] = node.id
        # Leader completeness (§5.4): every committed entry is in the new leader's log.
        lo = core.log.first_index()
        for index in range(lo, self._max_committed + 1):
            committed = self._committed.get(index)
            if committed is None:
                continue
            if not core.log.match_term(index, committed[0]):
                self._violation(f"leader completeness: leader {node.id} of term {term} lacks committed entry {index}")

    def _check_leaders_now(self) -> None:
        for node in self.nodes.values():
            core = node.core
            if core is not None and core.role is Role.LEADER:
                other = self._leaders.get(core.term)
                if other is not None and other != node.id:
                    self._violation(f"election safety: {other} and {node.id} both led term {core.term}")

    # -- clients -----------------------------------------------------------

    def _pick_node(self, client: SimClient) -> SimNode | None:
        hint = client.leader_hint
        if hint is not None and self.client_rng.random() < 0.9:
            node = self.nodes.get(hint)
            if node is not None and node.up:
                return node
        up = [n for n in self.nodes.values() if n.up]
        return self.client_rng.choice(up) if up else None

    def _client_step(self, client: SimClient, issue_new: bool) -> None:
        if self.now < client.next_action:
            return
        op = client.current
        if op is None:
            if not issue_new:
                return
            op = client.current = self._new_op(client)
        attempt = op.attempt
        if attempt is not None:
            node = self.nodes[attempt.node]
            if node.incarnation == attempt.incarnation and node.up and self.now < attempt.deadline:
                return
            op.attempt = None  # timed out or the node crashed: retry (same seq)
            if client.leader_hint == attempt.node:
                client.leader_hint = None  # ask someone else
        self._submit(client, op)

    def _new_op(self, client: SimClient) -> _ClientOp:
        rng = self.client_rng
        key = rng.choice(self._keys)
        kind = rng.choices(("get", "put", "cas"), (4, 4, 2))[0]
        if kind == "get":
            return _ClientOp("get", key, None, self.now)
        client.seq += 1
        value = f"{client.name}.{client.seq}"
        if kind == "put":
            cmd = KVCommand(client.name, client.seq, "put", key, value)
            return _ClientOp("put", key, value, self.now, client.seq, msgspec.msgpack.encode(cmd))
        expected = client.seen.get(key) if rng.random() < 0.8 else rng.choice([None, "nope"])
        cmd = KVCommand(client.name, client.seq, "cas", key, value, expected)
        return _ClientOp("cas", key, (expected, value), self.now, client.seq, msgspec.msgpack.encode(cmd))

    def _submit(self, client: SimClient, op: _ClientOp) -> None:
        node = self._pick_node(client)
        if node is None or node.core is None:
            client.next_action = self.now + 20
            return
        core = node.core
        deadline = self.now + 20 * self.config.tick_interval
        try:
            if op.op == "get":
                ctx = f"{client.name}/{self.now}/{self.client_rng.getrandbits(32)}".encode()
                core.read_index(ctx)
                op.attempt = _Attempt(node.id, node.incarnation, deadline, ctx=ctx)
            else:
                index = core.propose(op.command)
                op.attempt = _Attempt(node.id, node.incarnation, deadline, index=index)
        except NotLeader as exc:
            client.leader_hint = exc.leader
            client.next_action = self.now + (1 if exc.leader else 15)
            return
        except ProposalDropped:
            client.next_action = self.now + 15
            return
        client.leader_hint = core.leader
        self._drive(node)

    def _complete(self, client: SimClient, result: Any) -> None:
        op = client.current
        assert op is not None
        if op.op != "get":
            key = (client.name, op.seq)
            if key in self._acked and self._acked[key] != result:
                self._violation(f"exactly-once: {key} answered {self._acked[key]!r} then {result!r}")
            self._acked[key] = result
        output = result
        if op.op == "get":
            client.seen[op.key] = result
        elif op.op == "put":
            client.seen[op.key] = op.input
            output = None
        elif result:
            client.seen[op.key] = op.input[1]
        self.history.append(Operation(client.number, op.key, op.op, op.input, output, op.call, self.now))
        self.stats.ops_completed += 1
        client.current = None
        client.next_action = self.now + self.client_rng.randint(0, 30)

    # -- faults ------------------------------------------------------------

    def _leader(self) -> SimNode | None:
        best: SimNode | None = None
        best_term = -1  # terms start at 0
        for node in self.nodes.values():
            core = node.core
            if core is not None and core.role is Role.LEADER and core.term > best_term:
                best, best_term = node, core.term
        return best

    def _inject_fault(self) -> None:
        rng = self.fault_rng
        ids = sorted(self.nodes)
        roll = rng.random()
        leader = self._leader()
        if roll < 0.25:
            self.net.heal()
        elif roll < 0.40:
            up = [n for n in self.nodes.values() if n.up]
            if up:
                self.crash(rng.choice(up), "random")
        elif roll < 0.55 and leader is not None:
            # Partition the leader away (symmetric).
            self.stats.partitions += 1
            self.net.partition([{leader.id}, set(ids) - {leader.id}])
        elif roll < 0.70:
            self.stats.partitions += 1
            shuffled = ids[:]
            rng.shuffle(shuffled)
            cut = rng.randint(1, len(shuffled) - 1)
            self.net.partition([set(shuffled[:cut]), set(shuffled[cut:])])
        elif roll < 0.80:
            self.stats.partitions += 1
            a, b = rng.sample(ids, 2)
            self.net.block(a, b)  # asymmetric
        elif roll < 0.90 and leader is not None and leader.core is not None:
            voters = [v for v in leader.core.conf_state.voters if v != leader.id]
            if voters:
                self.stats.transfers += 1
                try:
                    leader.core.transfer_leadership(rng.choice(voters))
                except NotLeader:
                    pass
                self._drive(leader)
        else:
            if leader is not None:
                self.crash(leader, "leader")

    def _change_membership(self) -> None:
        leader = self._leader()
        if leader is None or leader.core is None:
            return
        core = leader.core
        conf = core.conf_state
        rng = self.fault_rng
        members = set(conf.voters) | set(conf.learners)
        outsiders = [n for n in sorted(self.nodes) if n not in members]
        choices: list[ConfChange] = []
        for n in outsiders:
            choices.append(ConfChange(ConfChangeType.ADD_LEARNER, n))
        for n in conf.learners:
            choices.append(ConfChange(ConfChangeType.ADD_VOTER, n))
            choices.append(ConfChange(ConfChangeType.REMOVE_NODE, n))
        if len(conf.voters) > 3:
            for n in conf.voters:
                choices.append(ConfChange(ConfChangeType.REMOVE_NODE, n))
                choices.append(ConfChange(ConfChangeType.ADD_LEARNER, n))
        if not choices:
            return
        change = rng.choice(choices)
        try:
            core.propose_conf_change(change)
        except (ProposalDropped, NotLeader):
            return
        self.stats.conf_changes += 1
        self._drive(leader)

    # -- main loop ---------------------------------------------------------

    def step(self, issue_new: bool = True) -> None:
        now = self.now
        touched: dict[str, SimNode] = {}
        for m in self.net.due(now):
            node = self.nodes[m.to]
            if node.core is not None:
                node.core.step(m)
                touched[node.id] = node
        interval = self.config.tick_interval
        for node in self.nodes.values():
            if node.core is None:
                if now >= node.down_until:
                    self._start(node)
                    touched[node.id] = node
                continue
            if (now + node.phase) % interval == 0:
                node.core.tick()
                touched[node.id] = node
        for client in self.clients:
            self._client_step(client, issue_new)
        # Only a node that received input can have something to do.
        for node in touched.values():
            self._drive(node)
        if touched:
            self._check_leaders_now()

    def run(self) -> SimResult:
        c = self.config
        try:
            while self.now < c.duration:
                if self._faults_on and self.now >= self._next_fault:
                    self._inject_fault()
                    self._next_fault = self.now + self.fault_rng.randint(50, 400)
                if c.membership and self.now >= self._next_admin:
                    self._change_membership()
                    self._next_admin = self.now + self.fault_rng.randint(100, 500)
                self.step()
                self.now += 1
            # Heal: no more faults; every node comes back; clients finish.
            self._faults_on = False
            self.net.heal()
            self.net.drop_rate = self.net.duplicate_rate = self.net.long_delay_rate = 0.0
            for node in self.nodes.values():
                node.down_until = min(node.down_until, self.now)
            end = self.now + c.heal_duration
            issue_until = self.now + c.heal_duration // 4
            while self.now < end:
                self.step(issue_new=self.now < issue_until)
                self.now += 1
                if self.now >= issue_until and all(cl.current is None for cl in self.clients):
                    break
            self._check_liveness()
        except (InvariantViolation, RaftInvariantError) as exc:
            if not self.violations:
                self.violations.append(f"t={self.now}: {type(exc).__name__}: {exc} {getattr(exc, 'context', '')}")
        return self._finish()

    def _check_liveness(self) -> None:
        leader = self._leader()
        if leader is None:
            self.violations.append(f"t={self.now}: liveness: no leader {self.config.heal_duration} units after healing")
        stuck = [cl.name for cl in self.clients if cl.current is not None]
        if stuck:
            self.violations.append(f"t={self.now}: liveness: clients {stuck} still waiting after healing")

    def _finish(self) -> SimResult:
        for client in self.clients:
            op = client.current
            if op is not None and op.op != "get":
                self.history.append(Operation(client.number, op.key, op.op, op.input, None, op.call, None))
                self.stats.ops_indeterminate += 1
        result = SimResult(self.seed, self.violations, self.history, self.stats)
        if self.config.check_linearizability and not self.violations:
            check = check_history(self.history, timeout_s=20.0)
            result.linearizable = check.linearizable
            result.ops_checked = check.ops_checked
            result.explanation = check.explanation
        return result


def run_seed(seed: int, config: SimConfig | None = None) -> SimResult:
    return Simulation(seed, config).run()


# ---------------------------------------------------------------------------
# a hand-stepped cluster for scenario tests


class RaftHarness:
    """A few cores over SimDisks with a network the test steers message by message.

    `settle()` runs the driver loop (each Ready's `steps()`, then advance)
    on every node and delivers messages until the cluster is quiet; `drop`
    and `blocked` decide what is lost. Nothing is random except the cores'
    election jitter, seeded by `seed`.
    """

    def __init__(
        self,
        voters: list[str],
        *,
        extra: list[str] | None = None,
        seed: int = 0,
        **config: Any,
    ) -> None:
        self.rng = random.Random(seed)
        self.config = config
        self.disks: dict[str, SimDisk] = {}
        self.nodes: dict[str, RaftNode] = {}
        self.applied: dict[str, list[Entry]] = {}
        self.read_states: dict[str, list[ReadState]] = {}
        self.snapshots_installed: dict[str, list[Snapshot]] = {}
        self.blocked: set[tuple[str, str]] = set()
        self.down: set[str] = set()
        self.in_flight: list[Message] = []
        self.delivered: list[Message] = []
        for node_id in voters + (extra or []):
            disk = SimDisk()
            if node_id in voters:
                bootstrap_log(disk, voters)
            self.disks[node_id] = disk
            self.applied[node_id] = []
            self.read_states[node_id] = []
            self.snapshots_installed[node_id] = []
            self._start(node_id)

    def _start(self, node_id: str) -> None:
        disk = self.disks[node_id]
        cfg = RaftConfig(id=node_id, applied=disk.snapshot().meta.index, **self.config)
        self.nodes[node_id] = RaftNode(cfg, disk, random.Random(self.rng.getrandbits(64)))

    def __getitem__(self, node_id: str) -> RaftNode:
        return self.nodes[node_id]

    def process(self, node_id: str, crash_after: str | None = None) -> None:
        """One full driver pass for `node_id`: each Ready's steps in the driver's order.

        With `crash_after` (a step name from ready.STEP_NAMES), the node
        crashes, losing every unsynced write, right after the first step of
        that name; `restart` brings it back.
        """
        if crash_after is not None and crash_after not in STEP_NAMES:
            raise ValueError(f"unknown step {crash_after!r}; one of {STEP_NAMES}")
        if node_id in self.down:
            return
        node, disk = self.nodes[node_id], self.disks[node_id]
        while node.has_ready():
            rd = node.ready()
            for step in rd.steps():
                if isinstance(step, Send):
                    self.in_flight.extend(step.messages)
                elif isinstance(step, Apply):
                    self.applied[node_id].extend(step.entries)
                elif isinstance(step, Write):
                    disk.write(step.hard_state, step.entries, step.snapshot)
                elif isinstance(step, Sync):
                    disk.sync()
                elif isinstance(step, Restore):
                    self.snapshots_installed[node_id].append(step.snapshot)
                else:
                    self.read_states[node_id].extend(step.read_states)
                if step.name == crash_after:
                    self.crash(node_id, keep_unsynced=0)
                    return
            node.advance(rd)

    def deliver(self, drop: Any = None) -> int:
        """Deliver everything in flight once (dropping blocked/`drop`ped ones); returns the count."""
        batch, self.in_flight = self.in_flight, []
        count = 0
        for m in batch:
            if (
                m.to not in self.nodes
                or m.to in self.down
                or (m.frm, m.to) in self.blocked
                or (drop is not None and drop(m))
            ):
                continue
            self.delivered.append(m)
            self.nodes[m.to].step(m)
            count += 1
        return count

    def settle(self, drop: Any = None, rounds: int = 200) -> None:
        for _ in range(rounds):
            for node_id in self.nodes:
                self.process(node_id)
            if not self.in_flight:
                return
            self.deliver(drop)
        raise AssertionError("cluster did not settle")

    def tick(self, node_id: str, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[node_id].tick()

    def tick_all(self, n: int = 1, settle: bool = True) -> None:
        for _ in range(n):
            for node_id in self.nodes:
                if node_id not in self.down:
                    self.nodes[node_id].tick()
            if settle:
                self.settle()

    def elect(self, node_id: str) -> None:
        """Time `node_id` out (and only it) and let the election run.

        The other followers' leases are expired first, as if an election
        timeout had passed without word from a leader, but they do not
        campaign themselves.
        """
        node = self.nodes[node_id]
        self.expire_leases()
        for _ in range(4 * node.config.election_tick):
            node.tick()
            if node.role in (Role.PRE_CANDIDATE, Role.CANDIDATE, Role.LEADER):
                break
        self.settle()

    def isolate(self, node_id: str) -> None:
        for other in self.nodes:
            if other != node_id:
                self.blocked.add((node_id, other))
                self.blocked.add((other, node_id))

    def heal(self) -> None:
        self.blocked.clear()

    def crash(self, node_id: str, keep_unsynced: int | None = None) -> None:
        """Lose unsynced writes and the in-memory core; `restart` brings it back."""
        self.disks[node_id].crash(self.rng, keep_unsynced)
        self.down.add(node_id)

    def expire_leases(self) -> None:
        """Let an election timeout pass on every follower without it campaigning."""
        for node in self.nodes.values():
            if node.role is not Role.LEADER:
                node._election_elapsed = max(node._election_elapsed, node.config.election_tick)

    def restart(self, node_id: str) -> None:
        self.down.discard(node_id)
        self._start(node_id)

    def leader(self) -> str | None:
        leaders = [n for n, node in self.nodes.items() if n not in self.down and node.role is Role.LEADER]
        return max(leaders, key=lambda n: self.nodes[n].term) if leaders else None

    def applied_data(self, node_id: str) -> list[bytes]:
        return [e.data for e in self.applied[node_id] if e.kind == EntryKind.NORMAL and e.data]
