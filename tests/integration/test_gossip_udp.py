"""24 gossip members on real loopback UDP sockets, each its own endpoint,
sealed with the cluster keyring: join through seeds, a crash detected by all,
a graceful leave seen as a leave, metadata spread."""

from __future__ import annotations

import random

import trio

from cloudless.errors import Unavailable
from cloudless.gossip.core import GossipConfig, GossipCore
from cloudless.gossip.driver import GossipDriver, format_addr
from cloudless.gossip.events import MemberDead, MemberLeft
from cloudless.gossip.keyring import Keyring, PacketSealer
from cloudless.gossip.members import ALIVE, DEAD, LEFT
from cloudless.gossip.metadata import Metadata
from cloudless.transport.udp import UdpEndpoint
from tests.harness import waiting

N = 24
KEY = bytes(range(32))
# All members share one Python process and a CI machine that may be busy, so
# timeouts are LAN-like rather than the tuned defaults; the protocol is the same.
CONFIG = GossipConfig(probe_interval=0.6, probe_timeout=0.3, suspicion_mult=2.0)


class Member:
    def __init__(self, driver: GossipDriver, endpoint: UdpEndpoint, scope: trio.CancelScope) -> None:
        self.driver = driver
        self.endpoint = endpoint
        self.scope = scope
        self.events: list = []


async def start_member(nursery: trio.Nursery, i: int, registry: dict[str, Member]) -> Member:
    endpoint = UdpEndpoint("127.0.0.1", 0)
    scope = trio.CancelScope()

    async def stream_exchange(addr: str, request: bytes) -> bytes:
        peer = registry.get(addr)
        if peer is None or peer.scope.cancel_called:
            raise Unavailable("peer is down", peer=addr)
        return await peer.driver.serve_stream(request)

    async def member_task(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            async with trio.open_nursery() as inner:
                addr = await inner.start(endpoint.run)
                core = GossipCore(
                    f"m{i}",
                    format_addr(addr),
                    rng=random.Random(i),
                    now=trio.current_time(),
                    config=CONFIG,
                    meta=Metadata(region="eu", zone=f"z{i % 3}"),
                )
                driver = GossipDriver(core, endpoint, PacketSealer(Keyring(KEY)), stream_exchange, stream_timeout=1.0)
                await inner.start(driver.run)
                task_status.started(driver)

    driver = await nursery.start(member_task)
    member = Member(driver, endpoint, scope)
    driver.add_listener(member.events.append)
    registry[driver.core.addr] = member
    return member


async def wait_until(predicate, timeout: float, what: str) -> float:
    start = trio.current_time()
    with trio.move_on_after(timeout):
        await waiting.wait_until(predicate, interval=0.05)
        return trio.current_time() - start
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def state_of(member: Member, name: str):
    row = member.driver.core.member(name)
    return None if row is None else row.state


async def test_gossip_over_real_udp_join_crash_leave_and_metadata():
    registry: dict[str, Member] = {}
    async with trio.open_nursery() as nursery:
        members = [await start_member(nursery, i, registry) for i in range(N)]
        seed = members[0].driver.core.addr
        for m in members[1:]:
            await m.driver.join([seed])
        names = [m.driver.core.name for m in members]

        def all_know_all() -> bool:
            return all(state_of(m, n) == ALIVE for m in members for n in names)

        await wait_until(all_know_all, 15, "every member to see every member alive")

        # Metadata update spreads like a state change.
        await members[5].driver.update_metadata(Metadata(region="eu", zone="z9", power="battery", battery_percent=40))
        await wait_until(
            lambda: all(m.driver.core.member("m5").meta.zone == "z9" for m in members),
            10,
            "metadata to spread",
        )

        # A crash: m7's process vanishes without a word.
        victim = members[7]
        victim.scope.cancel()
        survivors = [m for m in members if m is not victim]
        took = await wait_until(
            lambda: all(state_of(m, "m7") == DEAD for m in survivors), 20, "every member to mark m7 dead"
        )
        assert took < 20
        assert any(isinstance(e, MemberDead) and e.name == "m7" for e in survivors[0].events)

        # A graceful leave is seen as a leave, not a failure.
        leaver = members[11]
        assert await leaver.driver.leave(timeout=2.0)
        leaver.scope.cancel()
        rest = [m for m in survivors if m is not leaver]
        await wait_until(lambda: all(state_of(m, "m11") == LEFT for m in rest), 10, "every member to see m11 left")
        assert any(isinstance(e, MemberLeft) and e.name == "m11" for e in rest[0].events)
        assert not any(isinstance(e, MemberDead) and e.name == "m11" for m in rest for e in m.events)

        # No live member was ever declared dead.
        live = {m.driver.core.name for m in rest}
        for m in rest:
            assert not [e for e in m.events if isinstance(e, MemberDead) and e.name in live]
            assert m.driver.counters["unsealed_dropped"] == 0
        nursery.cancel_scope.cancel()
