"""WebSocket carrier specifics: only the mux resource is served, only binary
messages are accepted, and the mux rides wss with mutual authentication."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio
from trio_websocket import ConnectionRejected, wrap_client_stream

from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import ConnectionLost
from cloudless.transport.tls import TlsContexts, client_handshake, open_tcp
from cloudless.transport.websocket import RESOURCE, WebSocketCarrier
from tests.harness.waiting import wait_until

NOW = datetime.now(UTC)
CA = ClusterCA.create("ws-test", NOW)
SERVER = issue_credentials(CA, Identity("ws-test", "node", "server"), NOW)
CLIENT = issue_credentials(CA, Identity("ws-test", "node", "client"), NOW)
VERIFIER = PeerVerifier(CA.certificate, RevocationList(), "ws-test")


async def accept_forever(conn) -> None:
    while True:
        stream = await conn.accept_stream()
        await stream.send_all(await stream.receive_some())


async def authenticated_ws(nursery, address, resource):
    tcp = await open_tcp(address)
    stream, peer, extra = await client_handshake(tcp, TlsContexts(CLIENT), VERIFIER, address)
    assert peer.uri == "spiffe://ws-test/node/server" and not extra
    return await wrap_client_stream(nursery, stream, f"{address[0]}:{address[1]}", resource)


async def test_other_resources_are_refused_with_404():
    server = WebSocketCarrier(SERVER, VERIFIER)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, accept_forever)
        rejected = []
        with trio.fail_after(5):
            try:
                async with trio.open_nursery() as inner:  # trio-websocket raises from its reader task
                    await authenticated_ws(inner, address, "/somewhere-else")
                    await trio.sleep_forever()
            except* ConnectionRejected as group:
                rejected.extend(group.exceptions)
        assert [r.status_code for r in rejected] == [404]
        nursery.cancel_scope.cancel()


async def test_text_messages_close_the_connection():
    server = WebSocketCarrier(SERVER, VERIFIER)
    served = []

    async def handler(conn):
        served.append(conn)
        await accept_forever(conn)

    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, handler)
        ws = await authenticated_ws(nursery, address, RESOURCE)
        await ws.send_message("not bytes")
        with trio.fail_after(5):
            await wait_until(lambda: served and served[0].is_closed, interval=0.01)
        with pytest.raises(ConnectionLost, match="text WebSocket message"):
            await served[0].open_stream()
        # The listener goes on serving proper clients.
        conn = await WebSocketCarrier(CLIENT, VERIFIER).connect(address)
        stream = await conn.open_stream()
        await stream.send_all(b"binary is fine")
        assert await stream.receive_some() == b"binary is fine"
        await conn.aclose()
        nursery.cancel_scope.cancel()
