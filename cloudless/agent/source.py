"""Where the agent learns its allocations and sends its reports.

`AllocationSource` is the interface: `watch(node)` is an async context
manager yielding an async iterator of `NodeAllocations` (whole sets);
`report(batch)` delivers observations. `ClusterSource` talks to the Raft
leader over the node's RPC client; `MemorySource` is its twin for tests,
with a switch that cuts the node off.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from cloudless.agent.messages import HEARTBEAT_S, NodeAllocations, ReportAck, ReportBatch, WatchAllocations
from cloudless.errors import Unavailable
from cloudless.transport.rpc import RpcClient

# A watch that brings nothing (not even a heartbeat) for this long is dead.
SILENCE_S = 4 * HEARTBEAT_S


class AllocationSource(Protocol):
    def watch(self, node: str): ...  # -> AsyncContextManager[AsyncIterator[NodeAllocations]]

    async def report(self, batch: ReportBatch) -> None: ...


class ClusterSource:
    """`leader_address()` is where the leader is reachable now, or None when no leader is known."""

    def __init__(
        self, rpc: RpcClient, leader_address: Callable[[], tuple[str, int] | None], timeout: float = 5.0
    ) -> None:
        self.rpc = rpc
        self.leader_address = leader_address
        self.timeout = timeout

    def _leader_address(self) -> tuple[str, int]:
        address = self.leader_address()
        if address is None:
            raise Unavailable("no known leader to watch allocations from")
        return address

    @asynccontextmanager
    async def watch(self, node: str) -> AsyncIterator[AsyncIterator[NodeAllocations]]:
        address = self._leader_address()
        async with self.rpc.stream(address, "allocations.watch", WatchAllocations(node), item=NodeAllocations) as items:
            yield _with_silence_limit(items)

    async def report(self, batch: ReportBatch) -> None:
        await self.rpc.call(
            self._leader_address(), "allocations.report", batch, response=ReportAck, timeout=self.timeout
        )


async def _with_silence_limit(items) -> AsyncIterator[NodeAllocations]:
    iterator = items.__aiter__()
    while True:
        with trio.move_on_after(SILENCE_S) as scope:
            try:
                value = await iterator.__anext__()
            except StopAsyncIteration:
                raise Unavailable("the allocation watch ended") from None
        if scope.cancelled_caught:
            raise Unavailable(f"no word from the leader for {SILENCE_S:g}s")
        yield value


class MemorySource:
    """The cluster side in memory: tests publish sets and read reports.

    `connected = False` makes every watch and report fail as an unreachable
    leader would; setting it back lets the agent reconnect.
    """

    def __init__(self) -> None:
        self.current: dict[str, NodeAllocations] = {}
        self.reports: list[ReportBatch] = []
        self.connected = True
        self._changed = trio.Event()

    def publish(self, allocations: NodeAllocations) -> None:
        self.current[allocations.node] = allocations
        self._poke()

    def disconnect(self) -> None:
        self.connected = False
        self._poke()

    def reconnect(self) -> None:
        self.connected = True
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def latest(self) -> dict[str, object]:
        """allocation id → its last reported AllocationReport."""
        out: dict[str, object] = {}
        for batch in self.reports:
            for r in batch.reports:
                out[r.id] = r
        return out

    @asynccontextmanager
    async def watch(self, node: str) -> AsyncIterator[AsyncIterator[NodeAllocations]]:
        if not self.connected:
            raise Unavailable("memory source: disconnected")

        async def items() -> AsyncIterator[NodeAllocations]:
            sent = None
            while True:
                if not self.connected:
                    raise Unavailable("memory source: disconnected")
                value = self.current.get(node)
                if value is not None and value is not sent:
                    sent = value
                    yield value
                    continue
                await self._changed.wait()

        yield items()

    async def report(self, batch: ReportBatch) -> None:
        if not self.connected:
            raise Unavailable("memory source: disconnected")
        self.reports.append(batch)
