"""The trio driver under trio.testing.MockClock, on the in-memory datagram twin."""

from __future__ import annotations

import random

import trio
import trio.testing

from cloudless.errors import Unavailable
from cloudless.gossip.core import GossipCore
from cloudless.gossip.driver import GossipDriver, MemoryDatagramNetwork, format_addr
from cloudless.gossip.events import MemberDead, MemberJoined, MemberLeft
from cloudless.gossip.keyring import Keyring, PacketSealer
from cloudless.gossip.members import ALIVE, DEAD, LEFT
from tests.harness.waiting import wait_until

KEY = bytes(range(32))


async def _cluster(n: int, net: MemoryDatagramNetwork, nursery, events: list, keys=None):
    drivers: dict[str, GossipDriver] = {}
    endpoints = {}

    async def stream_exchange(addr: str, request: bytes) -> bytes:
        peer = drivers.get(addr)
        if peer is None or endpoints[addr].cut:
            raise Unavailable("down", peer=addr)
        return await peer.serve_stream(request)

    out = []
    for i in range(n):
        ep = net.endpoint()
        core = GossipCore(f"m{i}", format_addr(ep.local_address), rng=random.Random(i), now=trio.current_time())
        key = KEY if keys is None else keys[i]
        d = GossipDriver(core, ep, PacketSealer(Keyring(key)), stream_exchange)
        d.add_listener(lambda e, name=core.name: events.append((name, e)))
        await nursery.start(d.run)
        drivers[core.addr] = d
        endpoints[core.addr] = ep
        out.append((d, ep))
    for d, _ in out[1:]:
        await d.join([out[0][0].core.addr])  # everyone joins through m0
    return out


async def test_driver_join_crash_and_leave_in_virtual_time(autojump_clock):
    net = MemoryDatagramNetwork(loss=0.02, seed=5)
    events: list = []
    async with trio.open_nursery() as nursery:
        members = await _cluster(12, net, nursery, events)
        await trio.sleep(5)
        names = [d.core.name for d, _ in members]
        assert all(d.core.member(n).state == ALIVE for d, _ in members for n in names)
        assert sum(1 for _, e in events if isinstance(e, MemberJoined)) >= 11 * 11

        members[3][1].cut = True  # crash: silent from now on
        await trio.sleep(15)
        for d, ep in members:
            if not ep.cut:
                assert d.core.member("m3").state == DEAD

        assert await members[4][0].leave()
        members[4][1].cut = True
        await trio.sleep(5)
        for d, ep in members:
            if not ep.cut:
                assert d.core.member("m4").state == LEFT
        assert any(isinstance(e, MemberLeft) and e.name == "m4" for _, e in events)
        assert not any(isinstance(e, MemberDead) and e.name not in ("m3",) for _, e in events)
        nursery.cancel_scope.cancel()


async def test_packets_sealed_with_another_cluster_key_are_dropped_and_counted(autojump_clock):
    net = MemoryDatagramNetwork()
    events: list = []
    async with trio.open_nursery() as nursery:
        keys = [KEY, KEY, bytes(32)]
        members = await _cluster(3, net, nursery, events, keys)  # the stream join works; datagrams do not
        await trio.sleep(10)
        outsider = members[2][0]
        assert outsider.counters["unsealed_dropped"] > 0
        assert members[0][0].counters["unsealed_dropped"] > 0
        # Nothing the outsider sealed reached a core: no ack from it ever counted.
        assert members[0][0].core.stats["packets_in"] + members[1][0].core.stats["packets_in"] > 0
        assert outsider.core.stats["packets_in"] == 0
        nursery.cancel_scope.cancel()


async def test_a_transport_hint_probes_the_member_at_once_and_a_crash_is_known_everywhere_within_1_2_s(autojump_clock):
    """A connection failure (the kernel resets a killed process's sockets) makes
    the driver probe that member now rather than on its round-robin turn; the
    members that hear the suspicion probe it at once too, so their confirmations
    bring the Lifeguard timeout down to its minimum."""
    net = MemoryDatagramNetwork()
    events: list = []
    async with trio.open_nursery() as nursery:
        members = await _cluster(5, net, nursery, events)
        await trio.sleep(3)
        watcher = members[0][0]
        # between probes: the next is ~a probe interval away
        await wait_until(lambda: watcher.core._probe is None, interval=0.001)
        members[3][1].cut = True
        hinted_at = trio.current_time()
        watcher.hint_unreachable("m3")
        await trio.sleep(0.01)
        assert watcher.core._probe is not None and watcher.core._probe.target.name == "m3"
        while not all(d.core.member("m3").state == DEAD for d, ep in members if not ep.cut):
            await trio.sleep(0.01)
            # Virtual time: 0.93 s here; without the early confirmations 1.40 s.
            assert trio.current_time() - hinted_at < 1.2, [d.core.member("m3").state for d, _ in members]
        nursery.cancel_scope.cancel()
