"""Seeded churn simulation over the memory twins: objects written while members
join, die and come back, anti-entropy between failures. Invariants after every
repair: every object reads back intact, every referenced chunk has
min(R, live members) replicas, and exactly where placement says.

A failure prints its seed; `CLOUDLESS_LONG=1` runs many more seeds.
"""

from __future__ import annotations

import random

import pytest
import trio

from cloudless.blobs.antientropy import referenced_policies, repair_until_stable, wanted_placement
from cloudless.blobs.catalog import LocalMetadataStore
from cloudless.blobs.chunkstore import MemoryChunkStore
from cloudless.blobs.objects import ObjectService
from cloudless.blobs.peers import MemoryChunkPeers
from cloudless.blobs.placement import StorageMember

GIB = 1 << 30


async def simulate(seed: int, steps: int = 30) -> None:
    rng = random.Random(seed)
    peers = MemoryChunkPeers()
    zones: dict[str, str] = {}
    capacity: dict[str, int] = {}
    down: set[str] = set()
    counter = [0]

    def join() -> str:
        node = f"n{counter[0]}"
        counter[0] += 1
        peers.add(node, MemoryChunkStore())
        zones[node] = rng.choice("abc")
        capacity[node] = rng.choice([50, 100, 200]) * GIB
        return node

    def members() -> list[StorageMember]:
        return [
            StorageMember(n, zone=zones[n], capacity_bytes=capacity[n], free_bytes=capacity[n], alive=n not in down)
            for n in peers.stores
        ]

    for _ in range(4):
        join()
    writer = "n0"  # never dies: it is the node clients talk to
    meta = LocalMetadataStore(None)
    service = ObjectService(meta, peers.stores[writer], peers, members, node_id=writer)
    await service.create_bucket("sim", avg_chunk=8 * 1024, replicas=rng.choice([2, 3]))
    contents: dict[str, bytes] = {}

    for step in range(steps):
        action = rng.choice(["put", "put", "overwrite", "delete", "kill", "revive", "join"])
        live = [n for n in peers.stores if n not in down and n != writer]
        if action == "put" or (action == "overwrite" and not contents):
            key = f"k{step}"
            contents[key] = rng.randbytes(rng.randrange(1, 120_000))
            await service.put_object("sim", key, contents[key])
        elif action == "overwrite":
            key = rng.choice(sorted(contents))
            old = contents[key]
            at = rng.randrange(len(old) + 1)
            contents[key] = old[:at] + rng.randbytes(rng.randrange(1, 5000)) + old[at:]
            await service.put_object("sim", key, contents[key])
        elif action == "delete" and contents:
            key = rng.choice(sorted(contents))
            del contents[key]
            await service.delete_object("sim", key)
        elif action == "kill" and len(live) > 1:
            victim = rng.choice(live)
            peers.kill(victim)
            down.add(victim)  # declared dead by gossip
        elif action == "revive" and down:
            back = rng.choice(sorted(down))
            peers.dead.discard(back)
            down.discard(back)
        elif action == "join":
            join()
        # One failure at a time: repair before the next event can take a second copy away.
        await repair_until_stable(meta, members(), peers, max_rounds=6)
        wanted = wanted_placement(await referenced_policies(meta), members())
        live_count = len([m for m in members() if m.alive])
        bucket = await meta.get_bucket("sim")
        for digest, nodes in wanted.items():
            holders = peers.holders(digest)
            assert len(holders) >= min(bucket.replicas, live_count), (seed, step, digest)
            assert holders == set(nodes), (seed, step, digest, holders, nodes)
        for key, data in contents.items():
            assert await service.get_bytes("sim", key) == data, (seed, step, key)


def run_seed(seed: int, steps: int = 30) -> None:
    try:
        trio.run(simulate, seed, steps)
    except BaseException:
        print(f"blob churn simulation failed: seed={seed} steps={steps}")
        raise


@pytest.mark.parametrize("seed", range(6))
def test_churn_never_loses_an_object_and_converges_to_placement(seed):
    run_seed(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6, 406))
def test_churn_many_seeds(seed):
    run_seed(seed, steps=40)
