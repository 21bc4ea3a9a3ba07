"""The in-memory carrier twin: same Connection semantics as TLS/TCP, plus
partition, heal, disconnect and refusal injection for simulations."""

from __future__ import annotations

import pytest
import trio

from cloudless.transport.base import ConnectionLost, PeerIdentity
from cloudless.transport.memory import MemoryCarrier, MemoryNetwork
from cloudless.transport.mux import MuxConfig

A = PeerIdentity("mem", "node", "a", 1)
B = PeerIdentity("mem", "node", "b", 2)
FAST_KEEPALIVE = MuxConfig(keepalive_interval=0.1, keepalive_timeout=0.2)


async def echo(conn) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            stream = await conn.accept_stream()

            async def serve(stream=stream):
                while data := await stream.receive_some():
                    await stream.send_all(data)
                await stream.send_eof()

            nursery.start_soon(serve)


async def ask(conn, data: bytes) -> bytes:
    stream = await conn.open_stream()
    await stream.send_all(data)
    return await stream.receive_some()


async def start_pair(nursery, network):
    a = MemoryCarrier(network, A, ("a", 1))
    b = MemoryCarrier(network, B, ("b", 1))
    address = await nursery.start(b.serve, echo)
    return a, b, address


async def test_identities_are_what_the_carriers_were_built_with():
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, _, address = await start_pair(nursery, network)
        conn = await a.connect(address)
        assert conn.peer == B and conn.remote_address == ("b", 1)
        assert await ask(conn, b"ping") == b"ping"
        nursery.cancel_scope.cancel()


async def test_connect_to_nothing_or_refused_or_partitioned_fails_at_once():
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, _, address = await start_pair(nursery, network)
        with pytest.raises(ConnectionLost, match="nothing serves"):
            await a.connect(("nobody", 1))
        network.refuse(address)
        with pytest.raises(ConnectionLost, match="refused"):
            await a.connect(address)
        network.refuse(address, False)
        network.partition(a.address, address)
        with pytest.raises(ConnectionLost, match="partitioned"):
            await a.connect(address)
        network.heal()
        assert await ask(await a.connect(address), b"ok") == b"ok"
        nursery.cancel_scope.cancel()


async def test_partition_is_detected_by_keepalive():
    network = MemoryNetwork(mux_config=FAST_KEEPALIVE)
    async with trio.open_nursery() as nursery:
        a, _, address = await start_pair(nursery, network)
        conn = await a.connect(address)
        stream = await conn.open_stream()
        await stream.send_all(b"before")
        assert await stream.receive_some() == b"before"
        network.partition(a.address, address)
        with trio.fail_after(3):
            with pytest.raises(ConnectionLost, match="keepalive"):
                await stream.receive_some()
        assert conn.is_closed
        nursery.cancel_scope.cancel()


async def test_short_partition_healed_before_the_timeout_loses_nothing():
    network = MemoryNetwork(mux_config=MuxConfig(keepalive_interval=0.5, keepalive_timeout=1.0))
    async with trio.open_nursery() as nursery:
        a, _, address = await start_pair(nursery, network)
        conn = await a.connect(address)
        stream = await conn.open_stream()
        network.partition(a.address, address)
        await stream.send_all(b"held in flight")
        with trio.move_on_after(0.2):
            await stream.receive_some()
            pytest.fail("data crossed a partition")
        network.heal()
        with trio.fail_after(2):
            assert await stream.receive_some() == b"held in flight"
        assert not conn.is_closed
        nursery.cancel_scope.cancel()


async def test_disconnect_breaks_existing_connections_immediately():
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, _, address = await start_pair(nursery, network)
        conn = await a.connect(address)
        stream = await conn.open_stream()
        await stream.send_all(b"x")
        assert await stream.receive_some() == b"x"
        network.disconnect(a.address)
        with trio.fail_after(1):
            with pytest.raises(ConnectionLost):
                await stream.receive_some()
        # New connections work again.
        assert await ask(await a.connect(address), b"again") == b"again"
        nursery.cancel_scope.cancel()


async def test_stopping_the_listener_frees_the_address():
    network = MemoryNetwork()
    b = MemoryCarrier(network, B, ("b", 1))
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve, echo)
        with pytest.raises(OSError):
            await b.serve(echo)
        nursery.cancel_scope.cancel()
    a = MemoryCarrier(network, A, ("a", 1))
    with pytest.raises(ConnectionLost):
        await a.connect(("b", 1))
