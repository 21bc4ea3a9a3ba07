"""The trio Raft driver: three drivers over an in-memory network under MockClock, and over RocksDB."""

from __future__ import annotations

import random
import time

import pytest
import trio

from cloudless.raft.core import NotLeader, RaftConfig, RaftNode, Role
from cloudless.raft.driver import DriverStopped, RaftDriver
from cloudless.raft.messages import Entry, EntryKind
from cloudless.raft.rocks import RocksStorage
from cloudless.raft.storage import MemoryStorage, bootstrap_log

IDS = ("n1", "n2", "n3")


class SlowSyncStorage(MemoryStorage):
    """Counts syncs; each takes real time in its worker thread, like an fsync."""

    def __init__(self, sync_seconds: float = 0.0) -> None:
        super().__init__()
        self.syncs = 0
        self.sync_seconds = sync_seconds

    def sync(self) -> None:
        self.syncs += 1
        if self.sync_seconds:
            time.sleep(self.sync_seconds)


class Cluster:
    def __init__(
        self,
        storages: dict,
        *,
        async_send: bool = False,
        tick: float = 0.05,
        seed: int = 1,
        sync_in_thread: bool = True,
    ) -> None:
        # Under MockClock, worker threads let virtual time race ahead while
        # they run (the autojump sees an idle run loop), so those tests sync inline.
        self.sync_in_thread = sync_in_thread
        self.events: list | None = None
        self.storages = storages
        self.async_send = async_send
        self.tick = tick
        self.seed = seed
        self.drivers: dict[str, RaftDriver] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.fsm: dict[str, list[bytes]] = {}

    def _sender(self, frm: str):
        def deliver(message) -> None:
            peer = self.drivers.get(message.to)
            if peer is not None and message.to in self.scopes:
                peer.deliver(message)

        async def deliver_later(message) -> None:
            await trio.sleep(0.001)
            deliver(message)

        return deliver_later if self.async_send else deliver

    async def start(self, nursery: trio.Nursery, node_id: str) -> RaftDriver:
        storage = self.storages[node_id]
        node = RaftNode(
            RaftConfig(id=node_id, election_tick=10, heartbeat_tick=1), storage, random.Random(f"{self.seed}-{node_id}")
        )
        applied = self.fsm[node_id] = []

        async def apply(entries: list[Entry]) -> None:
            applied.extend(e.data for e in entries if e.kind == EntryKind.NORMAL and e.data)
            if self.events is not None:
                self.events.extend(("apply", node_id, e.index, e.term) for e in entries)

        driver = RaftDriver(
            node, storage, self._sender(node_id), apply, tick_interval=self.tick, sync_in_thread=self.sync_in_thread
        )
        self.drivers[node_id] = driver

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self.scopes[node_id] = scope
                await driver.run(task_status=task_status)

        await nursery.start(run)
        return driver

    def stop(self, node_id: str) -> None:
        self.scopes.pop(node_id).cancel()

    async def leader(self, timeout: float = 10.0) -> RaftDriver:
        with trio.fail_after(timeout):
            while True:
                leaders = [d for n, d in self.drivers.items() if n in self.scopes and d.node.role is Role.LEADER]
                terms = {d.node.term for d in leaders}
                if len(leaders) == 1 or (leaders and len(terms) == len(leaders)):
                    return max(leaders, key=lambda d: d.node.term)
                await trio.sleep(self.tick)


def memory_cluster(sync_in_thread: bool = False, **kwargs) -> Cluster:
    storages = {}
    for node_id in IDS:
        storages[node_id] = SlowSyncStorage()
        bootstrap_log(storages[node_id], IDS)
    return Cluster(storages, sync_in_thread=sync_in_thread, **kwargs)


async def test_three_drivers_elect_a_leader_and_a_proposal_resolves_when_applied(autojump_clock):
    cluster = memory_cluster()
    async with trio.open_nursery() as nursery:
        for node_id in IDS:
            await cluster.start(nursery, node_id)
        leader = await cluster.leader()
        index = await leader.propose(b"x=1")
        assert leader.applied >= index and cluster.fsm[leader.node.id] == [b"x=1"]
        with trio.fail_after(5):
            for driver in cluster.drivers.values():
                await driver.wait_applied(index)
        assert all(fsm == [b"x=1"] for fsm in cluster.fsm.values())
        nursery.cancel_scope.cancel()


async def test_proposal_on_a_follower_raises_not_leader_naming_the_leader(autojump_clock):
    cluster = memory_cluster()
    async with trio.open_nursery() as nursery:
        for node_id in IDS:
            await cluster.start(nursery, node_id)
        leader = await cluster.leader()
        await leader.propose(b"warm")  # followers learn the leader from its appends
        follower = next(d for d in cluster.drivers.values() if d is not leader)
        with pytest.raises(NotLeader) as exc:
            await follower.propose(b"nope")
        assert exc.value.leader == leader.node.id
        nursery.cancel_scope.cancel()


async def test_read_index_on_a_follower_waits_for_the_write_to_be_applied_there(autojump_clock):
    # Raft thesis §6.4: the read point is the leader's commit index, served once applied locally.
    cluster = memory_cluster(async_send=True)
    async with trio.open_nursery() as nursery:
        for node_id in IDS:
            await cluster.start(nursery, node_id)
        leader = await cluster.leader()
        index = await leader.propose(b"k=v")
        for driver in cluster.drivers.values():
            read_at = await driver.read_index()
            assert read_at >= index and driver.applied >= index
            assert b"k=v" in cluster.fsm[driver.node.id]
        nursery.cancel_scope.cancel()


async def test_concurrent_proposals_share_syncs():
    # Real clock: the syncs take real time in worker threads, which a MockClock would skip past.
    cluster = memory_cluster(tick=0.1, sync_in_thread=True)
    for storage in cluster.storages.values():
        storage.sync_seconds = 0.002
    async with trio.open_nursery() as nursery:
        for node_id in IDS:
            await cluster.start(nursery, node_id)
        leader = await cluster.leader()
        storage = cluster.storages[leader.node.id]
        before = storage.syncs
        results = []

        async def one(i: int) -> None:
            results.append(await leader.propose(b"p%d" % i))

        async with trio.open_nursery() as clients:
            for i in range(200):
                clients.start_soon(one, i)
        assert sorted(results) == list(range(min(results), min(results) + 200))
        syncs = storage.syncs - before
        print(f"leader syncs for 200 concurrent proposals: {syncs}")
        assert syncs < 40, syncs  # group commit: many proposals per fsync
        nursery.cancel_scope.cancel()


async def test_after_the_leader_stops_the_others_elect_a_new_one(autojump_clock):
    cluster = memory_cluster()
    async with trio.open_nursery() as nursery:
        for node_id in IDS:
            await cluster.start(nursery, node_id)
        old = await cluster.leader()
        await old.propose(b"before")
        cluster.stop(old.node.id)
        new = await cluster.leader()
        assert new is not old and new.node.term > old.node.term
        index = await new.propose(b"after")
        with trio.fail_after(5):
            for node_id, driver in cluster.drivers.items():
                if driver is not old:
                    await driver.wait_applied(index)
                    assert cluster.fsm[node_id] == [b"before", b"after"]
        nursery.cancel_scope.cancel()


async def test_proposal_on_a_node_without_quorum_is_refused(autojump_clock):
    storage = MemoryStorage()
    bootstrap_log(storage, ["solo", "absent"])  # can never win an election alone
    node = RaftNode(RaftConfig(id="solo"), storage, random.Random(3))

    async def apply(entries):
        pass

    driver = RaftDriver(node, storage, lambda m: None, apply, sync_in_thread=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await trio.sleep(5)
        with pytest.raises(NotLeader):
            await driver.propose(b"x", timeout=1)
        nursery.cancel_scope.cancel()


async def test_waiting_proposal_fails_when_the_driver_stops(autojump_clock):
    cluster = memory_cluster()
    async with trio.open_nursery() as nursery:
        for node_id in IDS:
            await cluster.start(nursery, node_id)
        leader = await cluster.leader()
        for node_id in IDS:
            if node_id != leader.node.id:
                cluster.stop(node_id)
        outcome = []

        async def propose() -> None:
            try:
                await leader.propose(b"stranded", timeout=60)
            except DriverStopped as exc:
                outcome.append(exc)

        nursery.start_soon(propose)
        await trio.sleep(0.2)
        cluster.stop(leader.node.id)
        await trio.sleep(0.1)
        assert len(outcome) == 1
        nursery.cancel_scope.cancel()


async def test_drivers_over_rocksdb_survive_a_full_restart(tmp_path):
    storages = {}
    for node_id in IDS:
        storages[node_id] = RocksStorage(tmp_path / node_id)
        bootstrap_log(storages[node_id], IDS)
    cluster = Cluster(storages, tick=0.05)
    async with trio.open_nursery() as nursery:
        for node_id in IDS:
            await cluster.start(nursery, node_id)
        leader = await cluster.leader()
        indexes = []
        for i in range(20):
            indexes.append(await leader.propose(b"v%d" % i))
        with trio.fail_after(10):
            for driver in cluster.drivers.values():
                await driver.wait_applied(indexes[-1])
        nursery.cancel_scope.cancel()
    logs = {}
    for node_id, storage in storages.items():
        logs[node_id] = storage.entries(storage.first_index(), storage.last_index() + 1)
        storage.close()
    assert all(len(log) >= indexes[-1] for log in logs.values())

    storages = {node_id: RocksStorage(tmp_path / node_id) for node_id in IDS}
    for node_id, storage in storages.items():
        assert storage.entries(1, len(logs[node_id]) + 1) == logs[node_id]
    cluster = Cluster(storages, tick=0.05, seed=2)
    try:
        async with trio.open_nursery() as nursery:
            for node_id in IDS:
                await cluster.start(nursery, node_id)
            leader = await cluster.leader()
            index = await leader.propose(b"after-restart")
            with trio.fail_after(10):
                for driver in cluster.drivers.values():
                    await driver.wait_applied(index)
            expected = [b"v%d" % i for i in range(20)] + [b"after-restart"]
            assert all(fsm == expected for fsm in cluster.fsm.values()), cluster.fsm
            nursery.cancel_scope.cancel()
    finally:
        for storage in storages.values():
            storage.close()


class RecordingStorage(MemoryStorage):
    def __init__(self, node_id: str, events: list) -> None:
        super().__init__()
        self.node_id, self.events = node_id, events

    def sync(self) -> None:
        hard_state, _ = self.initial_state()
        self.events.append(("sync", self.node_id, self.last_index(), hard_state.term, hard_state.vote))


async def test_acknowledgements_wait_for_sync_but_leader_appends_do_not(autojump_clock):
    # Raft §5 / thesis §3.8: a vote or an append acknowledgement promises durable state,
    # so it leaves only after the fsync; the leader's own appends may go out first (§10.2.1).
    # Entries are applied only once they are on the node's own disk.
    events: list = []
    storages = {}
    for node_id in IDS:
        storages[node_id] = RecordingStorage(node_id, events)
        bootstrap_log(storages[node_id], IDS)
    cluster = Cluster(storages, sync_in_thread=False)
    cluster.events = events
    original = cluster._sender

    def recording_sender(frm):
        deliver = original(frm)

        def send(message):
            events.append(("send", message))
            deliver(message)

        return send

    cluster._sender = recording_sender
    async with trio.open_nursery() as nursery:
        for node_id in IDS:
            await cluster.start(nursery, node_id)
        leader = await cluster.leader()
        async with trio.open_nursery() as clients:
            for i in range(30):
                clients.start_soon(leader.propose, b"w%d" % i)
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()

    durable: dict[str, tuple[int, int, str]] = {}
    early_appends = 0
    for event in events:
        if event[0] == "sync":
            _, node_id, last, term, vote = event
            durable[node_id] = (last, term, vote)
            continue
        if event[0] == "apply":  # only what is on this node's disk is applied
            _, node_id, index, term = event
            assert durable[node_id][0] >= index, (event, durable[node_id])
            continue
        m = event[1]
        name = type(m).__name__
        if name == "AppendResponse" and not m.reject:
            assert durable[m.frm][0] >= m.index, (m, durable[m.frm])
        if name == "VoteResponse" and m.granted and not m.pre_vote:
            assert durable[m.frm][1:] == (m.term, m.to), (m, durable[m.frm])
        if name == "AppendEntries" and m.entries and durable.get(m.frm, (0,))[0] < m.entries[-1].index:
            early_appends += 1
    assert early_appends > 0


async def test_a_node_behind_the_compaction_point_catches_up_from_a_snapshot(autojump_clock):
    # Raft §7: a follower that needs compacted entries gets InstallSnapshot; the
    # driver hands it to `restore` and then applies what follows.
    import msgspec

    storages = {}
    for node_id in IDS:
        storages[node_id] = MemoryStorage()
        bootstrap_log(storages[node_id], IDS)
    cluster = Cluster(storages, sync_in_thread=False)
    restored: dict[str, int] = {}
    original_start = cluster.start

    async def start(nursery, node_id):
        driver = await original_start(nursery, node_id)
        fsm = cluster.fsm[node_id]
        inner_apply = driver._apply

        async def apply(entries):
            await inner_apply(entries)
            if entries[-1].index % 10 == 0:
                driver.take_snapshot(entries[-1].index, msgspec.msgpack.encode(fsm))

        async def restore(snapshot):
            fsm[:] = msgspec.msgpack.decode(snapshot.data)
            restored[node_id] = snapshot.meta.index

        driver._apply, driver._restore = apply, restore
        return driver

    async with trio.open_nursery() as nursery:
        await start(nursery, "n1")
        await start(nursery, "n2")
        leader = await cluster.leader()
        for i in range(35):
            index = await leader.propose(b"e%d" % i)
        assert storages[leader.node.id].first_index() > 4  # the founding entries are compacted away
        late = await start(nursery, "n3")
        with trio.fail_after(10):
            await late.wait_applied(index)
        assert restored.get("n3", 0) >= 30
        assert cluster.fsm["n3"] == [b"e%d" % i for i in range(35)]
        nursery.cancel_scope.cancel()
