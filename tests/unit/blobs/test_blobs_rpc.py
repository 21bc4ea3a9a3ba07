"""The chunk service over the real RPC layer on the memory transport twin: the
write path, reads, anti-entropy and failures through `RpcChunkPeers`."""

from __future__ import annotations

import random

import pytest
import trio

from cloudless.blobs.antientropy import repair_until_stable
from cloudless.blobs.catalog import LocalMetadataStore
from cloudless.blobs.chunking import ChunkDigest
from cloudless.blobs.chunkstore import MemoryChunkStore
from cloudless.blobs.errors import ChunkMissing, CorruptChunk
from cloudless.blobs.objects import ObjectService
from cloudless.blobs.peers import PeerUnavailable
from cloudless.blobs.placement import StorageMember
from cloudless.blobs.rpc import RpcChunkPeers, register_chunk_service
from cloudless.errors import CloudlessError
from cloudless.transport.base import PeerIdentity
from cloudless.transport.memory import MemoryCarrier, MemoryNetwork
from cloudless.transport.rpc import RpcClient, RpcServer

GIB = 1 << 30
NODES = ["n0", "n1", "n2", "n3"]


class RpcCluster:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.network = MemoryNetwork()
        self.stores = {n: MemoryChunkStore() for n in NODES}
        self.addresses = {n: (n, 7000) for n in NODES}
        self.nursery = nursery
        self.dead: set[str] = set()
        self.node_clients: list[RpcClient] = []
        carrier = MemoryCarrier(self.network, PeerIdentity("c", "node", "n0", 1), ("n0-client", 1))
        self.client = RpcClient(carrier)
        self.peers = RpcChunkPeers(self.client, self.addresses.__getitem__, timeout=5)
        self.metadata = LocalMetadataStore(None)
        self.service = ObjectService(self.metadata, self.stores["n0"], self.peers, self.members, node_id="n0")

    async def start(self) -> None:
        for n in NODES:
            server = RpcServer()
            own = RpcClient(MemoryCarrier(self.network, PeerIdentity("c", "node", n, 1), (f"{n}-client", 1)))
            self.node_clients.append(own)
            register_chunk_service(server, self.stores[n], peers=RpcChunkPeers(own, self.addresses.__getitem__))
            carrier = MemoryCarrier(self.network, PeerIdentity("c", "node", n, 1), self.addresses[n])
            await self.nursery.start(server.serve, carrier)

    def members(self) -> list[StorageMember]:
        return [
            StorageMember(n, capacity_bytes=100 * GIB, free_bytes=100 * GIB, alive=n not in self.dead) for n in NODES
        ]

    def holders(self, digest: str) -> set[str]:
        return {n for n in NODES if n not in self.dead and self.stores[n].has([digest])}


@pytest.fixture
async def cluster(nursery):
    c = RpcCluster(nursery)
    await c.start()
    await c.service.create_bucket("bkt", avg_chunk=16 * 1024)
    yield c
    await c.client.aclose()
    for client in c.node_clients:
        await client.aclose()


async def test_put_and_get_through_rpc_with_r_replicas(cluster):
    data = random.Random(1).randbytes(300_000)
    m = await cluster.service.put_object("bkt", "obj", data)
    assert all(len(cluster.holders(c.digest)) == 2 for c in m.chunks)
    cluster.stores["n0"]._chunks.clear()  # force every read through a peer
    cluster.stores["n0"]._info.clear()
    assert await cluster.service.get_bytes("bkt", "obj") == data


async def test_unreachable_target_falls_back_and_anti_entropy_restores_r(cluster):
    data = random.Random(2).randbytes(300_000)
    m = await cluster.service.put_object("bkt", "obj", data)
    victim = next(n for n in NODES[1:] if any(n in cluster.holders(c.digest) for c in m.chunks))
    cluster.network.refuse(cluster.addresses[victim])
    cluster.network.disconnect(cluster.addresses[victim])
    more = await cluster.service.put_object("bkt", "more", random.Random(3).randbytes(200_000))
    assert all(len(cluster.holders(c.digest)) == 2 for c in more.chunks)  # fell back past the victim
    cluster.dead.add(victim)

    async def no_relay(node, chunks):
        raise AssertionError("anti-entropy relayed a chunk through the planning node")

    cluster.peers.put = no_relay  # copies must be pulls: target fetches from source directly
    reports = await repair_until_stable(cluster.metadata, cluster.members(), cluster.peers)
    assert reports[0].copied > 0 and sum(r.failed for r in reports) == 0
    assert all(len(cluster.holders(c.digest)) == 2 for c in m.chunks)
    with pytest.raises(PeerUnavailable):
        await cluster.peers.has(victim, [m.chunks[0].digest])


async def test_remote_errors_keep_their_meaning(cluster):
    with pytest.raises(ChunkMissing):
        await cluster.peers.get("n1", "0" * 64)
    with pytest.raises(CloudlessError):
        await cluster.peers.put("n1", [("0" * 64, b"not that")])  # receiver re-hashes
    data = b"x" * 1000
    d = ChunkDigest.of(data)
    cluster.stores["n2"].put(d, data)
    cluster.stores["n2"].flip_byte(d)
    with pytest.raises(CorruptChunk):
        await cluster.peers.get("n2", d)
    with pytest.raises(PeerUnavailable):
        await cluster.peers.has("nowhere", [d])


async def test_clients_may_not_call_chunk_methods(cluster):
    carrier = MemoryCarrier(cluster.network, PeerIdentity("c", "client", "alice", 9), ("alice", 1))
    client = RpcClient(carrier)
    try:
        with pytest.raises(CloudlessError) as e:
            await client.call(cluster.addresses["n1"], "chunks.summary", b"\x80", timeout=5)
        assert e.value.code == "not_permitted"
    finally:
        await client.aclose()
