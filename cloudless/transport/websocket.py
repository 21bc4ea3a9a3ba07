"""WebSocket (wss) carrier: the TLS carrier's mux inside a WebSocket, for
networks that only let HTTPS-looking traffic through.

Layering: TCP → TLS 1.3 with the same mutual authentication and verdict as
`tls.py` → WebSocket upgrade (trio-websocket, resource `/cloudless/mux`) →
`MuxSession`, whose byte stream rides binary messages (message boundaries
mean nothing to the mux). There is no ws:// (plaintext) listener.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream, wrap_server_stream

from cloudless.pki.errors import PeerRejected
from cloudless.transport.base import Connection, ConnectionHandler, ConnectionLost
from cloudless.transport.mux import MuxConfig, MuxProtocolError, MuxSession, run_session
from cloudless.transport.tls import (
    TlsContexts,
    TlsTransport,
    client_handshake,
    open_tcp,
    run_detached,
    serve_tcp,
    server_handshake,
)

log = logging.getLogger(__name__)

Address = tuple[str, int]
RESOURCE = "/cloudless/mux"
MAX_MESSAGE = 1024 * 1024  # what we send per message; we accept up to twice that
RECEIVE_BUFFER = 256 * 1024


class WebSocketBytes:
    """A WebSocketConnection seen as a byte stream (`mux.ByteTransport`)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            for start in range(0, len(view), MAX_MESSAGE):
                await self._ws.send_message(bytes(view[start : start + MAX_MESSAGE]))
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError(f"websocket closed: {exc.reason}") from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            message = await self._ws.get_message()
        except ConnectionClosed:
            return b""
        if isinstance(message, str):
            raise MuxProtocolError("text WebSocket message on a binary mux connection")
        return message

    async def aclose(self) -> None:
        await self._ws.aclose()


class WebSocketCarrier:
    """Mutually authenticated wss carrier; implements `base.Carrier`."""

    def __init__(
        self,
        credentials: Any,
        verifier: Any,
        bind: Address = ("127.0.0.1", 0),
        handshake_timeout: float = 5.0,
        *,
        mux_config: MuxConfig | None = None,
    ) -> None:
        self._contexts = TlsContexts(credentials)
        self.verifier = verifier
        self.bind = bind
        self.handshake_timeout = handshake_timeout
        self.mux_config = mux_config or MuxConfig()
        self.local_address: Address | None = None
        self.rejected = 0  # handshakes refused by serve, for tests and metrics
        self.rejections: Counter[str] = Counter()  # by reason
        self.accepted = 0

    def statistics(self) -> dict[str, Any]:
        return {
            "local_address": self.local_address,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejections": dict(self.rejections),
        }

    def update_credentials(self, credentials: Any) -> None:
        self._contexts = TlsContexts(credentials)

    async def connect(self, address: Address) -> Connection:
        address = (address[0], int(address[1]))

        async def setup(nursery: trio.Nursery) -> MuxSession:
            tcp = await open_tcp(address)
            stream, peer, extra = await client_handshake(tcp, self._contexts, self.verifier, address)
            if extra:
                raise ConnectionLost(f"{address[0]}:{address[1]} spoke before the WebSocket upgrade")
            try:
                ws = await wrap_client_stream(
                    nursery,
                    # trio-websocket's annotation names only SocketStream/SSLStream; any trio Stream works.
                    TlsTransport(stream),  # type: ignore[arg-type]
                    f"{address[0]}:{address[1]}",
                    RESOURCE,
                    max_message_size=2 * MAX_MESSAGE,
                    receive_buffer_size=RECEIVE_BUFFER,
                )
            except (ConnectionClosed, trio.BrokenResourceError, OSError) as exc:
                await trio.aclose_forcefully(stream)
                raise ConnectionLost(f"WebSocket upgrade with {address[0]}:{address[1]} failed: {exc!r}") from exc
            return MuxSession(
                WebSocketBytes(ws), is_client=True, peer=peer, remote_address=address, config=self.mux_config
            )

        return await run_detached(setup, self.handshake_timeout, f"wss://{address[0]}:{address[1]}")

    async def serve(self, handler: ConnectionHandler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await serve_tcp(self, "websocket", lambda tcp: self._serve_one(tcp, handler), task_status)

    async def _serve_one(self, tcp: trio.SocketStream, handler: ConnectionHandler) -> None:
        try:
            address = tcp.socket.getpeername()[:2]
        except OSError:
            await trio.aclose_forcefully(tcp)
            return
        remote = f"{address[0]}:{address[1]}"
        async with trio.open_nursery() as nursery:  # hosts trio-websocket's reader
            try:
                with trio.fail_after(self.handshake_timeout):
                    stream, peer = await server_handshake(tcp, self._contexts, self.verifier, address)
                    try:
                        request = await wrap_server_stream(
                            nursery,
                            TlsTransport(stream),
                            max_message_size=2 * MAX_MESSAGE,
                            receive_buffer_size=RECEIVE_BUFFER,
                        )
                        if request.path != RESOURCE:
                            await request.reject(404)
                            raise ConnectionLost(f"WebSocket request for {request.path[:100]!r}")
                        ws = await request.accept()
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
            except trio.TooSlowError:
                self.rejected += 1
                self.rejections["handshake_timeout"] += 1
                log.warning("websocket.handshake_timeout", extra={"remote": remote})
                await trio.aclose_forcefully(tcp)
                nursery.cancel_scope.cancel()
                return
            except PeerRejected as exc:
                self.rejected += 1
                self.rejections[exc.reason] += 1
                log.warning(
                    "websocket.peer_rejected", extra={"remote": remote, "reason": exc.reason, "error": exc.message}
                )
                nursery.cancel_scope.cancel()
                return
            except (ConnectionLost, ConnectionClosed, trio.BrokenResourceError, OSError) as exc:
                self.rejected += 1
                self.rejections["handshake_failed"] += 1
                log.info("websocket.handshake_failed", extra={"remote": remote, "error": repr(exc)})
                nursery.cancel_scope.cancel()
                return
            self.accepted += 1
            session = MuxSession(
                WebSocketBytes(ws), is_client=False, peer=peer, remote_address=address, config=self.mux_config
            )
            await run_session(session, handler)
            nursery.cancel_scope.cancel()
