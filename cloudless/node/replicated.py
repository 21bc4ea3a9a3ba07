"""The node's replicated state: a Raft driver over RocksDB feeding the state
machine, with Raft traffic carried by the RPC layer.

Every node runs this, whatever its Raft role: a node outside the
configuration never campaigns and simply receives nothing until autopilot
adds it as a learner.

Writes go to the leader. `propose()` on a follower forwards the encoded
proposal to the leader over RPC; the (client_id, seq) session inside makes a
retried forward apply at most once. Linearizable reads run on the leader
after a ReadIndex round (thesis §6.4); a stale read serves this node's copy.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import cast

import msgspec
import trio

from cloudless.authz import PermissionDenied
from cloudless.errors import CloudlessError, Unavailable
from cloudless.raft.core import NotLeader, RaftConfig, RaftNode, Role
from cloudless.raft.driver import RaftDriver
from cloudless.raft.errors import NoLeader, NotAMember
from cloudless.raft.messages import (
    ConfChange,
    ConfState,
    Entry,
    EntryKind,
    Message,
    Snapshot,
    decode_message,
    encode_message,
)
from cloudless.raft.rocks import RocksStorage
from cloudless.raft.storage import bootstrap_log
from cloudless.state.commands import (
    Command,
    CommandUnion,
    Done,
    Proposal,
    Result,
    decode_proposal,
    decode_result,
    encode_proposal,
    encode_result,
    node_may_propose,
)
from cloudless.state.fsm import Change, StateMachine
from cloudless.transport.rpc import RpcClient, RpcContext, RpcServer

log = logging.getLogger(__name__)

# Snapshot the state machine and compact the log every this many entries.
SNAPSHOT_EVERY = 10_000
# Entries kept behind a snapshot so slow followers catch up from the log.
COMPACTION_MARGIN = 1_000
LEADER_WAIT = 5.0


class RaftBatch(msgspec.Struct, frozen=True):
    messages: list[bytes]


# Messages waiting for one peer beyond this are dropped: Raft retransmits.
PEER_QUEUE_LIMIT = 4096


class ForwardedProposal(msgspec.Struct, frozen=True):
    proposal: bytes


class ForwardedResult(msgspec.Struct, frozen=True):
    result: bytes
    index: int


class ReplicatedState:
    def __init__(
        self,
        node_id: str,
        raft_dir: Path,
        rpc: RpcClient,
        address_of: Callable[[str], tuple[str, int] | None],
        *,
        tick_interval: float = 0.05,
        election_tick: int = 10,
        heartbeat_tick: int = 1,
        rng: random.Random | None = None,
        clock: Callable[[], float],
        leader_hint: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.node_id = node_id
        self.storage = RocksStorage(raft_dir)
        self.fsm = StateMachine()
        snapshot = self.storage.snapshot()
        if snapshot.data:
            self.fsm.restore(snapshot.data)
        self.core = RaftNode(
            RaftConfig(
                id=node_id, election_tick=election_tick, heartbeat_tick=heartbeat_tick, applied=snapshot.meta.index
            ),
            self.storage,
            rng or random.Random(),
        )
        self.driver = RaftDriver(
            self.core,
            self.storage,
            self._send,
            self._apply,
            restore=self._restore,
            tick_interval=tick_interval,
            send_timeout=1.0,
        )
        self._rpc = rpc
        self._address_of = address_of
        self._clock = clock
        self._leader_hint = leader_hint
        self._results: dict[int, Result] = {}
        self._snapshot_index = snapshot.meta.index
        self._changed = trio.Event()
        self._leader_changed = trio.Event()
        self._last_leader: str | None = None
        self._removed_conf: ConfState | None = None  # our configuration when the leader said we are out of it
        self._peer_queues: dict[str, list[bytes]] = {}
        self._peer_wakeups: dict[str, trio.Event] = {}
        # Peers that hold a subscription stream to us: their messages flow
        # down it, pipelined and in order, instead of one RPC per batch.
        self._subscribers: dict[str, tuple[object, trio.Event]] = {}
        self.dropped_from_non_members = 0  # Raft messages refused: sender outside our configuration
        self._nursery: trio.Nursery | None = None
        self.change_listeners: list[Callable[[list[Change]], None]] = []
        self.applied_listeners: list[Callable[[], None]] = []

    @staticmethod
    def bootstrap(raft_dir: Path, node_id: str) -> None:
        storage = RocksStorage(raft_dir)
        try:
            bootstrap_log(storage, [node_id])
        finally:
            storage.close()

    def close(self) -> None:
        self.storage.close()

    # -- running -----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.driver.run)
            nursery.start_soon(self._watch_leader)
            nursery.start_soon(self._maintain_subscriptions)
            task_status.started()

    async def _watch_leader(self) -> None:
        while True:
            await trio.sleep(self.driver.tick_interval)
            leader = self.core.leader
            if leader != self._last_leader:
                self._last_leader = leader
                log.info(
                    "raft.leader", extra={"fields": {"node": self.node_id, "leader": leader, "term": self.core.term}}
                )
                self._leader_changed.set()
                self._leader_changed = trio.Event()

    def register(self, server: RpcServer) -> None:
        server.unary("raft.batch", request=RaftBatch)(self._serve_batch)
        server.stream("raft.subscribe")(self._serve_subscribe)
        server.unary("raft.propose", request=ForwardedProposal)(self._serve_propose)
        server.unary("raft.read_index")(self._serve_read_index)

    # -- raft transport ------------------------------------------------------------

    def _send(self, message: Message) -> None:
        """Queue for the peer; never blocks the driver.

        A peer subscribed to us (`raft.subscribe`) gets its messages down
        that stream, pipelined and in order. Otherwise a sender task pushes
        them as `raft.batch` RPCs: while one is in flight, later messages
        pile up and leave together in the next.
        """
        queue = self._peer_queues.setdefault(message.to, [])
        if len(queue) >= PEER_QUEUE_LIMIT:
            del queue[: len(queue) // 2]  # Raft recovers from lost messages
        queue.append(encode_message(message))
        subscriber = self._subscribers.get(message.to)
        if subscriber is not None:
            subscriber[1].set()
            return
        wakeup = self._peer_wakeups.get(message.to)
        if wakeup is None:
            wakeup = self._peer_wakeups[message.to] = trio.Event()
            if self._nursery is not None:
                self._nursery.start_soon(self._peer_sender, message.to)
        wakeup.set()

    async def _peer_sender(self, peer: str) -> None:
        queue = self._peer_queues[peer]
        while True:
            await self._peer_wakeups[peer].wait()
            self._peer_wakeups[peer] = trio.Event()
            if not queue or peer in self._subscribers:
                continue
            batch = list(queue)
            queue.clear()
            address = self._address_of(peer)
            if address is None:
                continue  # unknown peer: Raft retries once it is known
            try:
                await self._rpc.call(address, "raft.batch", RaftBatch(batch), timeout=1.0)
            except CloudlessError as exc:
                log.debug("raft.send_failed", extra={"fields": {"to": peer, "error": str(exc)}})
                await trio.sleep(0.05)  # a down peer: do not spin

    async def _serve_batch(self, ctx: RpcContext, batch: RaftBatch) -> bytes:
        if ctx.peer.kind != "node":
            raise CloudlessError("raft messages must come from nodes", peer=ctx.peer.name)
        for body in batch.messages:
            message = decode_message(body)  # InvalidInput goes back to the sender
            if message.frm != ctx.peer.name:
                raise CloudlessError("raft messages must come from the node they name", peer=ctx.peer.name)
            self._deliver(message)
        return b""

    def _deliver(self, message: Message) -> None:
        """Hand a peer's message to Raft, unless its sender is outside our configuration.

        A non-member (a removed voter, a device that was never added, a
        stolen certificate) must not move our term or call elections. A node
        that is not itself a member yet (catching up) takes messages from
        anyone authenticated as a node: it has no configuration to check.
        """
        conf = self.core.conf_state
        members = set(conf.voters) | set(conf.learners) | set(conf.voters_outgoing) | set(conf.learners_next)
        if self.node_id in members and message.frm not in members:
            self.dropped_from_non_members += 1
            log.debug("raft.dropped_non_member", extra={"fields": {"from": message.frm}})
            return
        self.driver.deliver(message)

    async def _serve_subscribe(self, ctx: RpcContext, body: bytes) -> None:
        """Stream the caller's messages to it for as long as it listens."""
        peer = ctx.peer.name
        if ctx.peer.kind != "node":
            raise CloudlessError("only nodes subscribe to Raft messages", peer=peer)
        token = object()
        wakeup = trio.Event()
        self._subscribers[peer] = (token, wakeup)  # a newer subscription replaces an older one
        queue = self._peer_queues.setdefault(peer, [])
        try:
            while self._subscribers.get(peer, (None,))[0] is token:
                if queue:
                    batch = list(queue)
                    queue.clear()
                    await ctx.send(RaftBatch(batch))
                    continue
                await wakeup.wait()
                wakeup = trio.Event()
                if self._subscribers.get(peer, (None,))[0] is token:
                    self._subscribers[peer] = (token, wakeup)
        finally:
            if self._subscribers.get(peer, (None,))[0] is token:
                del self._subscribers[peer]

    async def _maintain_subscriptions(self) -> None:
        """Subscribe to every peer that may send us Raft messages: the
        members of our configuration and the leader."""
        active: dict[str, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            while True:
                conf = self.core.conf_state
                wanted = set(conf.voters) | set(conf.learners)
                leader = self.known_leader()
                if leader:
                    wanted.add(leader)
                wanted.discard(self.node_id)
                for peer in wanted - set(active):
                    scope = active[peer] = trio.CancelScope()
                    nursery.start_soon(self._subscribe, peer, scope)
                for peer in set(active) - wanted:
                    active.pop(peer).cancel()
                await trio.sleep(0.5)

    async def _subscribe(self, peer: str, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                address = self._address_of(peer)
                if address is not None:
                    try:
                        async with self._rpc.stream(address, "raft.subscribe", b"", item=RaftBatch) as items:
                            async for batch in items:
                                for body in batch.messages:
                                    message = decode_message(body)
                                    if message.frm != peer or message.to != self.node_id:
                                        raise CloudlessError("raft message on the wrong stream", peer=peer)
                                    self._deliver(message)
                    except CloudlessError as exc:
                        log.debug("raft.subscription_lost", extra={"fields": {"peer": peer, "error": str(exc)}})
                await trio.sleep(0.3)

    # -- applying ----------------------------------------------------------------

    async def _apply(self, entries: list[Entry]) -> None:
        changes: list[Change] = []
        for entry in entries:
            data = entry.data if entry.kind == EntryKind.NORMAL else b""
            result = self.fsm.apply(entry.index, data)
            if entry.kind == EntryKind.NORMAL and data:
                self._results[entry.index] = result
            changes.extend(self.fsm.take_changes())
        if len(self._results) > 100_000:  # results nobody waited for (follower applies)
            for index in sorted(self._results)[:50_000]:
                del self._results[index]
        if changes:
            for listener in self.change_listeners:
                listener(changes)
        for on_applied in self.applied_listeners:
            on_applied()
        self._changed.set()
        self._changed = trio.Event()
        if self.fsm.applied_index - self._snapshot_index >= SNAPSHOT_EVERY:
            self._take_snapshot()

    def _take_snapshot(self) -> None:
        # The driver records it between two Readies (the core must not see
        # its storage change under it).
        index = self.fsm.applied_index
        self.driver.take_snapshot(index, self.fsm.snapshot(), keep_entries=COMPACTION_MARGIN)
        self._snapshot_index = index

    async def _restore(self, snapshot: Snapshot) -> None:
        self.fsm.restore(snapshot.data)
        self._snapshot_index = snapshot.meta.index
        self._results.clear()
        for listener in self.change_listeners:
            listener([Change(snapshot.meta.index, "snapshot", "")])

    async def wait_changed(self) -> None:
        await self._changed.wait()

    # -- leadership ----------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.core.role is Role.LEADER

    @property
    def leader(self) -> str | None:
        return self.core.leader

    @property
    def is_member(self) -> bool:
        conf = self.core.conf_state
        if self._removed_conf is not None:
            if conf == self._removed_conf:
                return False
            self._removed_conf = None  # a newer configuration: trust it again
        return self.node_id in conf.voters or self.node_id in conf.learners

    def known_leader(self) -> str | None:
        # Outside the configuration we hear no Raft traffic, and a node removed
        # while it was down still believes it is a member: gossip says who leads.
        return self.core.leader or self._leader_hint()

    async def wait_leader(self, timeout: float = LEADER_WAIT) -> str:
        with trio.move_on_after(timeout):
            while (leader := self.known_leader()) is None:
                # Raft's own leader arrives as an event; gossip's hint (for nodes
                # outside Raft) has none, so look again every tick as well.
                with trio.move_on_after(self.driver.tick_interval):
                    await self._leader_changed.wait()
            return leader
        raise NoLeader("no Raft leader known yet", node=self.node_id)

    async def wait_leadership(self, leading: bool = True) -> None:
        """Return once this node leads (with `leading=False`: once it does not)."""
        while self.is_leader != leading:
            await self._leader_changed.wait()

    async def _leader_address(self) -> tuple[str, tuple[str, int] | None]:
        leader = await self.wait_leader()
        return leader, (None if leader == self.node_id else self._address_of(leader))

    # -- writes ----------------------------------------------------------------

    async def propose(
        self, command: Command, *, client_id: str = "", seq: int = 0, timeout: float = 5.0
    ) -> tuple[Result, int]:
        # Every Command subclass is a member of the union the Proposal carries.
        union_member = cast(CommandUnion, command)
        proposal = encode_proposal(Proposal(command=union_member, now=self._clock(), client_id=client_id, seq=seq))
        return await self.propose_encoded(proposal, timeout=timeout)

    async def propose_encoded(self, proposal: bytes, timeout: float = 5.0) -> tuple[Result, int]:
        for _ in range(3):
            leader, address = await self._leader_address()
            if leader == self.node_id:
                try:
                    index = await self.driver.propose(proposal, timeout=timeout)
                except NotLeader:
                    await trio.sleep(self.driver.tick_interval * 2)
                    continue
                return self._results.pop(index, None) or self._result_from_log(index), index
            if address is None:
                raise NoLeader(f"leader {leader} has no known address")
            reply = await self._rpc.call(
                address, "raft.propose", ForwardedProposal(proposal), response=ForwardedResult, timeout=timeout
            )
            return decode_result(reply.result), reply.index
        raise NoLeader("leadership kept moving while proposing")

    def _result_from_log(self, index: int) -> Result:
        # Applied before we looked (a snapshot raced us): the FSM's session
        # table or a re-read is not available, so report success by index.

        return Done(index=index)

    async def _serve_propose(self, ctx: RpcContext, req: ForwardedProposal) -> ForwardedResult:
        if ctx.peer.kind != "node":
            raise PermissionDenied("only nodes forward proposals", peer=ctx.peer.name)
        if not self.is_leader:
            raise NotLeader("not the leader", leader=self.core.leader or "")
        proposal = decode_proposal(req.proposal)
        refusal = node_may_propose(proposal.command, ctx.peer.name)
        if refusal is not None:
            raise PermissionDenied(f"permission denied: {refusal}", peer=ctx.peer.name)
        # The leader's clock and the proven sender, never what the node wrote.
        stamped = msgspec.structs.replace(proposal, now=self._clock(), proposer=ctx.peer.name)
        index = await self.driver.propose(encode_proposal(stamped), timeout=5.0)
        result = self._results.pop(index, None) or self._result_from_log(index)
        return ForwardedResult(encode_result(result), index)

    async def propose_conf_change(self, change: ConfChange, timeout: float = 5.0) -> int:
        return await self.driver.propose_conf_change(change, timeout=timeout)

    # -- reads -------------------------------------------------------------------

    async def linearizable(self, timeout: float = 5.0) -> None:
        """Return once this node's state reflects every write committed before the call.

        On the leader: ReadIndex. On a follower: ask the leader for its read
        index, then wait until we have applied that far (thesis §6.4.1).
        """
        for _ in range(3):
            leader, address = await self._leader_address()
            if leader == self.node_id:
                try:
                    await self.driver.read_index(timeout=timeout)
                    return
                except NotLeader:
                    await trio.sleep(self.driver.tick_interval * 2)
                    continue
            if address is None:
                raise NoLeader(f"leader {leader} has no known address")
            try:
                raw = await self._rpc.call(address, "raft.read_index", b"", timeout=timeout)
            except CloudlessError as exc:
                if getattr(exc, "code", "") == NotAMember.code:
                    self._removed_conf = self.core.conf_state
                    raise NotAMember(f"{self.node_id} is not in {leader}'s configuration") from None
                raise
            index = int.from_bytes(raw, "big")
            with trio.move_on_after(timeout):
                await self.driver.wait_applied(index)
                return
            raise Unavailable(f"did not catch up to read index {index} in {timeout:.0f}s", node=self.node_id)
        raise NoLeader("leadership kept moving while reading")

    async def _serve_read_index(self, ctx: RpcContext, body: bytes) -> bytes:
        if ctx.peer.kind != "node":
            raise CloudlessError("only nodes ask for read indexes", peer=ctx.peer.name)
        conf = self.core.conf_state
        if self.is_leader and ctx.peer.name not in conf.voters and ctx.peer.name not in conf.learners:
            raise NotAMember(f"{ctx.peer.name} is not in the configuration", peer=ctx.peer.name)
        index = await self.driver.read_index(timeout=5.0)
        return index.to_bytes(8, "big")
