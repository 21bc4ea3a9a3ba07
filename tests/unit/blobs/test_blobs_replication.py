"""Replication, repair, anti-entropy and GC over the memory twins (a cluster of
MemoryChunkStores behind MemoryChunkPeers, one ObjectService as the writer)."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio

from cloudless.blobs.antientropy import (
    gather_holdings,
    plan_repairs,
    referenced_policies,
    repair_until_stable,
    run_round,
    wanted_by_node,
    wanted_placement,
)
from cloudless.blobs.catalog import LocalMetadataStore
from cloudless.blobs.chunkstore import MemoryChunkStore
from cloudless.blobs.errors import InsufficientReplicas, NoSuchKey
from cloudless.blobs.objects import ObjectService
from cloudless.blobs.peers import MemoryChunkPeers
from cloudless.blobs.placement import StorageMember
from tests.harness.waiting import wait_until

GIB = 1 << 30
SMALL_CHUNKS = 16 * 1024


class Cluster:
    def __init__(self, n: int, zones: int = 1, seed: int = 0) -> None:
        self.now = [1000.0]
        self.peers = MemoryChunkPeers()
        self.zones: dict[str, str] = {}
        self.departed: set[str] = set()
        self.declared_dead: set[str] = set()  # what gossip has said; `peers.dead` is what is true
        for i in range(n):
            self.add(f"n{i}", zone=f"z{i % zones}")
        self.metadata = LocalMetadataStore(None)
        self.rng = random.Random(seed)
        self.service = ObjectService(
            self.metadata, self.peers.stores["n0"], self.peers, self.members, node_id="n0", clock=self.clock
        )

    def clock(self) -> float:
        return self.now[0]

    def add(self, node: str, zone: str = "z0") -> None:
        self.peers.add(node, MemoryChunkStore(clock=self.clock))
        self.zones[node] = zone

    def members(self) -> list[StorageMember]:
        return [
            StorageMember(
                n, zone=self.zones[n], capacity_bytes=100 * GIB, free_bytes=100 * GIB, alive=n not in self.declared_dead
            )
            for n in self.peers.stores
            if n not in self.departed
        ]

    def replicas(self, digest: str) -> set[str]:
        return self.peers.holders(digest)

    async def chunks_of(self, bucket: str, key: str) -> list[str]:
        return [c.digest for c in (await self.metadata.get_manifest(bucket, key)).chunks]


@pytest.fixture
async def cluster():
    c = Cluster(4, zones=2)
    await c.service.create_bucket("bkt", avg_chunk=SMALL_CHUNKS)
    return c


async def test_a_put_is_acknowledged_with_r_replicas_on_the_placement_targets(cluster):
    data = cluster.rng.randbytes(400_000)
    await cluster.service.put_object("bkt", "obj", data)
    digests = await cluster.chunks_of("bkt", "obj")
    assert len(digests) > 5
    wanted = wanted_placement(await referenced_policies(cluster.metadata), cluster.members())
    for d in digests:
        assert cluster.replicas(d) == set(wanted[d])
        assert len({cluster.zones[n] for n in cluster.replicas(d)}) == 2  # zone spread
    assert await cluster.service.get_bytes("bkt", "obj") == data


async def test_a_dead_target_is_replaced_by_the_next_candidate(cluster):
    cluster.peers.kill("n1")  # dead but not yet declared: placement still picks it
    data = cluster.rng.randbytes(300_000)
    await cluster.service.put_object("bkt", "obj", data)
    for d in await cluster.chunks_of("bkt", "obj"):
        assert len(cluster.replicas(d)) == 2


async def test_a_put_fails_when_r_replicas_cannot_be_made_durable():
    c = Cluster(2)
    await c.service.create_bucket("bkt", avg_chunk=SMALL_CHUNKS)
    c.peers.kill("n1")
    with pytest.raises(InsufficientReplicas):
        await c.service.put_object("bkt", "obj", b"x" * 100_000)
    with pytest.raises(NoSuchKey):
        await c.service.head_object("bkt", "obj")


async def test_writes_below_min_durable_are_refused():
    """R is capped at the eligible members, but not below `min_durable`."""
    c = Cluster(2)
    c.service.replicator.min_durable = 2
    await c.service.create_bucket("bkt", avg_chunk=SMALL_CHUNKS)
    await c.service.put_object("bkt", "ok", b"y" * 50_000)
    c.peers.kill("n1")
    c.declared_dead.add("n1")
    with pytest.raises(InsufficientReplicas):
        await c.service.put_object("bkt", "obj", b"x" * 50_000)
    c.service.replicator.min_durable = 1
    await c.service.put_object("bkt", "obj", b"x" * 50_000)  # degraded: one copy until n1 returns


async def test_holder_death_then_anti_entropy_restores_r(cluster):
    data = cluster.rng.randbytes(500_000)
    await cluster.service.put_object("bkt", "obj", data)
    digests = await cluster.chunks_of("bkt", "obj")
    victim = "n2"
    lost_on_victim = [d for d in digests if victim in cluster.replicas(d)]
    assert lost_on_victim
    cluster.peers.kill(victim)
    cluster.declared_dead.add(victim)
    assert any(len(cluster.replicas(d)) == 1 for d in digests)
    reports = await repair_until_stable(cluster.metadata, cluster.members(), cluster.peers)
    assert reports[0].copied >= len(lost_on_victim)
    for d in digests:
        assert len(cluster.replicas(d)) == 2
    assert await cluster.service.get_bytes("bkt", "obj") == data


async def test_a_flipped_byte_is_detected_on_read_and_repaired_from_a_replica(cluster):
    data = cluster.rng.randbytes(200_000)
    await cluster.service.put_object("bkt", "obj", data)
    local = cluster.peers.stores["n0"]
    on_local = [d for d in await cluster.chunks_of("bkt", "obj") if local.has([d])]
    assert on_local
    victim = on_local[0]
    local.flip_byte(victim, 17)
    assert await cluster.service.get_bytes("bkt", "obj") == data
    local.get(victim)  # repaired in place: verifies again


async def test_dedup_across_versions_sends_only_changed_chunks(cluster):
    v1 = cluster.rng.randbytes(2_000_000)
    await cluster.service.put_object("bkt", "file", v1)
    before = dict(cluster.peers.bytes_sent)
    v2 = v1[:1_000_000] + b"an edit in the middle" + v1[1_000_000:]
    await cluster.service.put_object("bkt", "file", v2)
    sent = sum(cluster.peers.bytes_sent.get(n, 0) - before.get(n, 0) for n in cluster.peers.stores)
    total_v1 = sum(cluster.peers.bytes_sent.values()) - sent
    assert sent < 0.1 * total_v1, (sent, total_v1)
    assert await cluster.service.get_bytes("bkt", "file") == v2


async def test_a_join_rebalances_and_surplus_copies_are_dropped_after_the_new_ones(cluster):
    data = cluster.rng.randbytes(600_000)
    await cluster.service.put_object("bkt", "obj", data)
    digests = await cluster.chunks_of("bkt", "obj")
    cluster.add("n4", zone="z0")
    cluster.add("n5", zone="z1")
    first = await run_round(cluster.metadata, cluster.members(), cluster.peers)
    assert first.copied > 0 and first.dropped == 0  # copies first, never drop before the new copy exists
    await repair_until_stable(cluster.metadata, cluster.members(), cluster.peers)
    wanted = wanted_placement(await referenced_policies(cluster.metadata), cluster.members())
    for d in digests:
        assert cluster.replicas(d) == set(wanted[d])
    assert any("n4" in wanted[d] or "n5" in wanted[d] for d in digests)


async def test_summaries_limit_listing_to_differing_buckets(cluster):
    for i in range(5):
        await cluster.service.put_object("bkt", f"o{i}", cluster.rng.randbytes(200_000))
    wanted = wanted_placement(await referenced_policies(cluster.metadata), cluster.members())
    nodes = [m.node_id for m in cluster.members()]
    _, listed = await gather_holdings(cluster.peers, nodes, wanted_by_node(wanted))
    assert sum(listed.values()) == 0  # in sync: no node lists anything
    some = next(iter(wanted))
    holder = wanted[some][0]
    cluster.peers.stores[holder].delete(some)
    holdings, listed = await gather_holdings(cluster.peers, nodes, wanted_by_node(wanted))
    assert listed == {n: (1 if n == holder else 0) for n in nodes}
    plan = plan_repairs(wanted, holdings)
    assert [(c.digest, c.target) for c in plan.copies] == [(some, holder)]


async def test_interrupted_upload_leaves_no_object_and_gc_reclaims_its_chunks(cluster):
    """A writer that dies mid-upload (here: its body stream fails) never commits a manifest;
    its chunks are kept through the grace period, then collected on every node."""

    async def dying_body():
        yield cluster.rng.randbytes(300_000)
        yield cluster.rng.randbytes(300_000)
        raise ConnectionResetError("client went away")

    await cluster.service.put_object("bkt", "kept", cluster.rng.randbytes(100_000))
    with pytest.raises(ConnectionResetError):
        await cluster.service.put_object("bkt", "partial", dying_body())
    with pytest.raises(NoSuchKey):
        await cluster.service.head_object("bkt", "partial")
    page = await cluster.service.list_objects("bkt")
    assert [m.key for m in page.objects] == ["kept"]
    kept = set(await cluster.chunks_of("bkt", "kept"))
    orphans = {d for s in cluster.peers.stores.values() for d in s.digests()} - kept
    assert orphans, "the interrupted upload did write chunks"
    referenced = await cluster.metadata.referenced_digests()
    from cloudless.blobs.antientropy import collect_garbage

    for store in cluster.peers.stores.values():
        assert collect_garbage(store, referenced, cluster.service.in_flight, cluster.clock(), grace=60) == []
    cluster.now[0] += 61
    for store in cluster.peers.stores.values():
        collect_garbage(store, referenced, cluster.service.in_flight, cluster.clock(), grace=60)
    left = {d for s in cluster.peers.stores.values() for d in s.digests()}
    assert left == kept
    assert await cluster.service.get_bytes("bkt", "kept")


async def test_gc_never_collects_chunks_of_an_upload_in_flight(cluster):
    """Even past the grace period, chunks pinned by a running put stay."""
    release = trio.Event()
    started = trio.Event()
    first = cluster.rng.randbytes(300_000)

    async def slow_body():
        yield first
        started.set()
        await release.wait()
        yield b"tail"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: cluster.service.put_object("bkt", "slow", slow_body()))
        await started.wait()
        await trio.testing.wait_all_tasks_blocked()
        cluster.now[0] += 10_000
        local = cluster.peers.stores["n0"]
        held_before = set(local.digests())
        assert held_before, "the running upload has written chunks here"
        assert await cluster.service.collect_garbage(grace=60) == []
        release.set()
    assert await cluster.service.get_bytes("bkt", "slow") == first + b"tail"


async def test_a_dedup_hit_restarts_the_grace_period_on_the_holder(cluster):
    """A put that finds its chunk already on a target (so sends nothing) must not lose it to
    that target's GC before the manifest commits: `has` touches the chunk."""
    data = cluster.rng.randbytes(50_000)
    await cluster.service.put_object("bkt", "a", data)
    digests = await cluster.chunks_of("bkt", "a")
    await cluster.service.delete_object("bkt", "a")
    cluster.now[0] += 10_000
    await cluster.service.put_object("bkt", "b", data)  # dedups against the orphaned chunks
    from cloudless.blobs.antientropy import collect_garbage

    for store in cluster.peers.stores.values():
        collect_garbage(store, set(), cluster.service.in_flight, cluster.clock(), grace=60)
    for d in digests:
        assert len(cluster.replicas(d)) == 2


async def test_multipart_parts_are_replicated_and_the_etag_follows_s3():
    c = Cluster(3)
    c.service.min_part_size = 1000
    await c.service.create_bucket("bkt", avg_chunk=SMALL_CHUNKS)
    up = await c.service.create_multipart("bkt", "mp")
    p1 = await c.service.upload_part(up.upload_id, 1, b"a" * 5000)
    p2 = await c.service.upload_part(up.upload_id, 2, b"b" * 10)
    m = await c.service.complete_multipart(up.upload_id, [(1, p1.etag), (2, f'"{p2.etag}"')])
    joined = hashlib.md5(b"a" * 5000).digest() + hashlib.md5(b"b" * 10).digest()
    assert m.etag == hashlib.md5(joined).hexdigest() + "-2"
    assert await c.service.get_bytes("bkt", "mp") == b"a" * 5000 + b"b" * 10


async def test_the_loop_restores_r_within_seconds_of_a_declared_death(cluster, autojump_clock):
    """Re-replication starts when the death is announced (trigger), not at the next interval."""
    from cloudless.blobs.antientropy import AntiEntropyLoop

    data = cluster.rng.randbytes(400_000)
    await cluster.service.put_object("bkt", "obj", data)
    digests = await cluster.chunks_of("bkt", "obj")
    loop = AntiEntropyLoop(cluster.metadata, cluster.members, cluster.peers, interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(loop.run)
        cluster.peers.kill("n3")
        cluster.declared_dead.add("n3")
        assert any(len(cluster.replicas(d)) == 1 for d in digests)
        start = trio.current_time()
        loop.trigger()
        await wait_until(lambda: all(len(cluster.replicas(d)) == 2 for d in digests), interval=0.1)
        assert trio.current_time() - start < 5
        nursery.cancel_scope.cancel()
    assert loop.statistics()["rounds"] >= 1


async def test_copies_fall_back_to_relaying_when_a_target_cannot_pull(cluster):
    from cloudless.blobs.peers import PeerUnavailable

    await cluster.service.put_object("bkt", "obj", cluster.rng.randbytes(300_000))
    digests = await cluster.chunks_of("bkt", "obj")

    async def cannot_pull(source, target, digests):
        raise PeerUnavailable(f"{target} does not pull")

    cluster.peers.replicate = cannot_pull
    cluster.peers.kill("n1")
    cluster.declared_dead.add("n1")
    reports = await repair_until_stable(cluster.metadata, cluster.members(), cluster.peers)
    assert reports[0].copied > 0
    assert all(len(cluster.replicas(d)) == 2 for d in digests)
