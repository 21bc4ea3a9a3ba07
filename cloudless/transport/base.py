"""The carrier-neutral connection interface every transport implements.

QUIC (`quic.py`), TLS over TCP (`tls.py`, multiplexed by `mux.py`), its
WebSocket variant (`websocket.py`) and the in-memory twin (`memory.py`) all
hand out `Connection`s whose streams behave alike, so the RPC layer
(`rpc.py`) and everything above it never know which carrier they ride.

Every connection is mutually authenticated: by the time a `Connection`
exists, the peer's certificate chained to the cluster CA, was not revoked,
and carried a Cloudless identity, which is `Connection.peer`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from cloudless.errors import CloudlessError, Unavailable
from cloudless.pki.identity import PeerIdentity as PeerIdentity  # the verifier (pki) returns it


class TransportError(CloudlessError):
    pass


class ConnectionLost(Unavailable):
    """The connection closed or the peer vanished; pending streams fail with this."""

    @classmethod
    def from_crash(cls, what: str, exc: BaseException, **context: object) -> ConnectionLost:
        """A ConnectionLost caused by a background task's unexpected error (a
        nursery's one-exception group unwrapped), so stream users see why."""
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        error = cls(f"{what} failed: {exc!r}", **context)
        error.__cause__ = exc
        return error


class StreamReset(TransportError):
    """The peer (or we) aborted the stream; `code` says why (0: cancelled)."""

    # Shadows CloudlessError.code (the error-code string) with the reset code; callers read
    # `.code` as the int, so it stays until they move to a separately named attribute.
    code: int  # type: ignore[assignment]

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message, code=code)
        self.code = code


class Stream(Protocol):
    """One ordered, flow-controlled, bidirectional byte stream in a Connection.

    `send_all` blocks while the peer's receive window is full, so a slow
    reader holds back a fast writer instead of making it buffer.
    """

    @property
    def stream_id(self) -> int: ...

    async def send_all(self, data: bytes) -> None: ...

    async def send_eof(self) -> None:
        """Half-close: the peer's receive_some returns b"" after our data."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Next bytes, b"" at the peer's EOF; raises StreamReset or ConnectionLost."""

    async def reset(self, code: int = 0) -> None:
        """Abort both directions now (used for cancellation)."""

    async def aclose(self) -> None: ...


class Connection(Protocol):
    @property
    def peer(self) -> PeerIdentity: ...

    @property
    def remote_address(self) -> tuple[str, int]: ...

    @property
    def is_closed(self) -> bool: ...

    async def open_stream(self) -> Stream: ...

    async def accept_stream(self) -> Stream:
        """Next stream the peer opened; raises ConnectionLost once closed."""

    async def aclose(self) -> None: ...


ConnectionHandler = Callable[[Connection], Awaitable[None]]


class Carrier(Protocol):
    """A way of making and accepting mutually authenticated connections.

    Implementations: `quic.QuicCarrier`, `tls.TlsCarrier`,
    `websocket.WebSocketCarrier`, `memory.MemoryCarrier`. Each is built from
    the node's `cloudless.pki.credentials.Credentials` and a
    `cloudless.pki.verify.PeerVerifier`.
    """

    async def connect(self, address: tuple[str, int]) -> Connection:
        """Open a connection; raises PeerRejected or ConnectionLost, never hangs
        past the carrier's handshake timeout."""

    async def serve(self, handler: ConnectionHandler, *, task_status=...) -> None:
        """Listen (on the carrier's bind address) and run `handler` for each
        authenticated connection in a child task; `task_status.started(addr)`
        reports the bound (host, port) once accepting."""
