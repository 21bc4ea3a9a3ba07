"""Before authentication a peer gets little: bounded handshakes in flight,
bounded enrollment connections, each for a bounded time (issue: zero trust)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio

from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import ConnectionLost
from cloudless.transport.tls import TlsCarrier, connect_enrollment
from tests.harness.waiting import wait_until

NOW = datetime.now(UTC)
CA = ClusterCA.create("limits", NOW)
SERVER = issue_credentials(CA, Identity("limits", "node", "server"), NOW)


async def hold(conn) -> None:
    """A handler that keeps every connection open until the peer or the server ends it."""
    while True:
        stream = await conn.accept_stream()
        await stream.aclose()


async def _serve(nursery, **limits) -> tuple[TlsCarrier, tuple[str, int]]:
    server = TlsCarrier(SERVER, PeerVerifier(CA.certificate, RevocationList(), "limits"), enrollment=True)
    for name, value in limits.items():
        setattr(server, name, value)
    address = await nursery.start(server.serve, hold)
    return server, address


async def _closed(conn) -> bool:
    with trio.move_on_after(2):
        try:
            await conn.accept_stream()
        except ConnectionLost:
            return True
    return False


async def test_enrollment_connections_beyond_the_cap_are_refused() -> None:
    async with trio.open_nursery() as nursery:
        server, address = await _serve(nursery, max_enrollees=3)
        held = [(await connect_enrollment(address))[0] for _ in range(3)]
        extra = [(await connect_enrollment(address))[0] for _ in range(4)]
        for conn in extra:
            assert await _closed(conn)
        assert server.enrollees == 3 and server.rejections["enrollees_full"] == 4
        for conn in held:
            assert not conn.is_closed
            await conn.aclose()
        with trio.fail_after(5):
            await wait_until(lambda: not server.enrollees, interval=0.01)  # the slots come back
        fresh, _ = await connect_enrollment(address)
        assert not await _closed(fresh)
        await fresh.aclose()
        nursery.cancel_scope.cancel()


async def test_an_idle_enrollment_connection_is_closed_after_its_lifetime() -> None:
    async with trio.open_nursery() as nursery:
        _, address = await _serve(nursery, enrollee_lifetime=0.5)
        conn, _ = await connect_enrollment(address)
        with trio.fail_after(5):
            with pytest.raises(ConnectionLost):
                await conn.accept_stream()
        nursery.cancel_scope.cancel()


async def test_handshakes_in_flight_are_capped() -> None:
    async with trio.open_nursery() as nursery:
        server, address = await _serve(nursery, max_pending_handshakes=2)
        # Silent TCP peers that never start TLS hold handshake slots...
        silent = [await trio.open_tcp_stream(*address) for _ in range(2)]
        with trio.fail_after(5):
            await wait_until(lambda: server.pending_handshakes >= 2, interval=0.01)
        # ...so the next one is closed at once instead of costing a task and an SSL object.
        third = await trio.open_tcp_stream(*address)
        with trio.fail_after(2):
            assert await third.receive_some(1) == b""
        assert server.rejections["overloaded"] >= 1
        for s in [*silent, third]:
            await s.aclose()
        nursery.cancel_scope.cancel()
