"""The write path's replication and the read path's repair.

A chunk write is acknowledged once `R` replicas are durable, `R` being the
bucket's replica count capped at the number of eligible members (a one-node
cluster keeps one copy; anti-entropy adds the rest as members join) but never
below `min_durable` (a cluster that wants no single-copy writes sets 2). Targets
come from placement; a target that fails is replaced by the next candidate in
the rendezvous ranking. Before a chunk body crosses the network the target is
asked whether it already `has` it: dedup on the wire, not only on disk.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import trio

from cloudless.blobs.chunkstore import ChunkStore
from cloudless.blobs.errors import ChunkMissing, CorruptChunk, InsufficientReplicas, single_error
from cloudless.blobs.peers import ChunkPeers, PeerUnavailable
from cloudless.blobs.placement import PlacementPolicy, StorageMember, candidates, eligible

log = logging.getLogger(__name__)


class InFlightChunks:
    """Digests that uploads in progress have written but no manifest references yet.

    GC keeps them whatever their age; the grace period covers uploads running
    on other nodes (whose registries this node cannot see).
    """

    def __init__(self) -> None:
        self._pins: Counter[str] = Counter()

    @contextmanager
    def pinned(self) -> Iterator[UploadPins]:
        """Pins for one upload, all released on exit (after its manifest or part record is stored)."""
        pins = UploadPins(self._pins)
        try:
            yield pins
        finally:
            pins.release()

    def __contains__(self, digest: object) -> bool:
        return digest in self._pins

    def __len__(self) -> int:
        return len(self._pins)


class UploadPins:
    """The digests one upload has pinned in an `InFlightChunks` registry."""

    def __init__(self, counts: Counter[str]) -> None:
        self._counts = counts
        self.digests: set[str] = set()

    def add(self, digest: str) -> None:
        if digest not in self.digests:
            self.digests.add(digest)
            self._counts[digest] += 1

    def release(self) -> None:
        for d in self.digests:
            self._counts[d] -= 1
            if self._counts[d] <= 0:
                del self._counts[d]
        self.digests = set()


class Replicator:
    """Writes chunks to their placement targets (this node's store directly, others via `ChunkPeers`)."""

    def __init__(
        self,
        node_id: str,
        local: ChunkStore,
        peers: ChunkPeers | None,
        members: Callable[[], Sequence[StorageMember]],
        *,
        local_threads: trio.CapacityLimiter | None = None,
        min_durable: int = 1,
    ) -> None:
        self.node_id = node_id
        # R is capped at the eligible members (a cluster smaller than R still takes writes,
        # anti-entropy adds copies as members join); never below this many copies, though.
        self.min_durable = min_durable
        self.local = local
        self.peers = peers
        self.members = members
        self._threads = local_threads or trio.CapacityLimiter(4)

    async def _has(self, node: str, digests: Sequence[str]) -> set[str]:
        if node == self.node_id:
            return await trio.to_thread.run_sync(self.local.touch, digests, limiter=self._threads)
        assert self.peers is not None
        return await self.peers.has(node, digests)

    async def _put(self, node: str, digest: str, data: bytes | memoryview) -> None:
        if node == self.node_id:
            await trio.to_thread.run_sync(lambda: self.local.put(digest, data, trusted=True), limiter=self._threads)
            return
        if self.peers is None:
            raise PeerUnavailable(f"no transport to reach {node}", node=node)
        await self.peers.put(node, [(digest, bytes(data))])

    async def write(self, digest: str, data: bytes | memoryview, policy: PlacementPolicy) -> list[str]:
        """Make `digest` durable on its targets; returns the nodes that hold it.

        Raises `InsufficientReplicas` if fewer than min(R, eligible) nodes could take it.
        """
        members = self.members()
        order = candidates(digest, members, policy)
        if self.peers is None:
            order = [n for n in order if n == self.node_id]
        want = min(policy.replicas, len(order))
        floor = min(self.min_durable, policy.replicas)
        if want == 0 or want < floor:
            _, rejected = eligible(members, policy)
            raise InsufficientReplicas(
                f"{len(order)} storage members can take new chunks; {max(floor, 1)} needed",
                reasons="; ".join(f"{r.node_id}: {r.reason}" for r in rejected) or "none rejected",
            )
        durable: list[str] = []
        failures: list[str] = []
        next_candidate = 0
        while len(durable) < want and next_candidate < len(order):
            batch = order[next_candidate : next_candidate + (want - len(durable))]
            next_candidate += len(batch)

            async def one(node: str) -> None:
                try:
                    if not await self._has(node, [digest]):
                        await self._put(node, digest, data)
                    durable.append(node)
                except PeerUnavailable as exc:
                    failures.append(f"{node}: {exc.message}")

            try:
                async with trio.open_nursery() as nursery:
                    for node in batch:
                        nursery.start_soon(one, node)
            except BaseExceptionGroup as group:
                raise single_error(group) from None
        if len(durable) < want:
            raise InsufficientReplicas(
                f"chunk {digest[:16]}… reached {len(durable)} of {want} replicas",
                failures="; ".join(failures),
            )
        if failures:
            log.info("replication.fallback", extra={"digest": digest, "failures": failures, "holders": durable})
        return durable

    async def read(self, digest: str, policy: PlacementPolicy) -> bytes:
        """The chunk's verified content: local copy first, else a peer; a corrupt
        local copy is replaced by the peer's (read repair)."""
        corrupt = False
        if self.local.has([digest]):
            try:
                return await trio.to_thread.run_sync(self.local.get, digest, limiter=self._threads)
            except CorruptChunk:
                corrupt = True
                log.warning("chunk.corrupt", extra={"digest": digest, "node": self.node_id})
            except ChunkMissing:
                pass
        holders = [n for n in candidates(digest, self.members(), _any_member(policy)) if n != self.node_id]
        if self.peers is None or not holders:
            if corrupt:
                raise CorruptChunk(f"chunk {digest[:16]}… is corrupt here and no peer can replace it", digest=digest)
            raise ChunkMissing(f"chunk {digest[:16]}… is on no reachable node", digest=digest)
        data = await fetch_from_peers(self.peers, digest, holders)
        if corrupt:
            await trio.to_thread.run_sync(self._replace_local, digest, data, limiter=self._threads)
        return data

    def _replace_local(self, digest: str, data: bytes) -> None:
        self.local.delete(digest)
        self.local.put(digest, data)


def _any_member(policy: PlacementPolicy) -> PlacementPolicy:
    """For reads every live member is a possible holder, whatever its power or free space."""
    return PlacementPolicy(replicas=policy.replicas, min_free_bytes=0, allow_battery=True, allow_metered=True)


async def fetch_from_peers(peers: ChunkPeers, digest: str, holders: Iterable[str]) -> bytes:
    errors: list[str] = []
    for node in holders:
        try:
            return await peers.get(node, digest)
        except (PeerUnavailable, ChunkMissing, CorruptChunk) as exc:
            errors.append(f"{node}: {exc.message}")
    raise ChunkMissing(f"no holder could serve chunk {digest[:16]}…", digest=digest, tried="; ".join(errors))


async def repair_chunk(store: ChunkStore, digest: str, peers: ChunkPeers, holders: Iterable[str]) -> bytes:
    """Replace this node's copy of `digest` (corrupt or missing) with a verified one from a holder."""
    data = await fetch_from_peers(peers, digest, holders)

    def replace() -> None:
        store.delete(digest)
        store.put(digest, data)

    await trio.to_thread.run_sync(replace)
    log.info("chunk.repaired", extra={"digest": digest})
    return data
