"""The trio driver of one Raft core: timers, IO and waiting, no protocol decisions.

One loop owns the `RaftNode`. Everything else (inbound messages, proposals,
reads, transfers) is queued as a command and run by the loop between
`advance()` and the next `ready()`, which is the only time the core may be
touched. Each turn:

    wait for a command or the next tick
    run queued commands; tick if due
    while the core has a Ready:
        carry out rd.steps() in order            (ready.py decides it: a
                                                   leader's appends and
                                                   already-stable entries
                                                   before the fsync, which
                                                   runs in a worker thread;
                                                   votes and acks after it)
        advance

Group commit falls out of this shape: while one sync runs in its thread,
every proposal and message that arrives waits in the queue, and the next
Ready carries all of them to one write and one sync.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from cloudless.errors import InvalidInput, Unavailable
from cloudless.raft.core import ProposalDropped, RaftNode
from cloudless.raft.messages import ConfChange, Entry, Message, Snapshot
from cloudless.raft.ready import Apply, Ready, Restore, Send, Sync, Write
from cloudless.raft.storage import StorageError, WritableLogStorage

log = logging.getLogger(__name__)

# Raft recovers from lost messages, so a peer that cannot keep up loses
# messages instead of making us buffer without bound.
OUTBOX_LIMIT = 1024


class ProposalTimeout(Unavailable):
    """No answer in time: the proposal may or may not commit later."""


class ReadTimeout(Unavailable):
    """No read index in time (no leader, or the request was lost)."""


class ProposalSuperseded(ProposalDropped):
    """A different entry (from a newer leader) was committed at the proposal's index."""


class DriverStopped(Unavailable):
    """The driver stopped before the request was answered."""


class _Waiter:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def resolve(self, value: Any) -> None:
        if not self.done.is_set():
            self.value = value
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    async def wait(self, timeout: float, timeout_error: Unavailable) -> Any:
        with trio.move_on_after(timeout):
            await self.done.wait()
        if not self.done.is_set():
            raise timeout_error
        if self.error is not None:
            raise self.error
        return self.value


class RaftDriver:
    """Runs `node` over `storage` under trio.

    `send(message)` hands a message to the transport; if it is a coroutine
    function, each peer gets an outbox task so one slow peer never stalls
    the loop, and each send gets `send_timeout` seconds. `apply(entries)`
    applies committed entries (every kind, including no-ops and
    configuration changes) in order; `restore(snapshot)` replaces the state
    machine with a snapshot from the leader.

    At start the state machine must already reflect `node.applied` (after a
    restart: restored from `storage.snapshot()`, and the node built with
    `RaftConfig(applied=...)`); the driver applies everything after it.
    """

    def __init__(
        self,
        node: RaftNode,
        storage: WritableLogStorage,
        send: Callable[[Message], Any],
        apply: Callable[[list[Entry]], Awaitable[None]],
        *,
        restore: Callable[[Snapshot], Awaitable[None]] | None = None,
        tick_interval: float = 0.05,
        sync_in_thread: bool = True,
        send_timeout: float = 1.0,
        leader_sends_before_sync: bool = True,
    ) -> None:
        self.node = node
        self.storage = storage
        self._send = send
        self._send_is_async = inspect.iscoroutinefunction(send)
        self._apply = apply
        self._restore = restore
        self.tick_interval = tick_interval
        self._sync_in_thread = sync_in_thread
        self.send_timeout = send_timeout
        self.leader_sends_before_sync = leader_sends_before_sync
        self._commands: deque[Callable[[], None]] = deque()
        self._wakeup = trio.Event()
        self._proposals: dict[int, tuple[int, _Waiter]] = {}  # index -> (term, waiter)
        self._reads: dict[bytes, _Waiter] = {}  # ctx -> waiter, until a ReadState arrives
        self._reads_to_apply: list[tuple[int, _Waiter]] = []  # (read index, waiter)
        self._read_ids = itertools.count(1)
        self._outboxes: dict[str, trio.MemorySendChannel] = {}
        self._nursery: trio.Nursery | None = None
        self._applied_changed = trio.Event()
        self.applied = node.applied
        self._stats = {
            "ticks": 0,
            "readies": 0,
            "syncs": 0,
            "entries_written": 0,
            "messages_sent": 0,
            "messages_dropped": 0,
            "entries_applied": 0,
            "sync_ms": 0.0,
            "apply_ms": 0.0,
        }

    # -- inputs (any task) --------------------------------------------------------

    def deliver(self, message: Message) -> None:
        """Queue a message from a peer; never blocks."""
        self._queue(lambda: self.node.step(message))

    async def propose(self, data: bytes, timeout: float = 5.0) -> int:
        """Replicate `data`; returns its log index once committed and applied here.

        Raises NotLeader (with the known leader) at once on a follower,
        ProposalDropped if the leader refuses it, ProposalSuperseded if a new
        leader overwrote it, ProposalTimeout if neither happened in time.
        """
        return await self._propose(lambda: self.node.propose(data), timeout)

    async def propose_conf_change(self, change: ConfChange, timeout: float = 5.0) -> int:
        return await self._propose(lambda: self.node.propose_conf_change(change), timeout)

    async def _propose(self, call: Callable[[], int], timeout: float) -> int:
        waiter = _Waiter()

        def run() -> None:
            try:
                index = call()
            except Exception as exc:  # NotLeader, ProposalDropped... belong to the caller
                waiter.fail(exc)
                return
            self._proposals[index] = (self.node.term, waiter)

        self._queue(run)
        return await waiter.wait(timeout, ProposalTimeout("proposal not committed in time", timeout=timeout))

    async def read_index(self, timeout: float = 5.0) -> int:
        """A linearizable read point: returns an index that has been applied here
        and that is at least the commit index when the call began (thesis §6.4)."""
        ctx = b"r%d" % next(self._read_ids)
        waiter = _Waiter()

        def run() -> None:
            try:
                self.node.read_index(ctx)
            except Exception as exc:
                waiter.fail(exc)
                return
            self._reads[ctx] = waiter

        self._queue(run)
        try:
            return await waiter.wait(timeout, ReadTimeout("no read index in time", timeout=timeout))
        finally:
            self._reads.pop(ctx, None)

    def transfer_leadership(self, to: str) -> None:
        """Ask the core to hand over to `to`; ignored (and logged) unless we lead."""

        def run() -> None:
            try:
                self.node.transfer_leadership(to)
            except Unavailable as exc:
                log.info("raft.driver.transfer_refused", extra={"node": self.node.id, "to": to, "error": repr(exc)})

        self._queue(run)

    def take_snapshot(self, index: int, data: bytes, keep_entries: int = 0) -> None:
        """Record the state machine's `data` as of applied `index`, then compact
        the log up to `index - keep_entries` (entries kept help slow followers
        catch up without a snapshot). Runs between two Readies; durable with
        the next sync."""

        def run() -> None:
            if index <= self.storage.snapshot().meta.index:
                return
            self.storage.create_snapshot(index, self.node.conf_state_at(index), data)
            self.storage.compact(max(index - keep_entries, self.storage.first_index() - 1))
            log.info("raft.driver.snapshot", extra={"node": self.node.id, "index": index, "bytes": len(data)})

        self._queue(run)

    async def wait_applied(self, index: int) -> None:
        while self.applied < index:
            await self._applied_changed.wait()

    def statistics(self) -> dict[str, float]:
        return dict(self._stats, applied=self.applied, commit=self.node.commit_index, term=self.node.term)

    def _queue(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        self._wakeup.set()

    # -- the loop ------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._loop()
            finally:
                self._fail_waiters(DriverStopped("raft driver stopped"))
                nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        next_tick = trio.current_time() + self.tick_interval
        while True:
            with trio.move_on_at(next_tick):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._commands:
                command = self._commands.popleft()
                try:
                    command()
                except InvalidInput as exc:  # a malformed message must not stop the node
                    log.warning("raft.driver.bad_input", extra={"node": self.node.id, "error": repr(exc)})
                # Anything else (RaftInvariantError above all) stops the driver: a
                # node that cannot keep Raft's rules must not keep running.
            now = trio.current_time()
            if now >= next_tick:
                self.node.tick()
                self._stats["ticks"] += 1
                # After a long stall, tick once and start over rather than in a burst.
                next_tick = max(next_tick + self.tick_interval, now)
            while self.node.has_ready():
                await self._handle(self.node.ready())

    async def _handle(self, rd: Ready) -> None:
        self._stats["readies"] += 1
        # The order, and what may run before the fsync, is the core's (ready.py).
        for step in rd.steps(replicate_before_sync=self.leader_sends_before_sync):
            if isinstance(step, Send):
                for message in step.messages:
                    self._dispatch(message)
            elif isinstance(step, Apply):
                await self._apply_committed(step.entries)
            elif isinstance(step, Write):
                self.storage.write(step.hard_state, step.entries, step.snapshot)
                self._stats["entries_written"] += len(step.entries)
            elif isinstance(step, Sync):
                started = trio.current_time()
                if self._sync_in_thread:
                    await trio.to_thread.run_sync(self.storage.sync)
                else:
                    self.storage.sync()
                self._stats["syncs"] += 1
                self._stats["sync_ms"] += (trio.current_time() - started) * 1000
            elif isinstance(step, Restore):
                if self._restore is None:
                    raise StorageError(
                        "snapshot received but the driver has no restore callback", index=step.snapshot.meta.index
                    )
                await self._restore(step.snapshot)
                self._set_applied(step.snapshot.meta.index)
            else:
                for rs in step.read_states:
                    waiter = self._reads.pop(rs.ctx, None)
                    if waiter is not None:
                        self._reads_to_apply.append((rs.index, waiter))
                self._release_reads()
        self.node.advance(rd)

    async def _apply_committed(self, entries: list[Entry]) -> None:
        if not entries:
            return
        started = trio.current_time()
        await self._apply(entries)
        self._stats["apply_ms"] += (trio.current_time() - started) * 1000
        self._stats["entries_applied"] += len(entries)
        self._settle_proposals(entries)
        self._set_applied(entries[-1].index)
        self._release_reads()

    def _settle_proposals(self, entries: list[Entry]) -> None:
        for entry in entries:
            pending = self._proposals.pop(entry.index, None)
            if pending is None:
                continue
            term, waiter = pending
            if entry.term == term:
                waiter.resolve(entry.index)
            else:
                waiter.fail(
                    ProposalSuperseded(
                        "another leader's entry committed at this index",
                        index=entry.index,
                        term=term,
                        committed_term=entry.term,
                    )
                )

    def _set_applied(self, index: int) -> None:
        if index > self.applied:
            self.applied = index
            self._applied_changed.set()
            self._applied_changed = trio.Event()

    def _release_reads(self) -> None:
        if not self._reads_to_apply:
            return
        waiting = []
        for index, waiter in self._reads_to_apply:
            if index <= self.applied:
                waiter.resolve(max(index, self.applied))
            else:
                waiting.append((index, waiter))
        self._reads_to_apply = waiting

    def _fail_waiters(self, error: Unavailable) -> None:
        for _, waiter in self._proposals.values():
            waiter.fail(error)
        for waiter in self._reads.values():
            waiter.fail(error)
        for _, waiter in self._reads_to_apply:
            waiter.fail(error)
        self._proposals.clear()
        self._reads.clear()
        self._reads_to_apply.clear()

    # -- sending -------------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        self._stats["messages_sent"] += 1
        if not self._send_is_async:
            self._send(message)
            return
        outbox = self._outboxes.get(message.to)
        if outbox is None:
            outbox, inbox = trio.open_memory_channel(OUTBOX_LIMIT)
            self._outboxes[message.to] = outbox
            self._nursery.start_soon(self._drain_outbox, message.to, inbox)
        try:
            outbox.send_nowait(message)
        except trio.WouldBlock:
            self._stats["messages_dropped"] += 1

    async def _drain_outbox(self, peer: str, inbox: trio.MemoryReceiveChannel) -> None:
        async for message in inbox:
            with trio.move_on_after(self.send_timeout) as scope:
                try:
                    await self._send(message)
                except Unavailable as exc:
                    self._stats["messages_dropped"] += 1
                    log.debug("raft.driver.send_failed", extra={"peer": peer, "error": repr(exc)})
            if scope.cancelled_caught:
                self._stats["messages_dropped"] += 1
                log.debug("raft.driver.send_timeout", extra={"peer": peer, "timeout": self.send_timeout})


__all__ = ["DriverStopped", "ProposalSuperseded", "ProposalTimeout", "RaftDriver", "ReadTimeout"]
