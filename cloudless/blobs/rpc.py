"""`ChunkPeers` over the RPC transport, and the chunk service every node serves.

Methods (node identities only; a client certificate is refused):

    chunks.has       HasChunks -> HeldChunks        (touches what it reports: GC grace)
    chunks.put       PutChunk  -> Stored            one chunk per call, re-verified by the receiver
    chunks.get       GetChunk  -> raw bytes         re-verified by the caller too (the peer is not trusted)
    chunks.drop      DropChunks -> Stored
    chunks.summary   SummaryRequest -> InventorySummary
    chunks.list      ListChunks -> HeldChunks       digests under some summary prefixes
    chunks.pull      PullChunks -> Stored           fetch digests from another node, store them
                                                    (anti-entropy copies that do not relay through
                                                    the node that planned them)

A chunk body rides as msgpack bytes in one frame (chunks are at most 8 MiB,
frames 16 MiB). Deadlines scale with size: a floor plus bytes / `min_rate`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Annotated

import msgspec
import trio

from cloudless.blobs.chunking import DigestField
from cloudless.blobs.chunkstore import ChunkStore, InventorySummary
from cloudless.blobs.errors import ChunkMissing, CorruptChunk
from cloudless.blobs.peers import ChunkPeers, PeerUnavailable
from cloudless.errors import CloudlessError, InvalidInput, NotFound, Unavailable
from cloudless.transport.rpc import RpcClient, RpcContext, RpcServer

log = logging.getLogger(__name__)

Address = tuple[str, int]
MAX_DIGESTS = 50_000
MAX_PREFIXES = 256
_Prefix = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{1,4}$")]


class HasChunks(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    digests: Annotated[list[DigestField], msgspec.Meta(max_length=MAX_DIGESTS)]


class HeldChunks(msgspec.Struct, frozen=True):
    digests: list[str]


class PutChunk(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    digest: DigestField
    data: bytes


class GetChunk(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    digest: DigestField


class DropChunks(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    digests: Annotated[list[DigestField], msgspec.Meta(max_length=MAX_DIGESTS)]


class SummaryRequest(msgspec.Struct, frozen=True):
    pass


class ListChunks(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prefixes: Annotated[list[_Prefix], msgspec.Meta(max_length=MAX_PREFIXES)]


class PullChunks(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    source: Annotated[str, msgspec.Meta(max_length=128)]
    digests: Annotated[list[DigestField], msgspec.Meta(max_length=256)]


class Stored(msgspec.Struct, frozen=True):
    count: int


class NotPermitted(CloudlessError):
    code = "not_permitted"


def _require_node(ctx: RpcContext) -> None:
    if ctx.peer.kind != "node":
        raise NotPermitted(f"{ctx.peer.uri} is not a node: chunk methods are node-to-node only")


def register_chunk_service(
    server: RpcServer,
    store: ChunkStore,
    *,
    peers: ChunkPeers | None = None,
    threads: trio.CapacityLimiter | None = None,
) -> None:
    """Serve this node's `store` to its peers on `server`; with `peers`, also `chunks.pull`."""
    limiter = threads or trio.CapacityLimiter(4)

    async def run(fn, *args):  # type: ignore[no-untyped-def]
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter)

    @server.unary("chunks.has", request=HasChunks)
    async def has(ctx: RpcContext, req: HasChunks) -> HeldChunks:
        _require_node(ctx)
        return HeldChunks(sorted(await run(store.touch, req.digests)))

    @server.unary("chunks.put", request=PutChunk)
    async def put(ctx: RpcContext, req: PutChunk) -> Stored:
        _require_node(ctx)
        stored = await run(store.put, req.digest, req.data)  # untrusted: re-hashed
        return Stored(int(stored))

    @server.unary("chunks.get", request=GetChunk)
    async def get(ctx: RpcContext, req: GetChunk) -> bytes:
        _require_node(ctx)
        return await run(store.get, req.digest)

    @server.unary("chunks.drop", request=DropChunks)
    async def drop(ctx: RpcContext, req: DropChunks) -> Stored:
        _require_node(ctx)

        def op() -> int:
            return sum(store.delete(d) for d in req.digests)

        return Stored(await run(op))

    @server.unary("chunks.summary", request=SummaryRequest)
    async def summary(ctx: RpcContext, req: SummaryRequest) -> InventorySummary:
        _require_node(ctx)
        return await run(store.summary)

    @server.unary("chunks.pull", request=PullChunks)
    async def pull(ctx: RpcContext, req: PullChunks) -> Stored:
        _require_node(ctx)
        if peers is None:
            raise Unavailable("this node does not pull chunks from peers")
        stored = 0
        for digest in req.digests:
            if await run(store.touch, [digest]):
                continue
            data = await peers.get(req.source, digest)  # verified by the RpcChunkPeers client
            stored += int(await run(lambda digest=digest, data=data: store.put(digest, data, trusted=True)))
        return Stored(stored)

    @server.unary("chunks.list", request=ListChunks)
    async def listing(ctx: RpcContext, req: ListChunks) -> HeldChunks:
        _require_node(ctx)
        return HeldChunks(await run(lambda: sorted(d for p in req.prefixes for d in store.digests(p))))


class RpcChunkPeers:
    """`ChunkPeers` for a node: `address_of(node_id)` says where a peer's RPC server is."""

    def __init__(
        self,
        client: RpcClient,
        address_of: Callable[[str], Address],
        *,
        timeout: float = 10.0,
        min_rate: float = 1 << 20,
    ) -> None:
        self.client = client
        self.address_of = address_of
        self.timeout = timeout
        self.min_rate = min_rate  # bytes/s below which a transfer is given up

    def _deadline(self, nbytes: int) -> float:
        return self.timeout + nbytes / self.min_rate

    async def _call(self, node: str, method: str, request: object, response: object, nbytes: int = 0):  # type: ignore[no-untyped-def]
        try:
            address = self.address_of(node)
        except KeyError:
            raise PeerUnavailable(f"no address known for node {node}", node=node) from None
        try:
            return await self.client.call(address, method, request, response=response, timeout=self._deadline(nbytes))
        except (ChunkMissing, CorruptChunk, InvalidInput, NotPermitted):
            raise
        except NotFound as exc:
            if exc.code == "chunk_missing":
                raise ChunkMissing(exc.message, node=node) from None
            raise
        except Unavailable as exc:
            raise PeerUnavailable(f"node {node}: {exc.message}", node=node) from None
        except CloudlessError as exc:
            if exc.code == "corrupt_chunk":
                raise CorruptChunk(exc.message, node=node) from None
            raise

    async def has(self, node: str, digests: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(digests), MAX_DIGESTS):
            held = await self._call(node, "chunks.has", HasChunks(list(digests[i : i + MAX_DIGESTS])), HeldChunks)
            out.update(held.digests)
        return out

    async def put(self, node: str, chunks: Sequence[tuple[str, bytes]]) -> None:
        for digest, data in chunks:
            await self._call(node, "chunks.put", PutChunk(digest, bytes(data)), Stored, nbytes=len(data))

    async def get(self, node: str, digest: str) -> bytes:
        data = await self._call(node, "chunks.get", GetChunk(digest), None, nbytes=8 << 20)
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptChunk(f"node {node} served content that does not hash to {digest[:16]}…", node=node)
        return data

    async def drop(self, node: str, digests: Sequence[str]) -> None:
        for i in range(0, len(digests), MAX_DIGESTS):
            await self._call(node, "chunks.drop", DropChunks(list(digests[i : i + MAX_DIGESTS])), Stored)

    async def replicate(self, source: str, target: str, digests: Sequence[str]) -> int:
        stored = await self._call(
            target, "chunks.pull", PullChunks(source, list(digests)), Stored, nbytes=len(digests) * (8 << 20)
        )
        return stored.count

    async def inventory_summary(self, node: str) -> InventorySummary:
        return await self._call(node, "chunks.summary", SummaryRequest(), InventorySummary)

    async def inventory(self, node: str, prefixes: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(prefixes), 16):  # a bucket lists ~1/256 of a node's chunks: keep replies small
            held = await self._call(node, "chunks.list", ListChunks(list(prefixes[i : i + 16])), HeldChunks)
            out.update(held.digests)
        return out
