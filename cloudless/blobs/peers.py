"""Talking to other nodes' chunk stores: the `ChunkPeers` interface and its
memory twin. The node implements it over the RPC transport (bulk chunk bodies
on the fastest authenticated carrier); everything above it — replication,
repair, anti-entropy — is written against this interface only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

import trio

from cloudless.blobs.chunkstore import ChunkStore, InventorySummary
from cloudless.errors import Unavailable

_T = TypeVar("_T")


class PeerUnavailable(Unavailable):
    code = "peer_unavailable"


class ChunkPeers(Protocol):
    """Every call may raise `PeerUnavailable`; each has a deadline inside the implementation."""

    async def has(self, node: str, digests: Sequence[str]) -> set[str]:
        """The held subset; holding counts as an access (`ChunkStore.touch`), restarting GC grace."""
        ...

    async def put(self, node: str, chunks: Sequence[tuple[str, bytes]]) -> None:
        """Returns once every chunk is durable on `node` (it re-verifies each digest)."""
        ...

    async def get(self, node: str, digest: str) -> bytes:
        """The verified content, or `ChunkMissing` / `CorruptChunk` from the holder."""
        ...

    async def drop(self, node: str, digests: Sequence[str]) -> None: ...

    async def replicate(self, source: str, target: str, digests: Sequence[str]) -> int:
        """Have `target` fetch `digests` from `source` itself (verified, durable before return);
        returns how many it now holds that it did not. PeerUnavailable if either side cannot."""
        ...

    async def inventory_summary(self, node: str) -> InventorySummary: ...

    async def inventory(self, node: str, prefixes: Sequence[str]) -> set[str]:
        """Digests `node` holds under the given summary-bucket prefixes (the drill-down)."""
        ...


class MemoryChunkPeers:
    """`ChunkPeers` over in-process stores, with dead nodes and byte counters.

    Store calls run in worker threads as the real node's handlers would, so a
    `LocalChunkStore` works here as well as a `MemoryChunkStore`.
    """

    def __init__(self, stores: dict[str, ChunkStore] | None = None, *, threaded: bool = False) -> None:
        self.stores: dict[str, ChunkStore] = dict(stores or {})
        self.dead: set[str] = set()
        self.bytes_sent: dict[str, int] = {}
        self.chunks_sent: dict[str, int] = {}
        self.pulls = 0  # replicate() calls: peer-to-peer copies that bypass the caller
        self._threaded = threaded

    def add(self, node: str, store: ChunkStore) -> None:
        self.stores[node] = store

    def kill(self, node: str) -> None:
        self.dead.add(node)

    def _store(self, node: str) -> ChunkStore:
        if node in self.dead or node not in self.stores:
            raise PeerUnavailable(f"node {node} is unreachable", node=node)
        return self.stores[node]

    async def _call(self, fn: Callable[[], _T]) -> _T:
        if self._threaded:
            return await trio.to_thread.run_sync(fn)
        await trio.lowlevel.checkpoint()
        return fn()

    async def has(self, node: str, digests: Sequence[str]) -> set[str]:
        store = self._store(node)
        return await self._call(lambda: store.touch(digests))

    async def put(self, node: str, chunks: Sequence[tuple[str, bytes]]) -> None:
        store = self._store(node)
        self.bytes_sent[node] = self.bytes_sent.get(node, 0) + sum(len(d) for _, d in chunks)
        self.chunks_sent[node] = self.chunks_sent.get(node, 0) + len(chunks)

        def op() -> None:
            for digest, data in chunks:
                store.put(digest, data)

        await self._call(op)

    async def get(self, node: str, digest: str) -> bytes:
        store = self._store(node)
        return await self._call(lambda: store.get(digest))

    async def drop(self, node: str, digests: Sequence[str]) -> None:
        store = self._store(node)

        def op() -> None:
            for d in digests:
                store.delete(d)

        await self._call(op)

    async def replicate(self, source: str, target: str, digests: Sequence[str]) -> int:
        src, dst = self._store(source), self._store(target)
        self.pulls += 1

        def op() -> int:
            return sum(dst.put(d, src.get(d)) for d in digests)

        return await self._call(op)

    async def inventory_summary(self, node: str) -> InventorySummary:
        store = self._store(node)
        return await self._call(store.summary)

    async def inventory(self, node: str, prefixes: Sequence[str]) -> set[str]:
        store = self._store(node)
        return await self._call(lambda: {d for p in prefixes for d in store.digests(p)})

    def holders(self, digest: str, among: Iterable[str] | None = None) -> set[str]:
        """Test helper: live nodes that hold `digest`."""
        nodes = self.stores if among is None else among
        return {n for n in nodes if n not in self.dead and self.stores[n].has([digest])}
