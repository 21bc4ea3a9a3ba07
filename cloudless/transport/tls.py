"""TLS 1.3 over TCP: the carrier for bulk streams and networks that block UDP.

Each connection is one `trio.SSLStream` carrying a `mux.MuxSession`.

Authentication, both ways:

1. The TLS handshake runs TLS 1.3 only, with CERT_REQUIRED on both sides
   and the cluster CA as the only trust anchor, so OpenSSL checks the chain
   and validity period. Hostname checking is off: peers are named by their
   SPIFFE identity, not by DNS.
2. Each side then runs `PeerVerifier.verify_der` on the peer's leaf
   (revocation, the Cloudless URI SAN, the cluster id).
3. The server answers with a one-line verdict (`ACCEPT`, or `REJECT` and
   the reason) before any mux frame. In TLS 1.3 the client finishes its
   handshake before the server has judged the client's certificate, so
   without this verdict a refused client would only learn of it on its
   first read; with it, `connect` raises `PeerRejected` naming the reason.

Every accepted TCP connection gets `handshake_timeout` to complete all of
that in its own task, so a client that never finishes its handshake holds
only itself up. There is no plaintext listener: `serve` only ever speaks TLS.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from cloudless.pki.errors import PeerRejected
from cloudless.transport import hosting
from cloudless.transport.base import Connection, ConnectionHandler, ConnectionLost, PeerIdentity
from cloudless.transport.mux import MuxConfig, MuxSession, run_session

log = logging.getLogger(__name__)

Address = tuple[str, int]

VERDICT_ACCEPT = b"\x00"
VERDICT_REJECT = b"\x01"
MAX_VERDICT_REASON = 255

# OpenSSL X509_V_ERR_* codes (the server's view of a bad client certificate).
_VERIFY_CODE_REASONS = {
    9: "not_yet_valid",
    10: "expired",
    2: "unknown_ca",
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed in chain
    20: "unknown_ca",  # unable to get local issuer
    21: "unknown_ca",
    7: "unknown_ca",  # signed by another key under the same CA name
    4: "unknown_ca",
}

# TLS alerts (the client's view of a server that refused our certificate).
_ALERT_REASONS = {
    "CERTIFICATE_REQUIRED": "no_certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
    "CERTIFICATE_EXPIRED": "expired",
    "UNKNOWN_CA": "unknown_ca",
    "CERTIFICATE_VERIFY_FAILED": "unknown_ca",
    "BAD_CERTIFICATE": "unknown_ca",
    "DECRYPT_ERROR": "bad_signature",
    "CERTIFICATE_REVOKED": "revoked",
}


def _ssl_reason(exc: ssl.SSLError) -> str | None:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODE_REASONS.get(exc.verify_code, "unknown_ca")
    text = f"{exc.reason or ''} {exc}".upper()
    for marker, reason in _ALERT_REASONS.items():
        if marker in text:
            return reason
    return None


def rejection_from_ssl_error(exc: BaseException, *, address: Address) -> PeerRejected | None:
    """PeerRejected for a certificate failure OpenSSL raised, None for other TLS errors.

    A verification error is our verdict on the peer's certificate; an alert
    is the peer's verdict on ours.
    """
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if not isinstance(cause, ssl.SSLError):
        return None
    reason = _ssl_reason(cause)
    if reason is None:
        return None
    side = "local" if isinstance(cause, ssl.SSLCertVerificationError) else "remote"
    if side == "local":
        message = f"peer at {address[0]}:{address[1]} presented an unacceptable certificate ({reason}): {cause}"
    else:
        message = f"{address[0]}:{address[1]} refused our certificate ({reason}): {cause}"
    return PeerRejected(reason, message, address=f"{address[0]}:{address[1]}", side=side)  # type: ignore[arg-type]


ENROLL_SERVER_NAME = "enroll.cloudless.invalid"
ENROLLEE = "enrollee"
# Before authentication a peer gets little: a bounded number of handshakes
# in flight, a bounded number of enrollment connections, each with two
# streams and the smallest windows, for a bounded time (a join takes two
# calls and well under a second).
MAX_PENDING_HANDSHAKES = 256
MAX_ENROLLEES = 32
ENROLLEE_LIFETIME = 30.0
ENROLLEE_MUX = MuxConfig(max_streams=2, max_outbox_bytes=256 * 1024)


READ_SIZE = 256 * 1024


class _LargeReads(trio.abc.Stream):
    """A SocketStream whose default read is READ_SIZE (trio's is 64 KiB)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(READ_SIZE if max_bytes is None else max_bytes)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class TlsTransport(trio.abc.Stream):
    """An SSLStream as the mux's byte transport, reading many TLS records per call.

    trio's SSLStream.receive_some returns one TLS record (16 KiB at most) per
    call and passes through the scheduler each time; for bulk transfers that
    trip dominates. After each receive_some this also takes, synchronously,
    whatever plaintext the records already buffered hold (SSLObject.read on
    trio's private `_ssl_object`; without it this is plain receive_some).
    Anything OpenSSL wants to send meanwhile (a KeyUpdate answer) stays in
    trio's outgoing buffer and leaves with the next SSLStream call.
    """

    def __init__(self, stream: trio.SSLStream) -> None:
        self.stream = stream
        self._ssl_object = getattr(stream, "_ssl_object", None)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = READ_SIZE if max_bytes is None else max_bytes
        data = await self.stream.receive_some(limit)
        if not data or self._ssl_object is None:
            return data
        parts = [data]
        total = len(data)
        while total < limit:
            try:
                more = self._ssl_object.read(limit - total)
            except ssl.SSLError:  # want-read, close_notify, or an error the next call reports
                break
            if not more:
                break
            parts.append(more)
            total += len(more)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        await self.stream.aclose()


class TlsContexts:
    """The client and server SSLContexts built from one set of credentials.

    A joining device has no certificate yet. It asks for the server name
    ENROLL_SERVER_NAME, and the SNI callback switches that one handshake to
    `enroll_server`, which does not ask for a client certificate. The
    connection's peer is then the ENROLLEE identity, and the node serves it
    nothing but the enrollment calls (which pin the CA and check a token).
    """

    def __init__(self, credentials: Any, *, enrollment: bool = False) -> None:
        self.server = self._context(credentials, ssl.PROTOCOL_TLS_SERVER)
        self.client = self._context(credentials, ssl.PROTOCOL_TLS_CLIENT)
        self.enroll_server: ssl.SSLContext | None = None
        if not enrollment:
            return  # off unless the owner serves the enrollment calls
        # OpenSSL keeps the verify mode of the context a connection started
        # with, so with enrollment on the main context only *asks* for a
        # client certificate (a presented one must still chain to the CA);
        # a connection that is not enrolling and sent none is then refused
        # by PeerVerifier (no_certificate) with the usual verdict. The
        # enrollment context marks which connections asked to enroll.
        self.server.verify_mode = ssl.CERT_OPTIONAL
        self.enroll_server = self._context(credentials, ssl.PROTOCOL_TLS_SERVER)
        self.enroll_server.verify_mode = ssl.CERT_OPTIONAL
        enroll_server = self.enroll_server

        def choose(ssl_object: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
            if server_name == ENROLL_SERVER_NAME:
                ssl_object.context = enroll_server
            return None

        self.server.sni_callback = choose

    @staticmethod
    def _context(credentials: Any, protocol: int) -> ssl.SSLContext:
        context = ssl.SSLContext(protocol)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.maximum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False  # identity is the SPIFFE SAN, checked by PeerVerifier
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=credentials.ca_pem.decode("ascii"))
        if protocol == ssl.PROTOCOL_TLS_SERVER:
            context.num_tickets = 0  # no resumption: every connection proves its certificate
        # The ssl module only loads keys from files: a private 0700 directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="cloudless-tls-") as directory:
            cert_path = os.path.join(directory, "cert.pem")
            key_path = os.path.join(directory, "key.pem")
            for path, data in ((cert_path, credentials.cert_pem), (key_path, credentials.key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
            context.load_cert_chain(cert_path, key_path)
        return context


def _peer_leaf(stream: trio.SSLStream) -> bytes | None:
    return stream.getpeercert(binary_form=True)


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int, buffer: bytearray) -> bytes:
    while len(buffer) < n:
        data = await stream.receive_some()
        if not data:
            raise ConnectionLost("connection closed during the handshake")
        buffer += data
    out = bytes(buffer[:n])
    del buffer[:n]
    return out


async def _send_pending_alert(stream: trio.SSLStream, tcp: trio.abc.Stream) -> None:
    """Deliver the TLS alert OpenSSL queued when it refused the peer.

    trio's SSLStream raises as soon as the handshake fails, leaving the alert
    in its outgoing buffer (a private attribute); without this the client
    would see a bare EOF instead of "certificate expired" / "unknown ca".
    If trio renames the buffer this degrades to that EOF, and the rejection
    tests say so.
    """
    outgoing = getattr(stream, "_outgoing", None)
    if outgoing is None or not getattr(outgoing, "pending", 0):
        return
    with trio.move_on_after(0.5):
        try:
            await tcp.send_all(outgoing.read())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def client_handshake(
    tcp: trio.abc.Stream, contexts: TlsContexts, verifier: Any, address: Address
) -> tuple[trio.SSLStream, PeerIdentity, bytes]:
    """TLS + identity check + the server's verdict. Returns (stream, peer, bytes read past the verdict).

    The caller bounds the time; raises PeerRejected or ConnectionLost.
    """
    stream = trio.SSLStream(_LargeReads(tcp), contexts.client, server_hostname=None)
    try:
        await stream.do_handshake()
        leaf = _peer_leaf(stream)
        peer = verifier.verify_der([leaf] if leaf else [])
        # In place of a hostname check: only nodes serve, so a client
        # certificate (a CLI user's, perhaps stolen) cannot pose as a server.
        if peer.kind != "node":
            raise PeerRejected("bad_identity", f"server presented {peer.uri}, not a node identity")
        buffer = bytearray()
        verdict = await _read_exactly(stream, 1, buffer)
        if verdict == VERDICT_REJECT:
            length = (await _read_exactly(stream, 1, buffer))[0]
            reason_text = (await _read_exactly(stream, length, buffer)).decode("utf-8", "replace")
            reason, _, message = reason_text.partition(" ")
            try:
                raise PeerRejected(  # type: ignore[arg-type]
                    reason,
                    f"{address[0]}:{address[1]} refused our certificate ({reason}): {message}",
                    address=f"{address[0]}:{address[1]}",
                    side="remote",
                )
            except ValueError:
                raise ConnectionLost(f"{address[0]}:{address[1]} refused the connection: {reason_text}") from None
        if verdict != VERDICT_ACCEPT:
            raise ConnectionLost(f"{address[0]}:{address[1]} is not a Cloudless TLS endpoint (bad verdict byte)")
        return stream, peer, bytes(buffer)
    except PeerRejected:
        await trio.aclose_forcefully(stream)
        raise
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        await trio.aclose_forcefully(stream)
        rejected = rejection_from_ssl_error(exc, address=address)
        if rejected is not None:
            raise rejected from exc
        raise ConnectionLost(f"TLS handshake with {address[0]}:{address[1]} failed: {exc!r}") from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def server_handshake(
    tcp: trio.abc.Stream, contexts: TlsContexts, verifier: Any, address: Address
) -> tuple[trio.SSLStream, PeerIdentity]:
    """TLS + identity check + our verdict; raises PeerRejected or ConnectionLost."""
    stream = trio.SSLStream(_LargeReads(tcp), contexts.server, server_side=True)
    try:
        await stream.do_handshake()
        leaf = _peer_leaf(stream)
        if contexts.enroll_server is not None and stream.context is contexts.enroll_server:
            await stream.send_all(VERDICT_ACCEPT)
            return stream, PeerIdentity(getattr(verifier, "cluster_id", ""), ENROLLEE, "anonymous", 0)
        try:
            peer = verifier.verify_der([leaf] if leaf else [])
        except PeerRejected as exc:
            reason = f"{exc.reason} {exc.message}".encode()[:MAX_VERDICT_REASON]
            with trio.move_on_after(1.0):
                await stream.send_all(VERDICT_REJECT + bytes([len(reason)]) + reason)
            raise
        await stream.send_all(VERDICT_ACCEPT)
        return stream, peer
    except PeerRejected:
        await trio.aclose_forcefully(stream)
        raise
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        await _send_pending_alert(stream, tcp)
        await trio.aclose_forcefully(stream)
        rejected = rejection_from_ssl_error(exc, address=address)
        if rejected is not None:
            raise rejected from exc
        raise ConnectionLost(f"TLS handshake with {address[0]}:{address[1]} failed: {exc!r}") from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def open_tcp(address: Address) -> trio.SocketStream:
    try:
        return await trio.open_tcp_stream(address[0], int(address[1]))
    except OSError as exc:
        raise ConnectionLost(f"cannot reach {address[0]}:{address[1]}: {exc.strerror or exc}", address=address) from exc


async def run_detached(setup: Callable[[trio.Nursery], Awaitable[MuxSession]], timeout: float, what: str) -> MuxSession:
    """Set a connection up and host it, for its lifetime, in the run's detached nursery.

    `connect` must return a live Connection without a caller-supplied
    nursery, so the session (and, for WebSocket, trio-websocket's reader)
    runs in `hosting.start_detached`'s nursery. A setup failure (or timeout)
    propagates to this caller; a crash of the running session fails the
    session's streams with the cause and is logged there (see `hosting`).
    """

    async def host(*, task_status: trio.TaskStatus[MuxSession]) -> None:
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(timeout):
                    session = await setup(nursery)
            except Exception as exc:  # raised below, outside the nursery, so the caller gets it unwrapped
                failure = exc
            else:
                task_status.started(session)
                await session.run()
            nursery.cancel_scope.cancel()  # setup's helpers (trio-websocket's reader) end with the session
        if isinstance(failure, trio.TooSlowError):
            raise ConnectionLost(f"handshake with {what} timed out after {timeout} s", timeout=timeout) from failure
        if failure is not None:
            raise failure

    return await hosting.start_detached(host, name=f"connection {what}")


def enrollment_context() -> ssl.SSLContext:
    """A joiner's client context: no certificate of its own, and no trust
    anchor yet. The caller pins the CA from its token and checks the
    server's leaf against it before sending anything secret."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def connect_enrollment(address: Address, timeout: float = 10.0) -> tuple[Connection, bytes | None]:
    """Open an enrollment connection; returns it and the server's leaf (DER, unverified)."""
    address = (address[0], int(address[1]))
    leaf_box: dict[str, bytes | None] = {}

    async def setup(nursery: trio.Nursery) -> MuxSession:
        tcp = await open_tcp(address)
        stream = trio.SSLStream(tcp, enrollment_context(), server_hostname=ENROLL_SERVER_NAME)
        try:
            await stream.do_handshake()
            leaf_box["leaf"] = _peer_leaf(stream)
            buffer = bytearray()
            verdict = await _read_exactly(stream, 1, buffer)
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            await trio.aclose_forcefully(stream)
            raise ConnectionLost(f"enrollment handshake with {address[0]}:{address[1]} failed: {exc!r}") from exc
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if verdict != VERDICT_ACCEPT:
            await trio.aclose_forcefully(stream)
            raise ConnectionLost(f"{address[0]}:{address[1]} refused enrollment")
        unverified = PeerIdentity("", "node", "unverified", 0)
        return MuxSession(stream, is_client=True, peer=unverified, remote_address=address, initial_bytes=bytes(buffer))

    session = await run_detached(setup, timeout, f"enroll {address[0]}:{address[1]}")
    return session, leaf_box.get("leaf")


async def serve_tcp(
    carrier: Any, what: str, serve_one: Callable[[trio.SocketStream], Awaitable[None]], task_status
) -> None:
    """Listen on `carrier.bind` and run `serve_one` for each accepted TCP
    connection in its own task; sets `carrier.local_address` once bound."""
    listeners = await trio.open_tcp_listeners(carrier.bind[1], host=carrier.bind[0])
    address = listeners[0].socket.getsockname()[:2]
    carrier.local_address = (address[0], address[1])
    log.info(f"{what}.listening", extra={"address": f"{address[0]}:{address[1]}"})
    try:
        async with trio.open_nursery() as nursery:

            async def accept_loop(listener: trio.SocketListener) -> None:
                while True:
                    tcp = await listener.accept()
                    nursery.start_soon(serve_one, tcp)

            for listener in listeners:
                nursery.start_soon(accept_loop, listener)
            task_status.started(carrier.local_address)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


class TlsCarrier:
    """Mutually authenticated TLS 1.3 over TCP, multiplexed; implements `base.Carrier`."""

    def __init__(
        self,
        credentials: Any,
        verifier: Any,
        bind: Address = ("127.0.0.1", 0),
        handshake_timeout: float = 5.0,
        *,
        mux_config: MuxConfig | None = None,
        enrollment: bool = False,
    ) -> None:
        self.enrollment = enrollment
        self._contexts = TlsContexts(credentials, enrollment=enrollment)
        self.verifier = verifier
        self.bind = bind
        self.handshake_timeout = handshake_timeout
        self.mux_config = mux_config or MuxConfig()
        self.local_address: Address | None = None
        self.rejected = 0  # handshakes refused by serve, for tests and metrics
        self.rejections: Counter[str] = Counter()  # by reason
        self.accepted = 0
        self.max_pending_handshakes = MAX_PENDING_HANDSHAKES
        self.max_enrollees = MAX_ENROLLEES
        self.enrollee_lifetime = ENROLLEE_LIFETIME
        self.pending_handshakes = 0
        self.enrollees = 0

    def statistics(self) -> dict[str, Any]:
        return {
            "local_address": self.local_address,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejections": dict(self.rejections),
        }

    def update_credentials(self, credentials: Any) -> None:
        """Use renewed credentials for every later handshake."""
        self._contexts = TlsContexts(credentials, enrollment=self.enrollment)

    async def connect(self, address: Address) -> Connection:
        address = (address[0], int(address[1]))

        async def setup(nursery: trio.Nursery) -> MuxSession:
            tcp = await open_tcp(address)
            stream, peer, extra = await client_handshake(tcp, self._contexts, self.verifier, address)
            return MuxSession(
                TlsTransport(stream),
                is_client=True,
                peer=peer,
                remote_address=address,
                config=self.mux_config,
                initial_bytes=extra,
            )

        return await run_detached(setup, self.handshake_timeout, f"{address[0]}:{address[1]}")

    async def serve(self, handler: ConnectionHandler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await serve_tcp(self, "tls", lambda tcp: self._serve_one(tcp, handler), task_status)

    async def _serve_one(self, tcp: trio.SocketStream, handler: ConnectionHandler) -> None:
        try:
            address = tcp.socket.getpeername()[:2]
        except OSError:
            await trio.aclose_forcefully(tcp)
            return
        if self.pending_handshakes >= self.max_pending_handshakes:
            self._refuse("overloaded", address, "too many handshakes in flight")
            await trio.aclose_forcefully(tcp)
            return
        self.pending_handshakes += 1
        try:
            session = await self._accept_handshake(tcp, address)
        finally:
            self.pending_handshakes -= 1
        if session is None:
            return
        if session.peer.kind != ENROLLEE:
            await run_session(session, handler)
            return
        self.enrollees += 1
        try:
            with trio.move_on_after(self.enrollee_lifetime):
                await run_session(session, handler)
        finally:
            self.enrollees -= 1

    def _refuse(self, reason: str, address: Address, why: str) -> None:
        self.rejected += 1
        self.rejections[reason] += 1
        log.warning("tls.refused", extra={"remote": f"{address[0]}:{address[1]}", "reason": reason, "error": why})

    async def _accept_handshake(self, tcp: trio.SocketStream, address: Address) -> MuxSession | None:
        try:
            with trio.fail_after(self.handshake_timeout):
                stream, peer = await server_handshake(tcp, self._contexts, self.verifier, address)
        except trio.TooSlowError:
            self.rejected += 1
            self.rejections["handshake_timeout"] += 1
            log.warning("tls.handshake_timeout", extra={"remote": f"{address[0]}:{address[1]}"})
            await trio.aclose_forcefully(tcp)
            return None
        except PeerRejected as exc:
            self.rejected += 1
            self.rejections[exc.reason] += 1
            log.warning(
                "tls.peer_rejected",
                extra={"remote": f"{address[0]}:{address[1]}", "reason": exc.reason, "error": exc.message},
            )
            return None
        except ConnectionLost as exc:
            self.rejected += 1
            self.rejections["handshake_failed"] += 1
            log.info("tls.handshake_failed", extra={"remote": f"{address[0]}:{address[1]}", "error": exc.message})
            return None
        enrollee = peer.kind == ENROLLEE
        if enrollee and self.enrollees >= self.max_enrollees:
            self._refuse("enrollees_full", address, "too many enrollment connections")
            await trio.aclose_forcefully(stream)
            return None
        self.accepted += 1
        return MuxSession(
            TlsTransport(stream),
            is_client=False,
            peer=peer,
            remote_address=address,
            config=ENROLLEE_MUX if enrollee else self.mux_config,
        )
