"""Anti-entropy: compare what nodes hold with what placement says, and repair.

The planner is pure: `wanted` (digest → nodes placement chose) and what each
live node holds in, repair actions out. Holdings are learnt cheaply: each
node's inventory summary (count and XOR per digest-prefix bucket) is compared
with the summary of what it should hold, and only differing buckets are listed
(`gather_holdings`). Drops of surplus copies are planned only for digests whose
every wanted holder already has it, so a copy is never removed before its
replacement is durable (the next round sees the new copy and plans the drop).

GC is separate and local: a chunk no manifest or open upload references is
deleted only when it is older than the grace period and no in-flight upload
has pinned it, so it never races a write whose manifest has not committed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

import msgspec
import trio

from cloudless.blobs.chunkstore import ChunkStore, summarize
from cloudless.blobs.errors import ChunkMissing, CorruptChunk
from cloudless.blobs.manifest import Bucket, MetadataStore
from cloudless.blobs.peers import ChunkPeers, PeerUnavailable
from cloudless.blobs.placement import PlacementPolicy, StorageMember, place
from cloudless.blobs.replication import InFlightChunks

log = logging.getLogger(__name__)

DEFAULT_GC_GRACE = 3600.0
PULL_BATCH = 16  # digests per pull request: enough to stream, small enough to retry


class CopyChunk(msgspec.Struct, frozen=True):
    digest: str
    source: str
    target: str


class DropChunk(msgspec.Struct, frozen=True):
    digest: str
    node: str


class RepairPlan(msgspec.Struct, frozen=True):
    copies: list[CopyChunk]
    drops: list[DropChunk]
    lost: list[str]  # referenced digests no live node holds

    @property
    def empty(self) -> bool:
        return not self.copies and not self.drops


def policy_of(bucket: Bucket) -> PlacementPolicy:
    return PlacementPolicy(
        replicas=bucket.replicas, allow_battery=bucket.allow_battery, allow_metered=bucket.allow_metered
    )


def wanted_placement(
    referenced: Mapping[str, PlacementPolicy], members: Sequence[StorageMember]
) -> dict[str, list[str]]:
    return {d: place(d, members, policy) for d, policy in referenced.items()}


def wanted_by_node(wanted: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for digest, nodes in wanted.items():
        for n in nodes:
            out.setdefault(n, set()).add(digest)
    return out


def plan_repairs(wanted: Mapping[str, Sequence[str]], holdings: Mapping[str, set[str]]) -> RepairPlan:
    """`holdings` has one entry per live node. Sources rotate among holders to spread the copy load."""
    copies: list[CopyChunk] = []
    drops: list[DropChunk] = []
    lost: list[str] = []
    load: dict[str, int] = {}
    for digest in sorted(wanted):
        targets = [n for n in wanted[digest] if n in holdings]
        holders = sorted(n for n, held in holdings.items() if digest in held)
        if not holders:
            lost.append(digest)
            continue
        missing = [t for t in targets if digest not in holdings[t]]
        for target in missing:
            source = min(holders, key=lambda n: (load.get(n, 0), n))
            load[source] = load.get(source, 0) + 1
            copies.append(CopyChunk(digest, source, target))
        if not missing and targets:
            drops.extend(DropChunk(digest, n) for n in holders if n not in targets)
    return RepairPlan(copies, drops, lost)


async def gather_holdings(
    peers: ChunkPeers, nodes: Sequence[str], wanted_nodes: Mapping[str, set[str]]
) -> tuple[dict[str, set[str]], dict[str, int]]:
    """What each reachable node holds, as far as repair cares; and how many buckets were listed per node.

    In buckets whose summary matches, a node holds exactly what it should.
    """
    holdings: dict[str, set[str]] = {}
    listed: dict[str, int] = {}

    async def one(node: str) -> None:
        expected = wanted_nodes.get(node, set())
        try:
            summary = await peers.inventory_summary(node)
            differing = summary.differing(summarize(expected))
            extra = await peers.inventory(node, differing) if differing else set()
        except PeerUnavailable:
            return
        differing_set = set(differing)
        same = {d for d in expected if d[: _prefix_len(differing)] not in differing_set} if differing else expected
        holdings[node] = set(same) | extra
        listed[node] = len(differing)

    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(one, node)
    return holdings, listed


def _prefix_len(prefixes: Sequence[str]) -> int:
    return len(prefixes[0])


class RoundReport(msgspec.Struct):
    copied: int = 0
    dropped: int = 0
    failed: int = 0
    lost: list[str] = []
    buckets_listed: int = 0


async def execute(plan: RepairPlan, peers: ChunkPeers, concurrency: int = 8) -> RoundReport:
    report = RoundReport(lost=list(plan.lost))
    limiter = trio.CapacityLimiter(concurrency)

    async def relay(action: CopyChunk) -> None:
        """Through this node: for peers that cannot pull (and when a pull failed)."""
        try:
            data = await peers.get(action.source, action.digest)
            await peers.put(action.target, [(action.digest, data)])
            report.copied += 1
        except (PeerUnavailable, ChunkMissing, CorruptChunk) as exc:
            report.failed += 1
            log.warning("antientropy.copy_failed", extra={"action": msgspec.to_builtins(action), "error": str(exc)})

    async def copy_batch(source: str, target: str, digests: list[str]) -> None:
        async with limiter:
            try:
                # The target pulls straight from the source: the data crosses the network once.
                stored = await peers.replicate(source, target, digests)
                report.copied += stored  # not `+= await`: that reads the counter before awaiting
                return
            except (PeerUnavailable, ChunkMissing, CorruptChunk) as exc:
                log.info("antientropy.pull_failed", extra={"source": source, "target": target, "error": str(exc)})
            for digest in digests:
                await relay(CopyChunk(digest, source, target))

    batches: dict[tuple[str, str], list[str]] = {}
    for action in plan.copies:
        batches.setdefault((action.source, action.target), []).append(action.digest)
    async with trio.open_nursery() as nursery:
        for (source, target), digests in batches.items():
            for i in range(0, len(digests), PULL_BATCH):
                nursery.start_soon(copy_batch, source, target, digests[i : i + PULL_BATCH])
    by_node: dict[str, list[str]] = {}
    for drop in plan.drops:
        by_node.setdefault(drop.node, []).append(drop.digest)
    for node, digests in by_node.items():
        try:
            await peers.drop(node, digests)
            report.dropped += len(digests)
        except PeerUnavailable:
            report.failed += len(digests)
    return report


async def referenced_policies(metadata: MetadataStore) -> dict[str, PlacementPolicy]:
    """Every referenced digest with the strictest policy among the buckets that use it."""
    out: dict[str, PlacementPolicy] = {}

    def note(digest: str, policy: PlacementPolicy) -> None:
        cur = out.get(digest)
        if cur is None or policy.replicas > cur.replicas:
            out[digest] = policy

    for bucket in await metadata.list_buckets():
        policy = policy_of(bucket)
        marker = ""
        while True:
            page = await metadata.list_manifests(bucket.name, marker=marker, max_keys=1000)
            for m in page.objects:
                for c in m.chunks:
                    note(c.digest, policy)
            if not page.truncated or page.next_marker is None:
                break
            marker = page.next_marker
        for upload in await metadata.list_uploads(bucket.name):
            for part in await metadata.list_parts(upload.upload_id):
                for c in part.chunks:
                    note(c.digest, policy)
    return out


async def run_round(
    metadata: MetadataStore,
    members: Sequence[StorageMember],
    peers: ChunkPeers,
    *,
    concurrency: int = 8,
) -> RoundReport:
    """One anti-entropy round over the whole cluster (run by one node, e.g. the leader)."""
    referenced = await referenced_policies(metadata)
    wanted = wanted_placement(referenced, members)
    live = [m.node_id for m in members if m.alive]
    holdings, listed = await gather_holdings(peers, live, wanted_by_node(wanted))
    plan = plan_repairs(wanted, holdings)
    report = await execute(plan, peers, concurrency)
    report.buckets_listed = sum(listed.values())
    if plan.copies or plan.drops or plan.lost:
        log.info(
            "antientropy.round",
            extra={"copied": report.copied, "dropped": report.dropped, "failed": report.failed, "lost": len(plan.lost)},
        )
    return report


async def repair_until_stable(
    metadata: MetadataStore, members: Sequence[StorageMember], peers: ChunkPeers, max_rounds: int = 5
) -> list[RoundReport]:
    """Rounds until one changes nothing (copies first, drops the round after)."""
    reports = []
    for _ in range(max_rounds):
        report = await run_round(metadata, members, peers)
        reports.append(report)
        if report.copied == 0 and report.dropped == 0:
            break
    return reports


def collect_garbage(
    store: ChunkStore,
    referenced: set[str],
    in_flight: InFlightChunks,
    now: float,
    grace: float = DEFAULT_GC_GRACE,
    is_pinned: Callable[[str], bool] | None = None,
) -> list[str]:
    """Delete unreferenced chunks older than `grace` that no upload has pinned. Blocking."""
    deleted = []
    for digest in list(store.digests()):
        if digest in referenced or digest in in_flight or (is_pinned is not None and is_pinned(digest)):
            continue
        info = store.info(digest)
        if info is None or now - info.created < grace:
            continue
        # Conditional on age again, atomically: a write that dedups against this chunk touches
        # it (restarting grace) between our check above and the delete.
        if store.delete(digest, older_than=now - grace):
            deleted.append(digest)
    if deleted:
        log.info("gc.deleted", extra={"count": len(deleted)})
    return deleted


class AntiEntropyLoop:
    """Anti-entropy as a service: a round every `interval` seconds, and one at once on
    `trigger()` (a member declared dead or joined), repeated while rounds still copy or
    drop (copies land in one round, the surplus they leave is dropped in the next).

    Run it on one node (the Raft leader): rounds are cluster-wide.
    """

    def __init__(
        self,
        metadata: MetadataStore,
        members: Callable[[], Sequence[StorageMember]],
        peers: ChunkPeers,
        *,
        interval: float = 30.0,
        round_timeout: float = 600.0,
        concurrency: int = 8,
    ) -> None:
        self.metadata = metadata
        self.members = members
        self.peers = peers
        self.interval = interval
        self.round_timeout = round_timeout
        self.concurrency = concurrency
        self._wake = trio.Event()
        self.rounds = 0
        self.failed_rounds = 0
        self.last_report: RoundReport | None = None

    def trigger(self) -> None:
        self._wake.set()

    def statistics(self) -> dict[str, int]:
        last = self.last_report
        return {
            "rounds": self.rounds,
            "failed_rounds": self.failed_rounds,
            "last_copied": last.copied if last else 0,
            "last_dropped": last.dropped if last else 0,
            "last_lost": len(last.lost) if last else 0,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        again = False
        while True:
            if not again:
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
            self._wake = trio.Event()
            again = False
            with trio.move_on_after(self.round_timeout) as scope:
                try:
                    report = await run_round(self.metadata, self.members(), self.peers, concurrency=self.concurrency)
                except Exception as exc:  # a round fails as a whole (metadata unavailable...); the next one retries
                    self.failed_rounds += 1
                    log.warning("antientropy.round_failed", extra={"error": repr(exc)})
                    continue
                self.rounds += 1
                self.last_report = report
                again = report.copied > 0 or report.dropped > 0
            if scope.cancelled_caught:
                self.failed_rounds += 1
                log.warning("antientropy.round_timeout", extra={"timeout": self.round_timeout})


class GarbageCollectionLoop:
    """Local GC every `interval` seconds (each node runs its own)."""

    def __init__(
        self,
        collect: Callable[[float], Awaitable[list[str]]],
        *,
        interval: float = 600.0,
        grace: float = DEFAULT_GC_GRACE,
    ) -> None:
        self.collect = collect  # e.g. ObjectService.collect_garbage
        self.interval = interval
        self.grace = grace
        self.collected = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            try:
                deleted = await self.collect(self.grace)
            except Exception as exc:
                log.warning("gc.failed", extra={"error": repr(exc)})
                continue
            self.collected += len(deleted)
