"""QUIC carrier: aioquic's sans-IO `QuicConnection` driven from trio.

Shape:

- `UdpEndpoint` (one socket per node) hands every QUIC datagram to
  `QuicCarrier._on_datagram`, which routes it by destination connection ID
  (RFC 9000 §5.2) and feeds it straight into that connection's
  `receive_datagram`; an Initial for an unknown ID starts a server connection.
- One trio task per connection (`QuicPeerConnection._drive`) is the only
  place that calls `handle_timer`, drains `next_event` and sends
  `datagrams_to_send`; everything else just marks the connection as needing
  service and wakes it.
- The handshake requires and verifies certificates on both sides inside TLS
  (`quic_tls_hook`), so a `QuicPeerConnection` only becomes visible (returned
  by `connect`, handed to the `serve` handler) with a verified `peer`. The
  client waits for HANDSHAKE_DONE (RFC 9001 §4.1.2): only then does it know
  the server accepted *its* certificate.

Flow control, both ways bounded:

- send: aioquic buffers whatever it is given, so `send_all` only hands it more
  while the stream's unacknowledged bytes are below `send_buffer`;
- receive: aioquic grants the peer more credit as soon as data *arrives*
  (it doubles MAX_STREAM_DATA), which would let a slow reader's buffer grow
  without bound. `_FlowControlledQuicConnection` grants credit as the
  application *consumes* instead, so a stream never buffers more than
  `stream_window` bytes here (RFC 9000 §4.1).

aioquic internals relied on (pinned by `quic_tls_hook`): the TLS context
subclassing there, `QuicConnection._write_stream_limits` and
`QuicStream.sender._buffer` here.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnectionState
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.rangeset import RangeSet
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudless.pki.errors import InvalidCredentials, PeerRejected
from cloudless.transport import hosting
from cloudless.transport.base import ConnectionHandler, ConnectionLost, PeerIdentity, StreamReset, TransportError
from cloudless.transport.quic_tls_hook import MutualTlsQuicConnection, rejection_from_close
from cloudless.transport.udp import UdpEndpoint

log = logging.getLogger(__name__)

ALPN = "cloudless/1"
CONNECTION_ID_LENGTH = 8
# RFC 9000 §14.1: a server only answers client Initials padded to 1200 bytes.
MIN_INITIAL_SIZE = 1200
DEFAULT_STREAM_WINDOW = 1024 * 1024
DEFAULT_SEND_BUFFER = 1024 * 1024
DEFAULT_MAX_PENDING_HANDSHAKES = 256
SUPPORTED_VERSIONS: list[int] = QuicConfiguration(is_client=False).supported_versions
# Application error code a stream reset carries when nobody gave one.
STREAM_CANCELLED = 0


class _FlowControlledQuicConnection(MutualTlsQuicConnection):
    """Grants stream credit as the application consumes data, not as it arrives."""

    def __init__(self, *, stream_window: int, **kwargs: Any) -> None:
        self.stream_window = stream_window
        self.consumed: dict[int, int] = {}  # stream id -> bytes the application has read
        super().__init__(**kwargs)

    def _write_stream_limits(self, builder, space, stream) -> None:
        if stream.stream_id is None or stream.stream_id & 2:  # unidirectional: unused, keep aioquic's policy
            return super()._write_stream_limits(builder, space, stream)
        target = self.consumed.get(stream.stream_id, 0) + self.stream_window
        # Raise in quarter-window steps so one MAX_STREAM_DATA covers many reads.
        if target - stream.max_stream_data_local >= self.stream_window // 4:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def credit_due(self, stream_id: int) -> bool:
        """Whether `_write_stream_limits` would now raise this stream's MAX_STREAM_DATA."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return False
        target = self.consumed.get(stream_id, 0) + self.stream_window
        return target - stream.max_stream_data_local >= self.stream_window // 4

    def has_stream(self, stream_id: int) -> bool:
        """aioquic still keeps state for the stream (it discards finished ones)."""
        return stream_id in self._streams

    def send_buffered(self, stream_id: int) -> int:
        """Bytes of this stream aioquic holds: unsent plus sent-but-unacknowledged."""
        stream = self._streams.get(stream_id)
        return len(stream.sender._buffer) if stream is not None else 0

    @property
    def close_event(self) -> events.ConnectionTerminated | None:
        """Set as soon as either side closes; aioquic reports it only after the closing period."""
        return self._close_event

    @property
    def handshake_done_sent(self) -> bool:
        """The server wrote HANDSHAKE_DONE into a packet (pacing can hold it back a pass)."""
        return self._handshake_complete and not self._handshake_done_pending

    @property
    def is_terminated(self) -> bool:
        return self._state == QuicConnectionState.TERMINATED


@dataclass(frozen=True, slots=True)
class QuicStreamStatistics:
    stream_id: int
    send_buffered: int  # bytes aioquic holds for us: unsent + unacknowledged
    receive_buffered: int  # bytes received, not yet read by the application
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True, slots=True)
class QuicConnectionStatistics:
    remote_address: tuple[str, int]
    is_client: bool
    established: bool
    closed: bool
    streams_open: int
    streams_opened: int
    streams_accepted: int
    datagrams_sent: int
    datagrams_received: int
    bytes_sent: int  # stream payload
    bytes_received: int
    handshake_seconds: float | None


@dataclass(frozen=True, slots=True)
class QuicCarrierStatistics:
    local_address: tuple[str, int] | None
    connections_open: int
    handshakes_completed: int
    handshakes_failed: int
    handshakes_timed_out: int
    rejected_by_us: dict[str, int]  # PeerRejected reason -> count
    rejected_by_peer: dict[str, int]
    datagrams_unroutable: int
    datagrams_malformed: int
    version_negotiations_sent: int
    handler_errors: int


def _fresh(error: Exception) -> Exception:
    """A new exception like the stored one: re-raising one instance from many tasks would chain their tracebacks."""
    if isinstance(error, StreamReset):
        return StreamReset(error.message, code=error.code)
    if isinstance(error, ConnectionLost):
        fresh = ConnectionLost(error.message, **error.context)
        fresh.__cause__ = error.__cause__  # a crash's cause stays visible to every task
        return fresh
    if isinstance(error, trio.ClosedResourceError):
        return trio.ClosedResourceError(*error.args)
    return ConnectionLost(f"QUIC connection failed: {error}")


class QuicStream:
    """One bidirectional QUIC stream; implements `cloudless.transport.base.Stream`."""

    def __init__(self, connection: QuicPeerConnection, stream_id: int) -> None:
        self._connection = connection
        self._stream_id = stream_id
        self._receive_buffer = bytearray()
        self._receive_eof = False
        self._receive_error: Exception | None = None
        self._send_error: Exception | None = None
        self._eof_sent = False
        self._reset_sent = False
        self._consumed = 0
        self._bytes_sent = 0
        self._receiving = False
        self._sending = False
        self._receive_waiters = trio.lowlevel.ParkingLot()
        self._send_waiters = trio.lowlevel.ParkingLot()

    @property
    def stream_id(self) -> int:
        return self._stream_id

    def statistics(self) -> QuicStreamStatistics:
        return QuicStreamStatistics(
            stream_id=self._stream_id,
            send_buffered=self._connection._quic.send_buffered(self._stream_id),
            receive_buffered=len(self._receive_buffer),
            bytes_sent=self._bytes_sent,
            bytes_received=self._consumed + len(self._receive_buffer),
        )

    def _raise_if_cannot_send(self) -> None:
        if self._send_error is not None:
            raise _fresh(self._send_error)
        if self._connection._error is not None:
            raise _fresh(self._connection._error)
        if self._eof_sent:
            raise trio.ClosedResourceError(f"stream {self._stream_id}: send after send_eof")

    async def send_all(self, data: bytes) -> None:
        if self._sending:
            raise trio.BusyResourceError(f"stream {self._stream_id}: another task is sending")
        self._sending = True
        try:
            connection = self._connection
            quic = connection._quic
            bound = connection._carrier._send_buffer
            view = memoryview(data)
            parked = False
            while True:
                self._raise_if_cannot_send()
                if not view:
                    break
                room = bound - quic.send_buffered(self._stream_id)
                if room <= 0:
                    connection._blocked_writers.add(self)
                    parked = True
                    await self._send_waiters.park()
                    continue
                chunk = view[:room]
                view = view[room:]
                try:
                    quic.send_stream_data(self._stream_id, chunk)
                except RuntimeError:  # aioquic saw STOP_SENDING before the driver turned it into an event
                    self._send_error = StreamReset(f"peer stopped reading stream {self._stream_id}")
                    continue
                self._bytes_sent += len(chunk)
                connection._wake()
            if not parked:
                await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._eof_sent and self._send_error is None and self._connection._error is None:
            await trio.lowlevel.checkpoint()  # trio's HalfCloseableStream: a second EOF is a no-op
            return
        self._raise_if_cannot_send()
        self._send_fin()
        self._connection._forget_if_done(self)
        await trio.lowlevel.checkpoint()

    def _send_fin(self) -> None:
        self._eof_sent = True
        try:
            self._connection._quic.send_stream_data(self._stream_id, b"", end_stream=True)
        except RuntimeError:  # aioquic already reset the send side (STOP_SENDING arrived)
            self._send_error = self._send_error or StreamReset(f"peer stopped reading stream {self._stream_id}")
        self._connection._wake()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError(f"stream {self._stream_id}: another task is receiving")
        self._receiving = True
        try:
            parked = False
            while not self._receive_buffer:
                if self._receive_error is not None:
                    raise _fresh(self._receive_error)
                if self._receive_eof:
                    if not parked:
                        await trio.lowlevel.checkpoint()
                    return b""
                if self._connection._error is not None:
                    raise _fresh(self._connection._error)
                parked = True
                await self._receive_waiters.park()
            if not parked:
                await trio.lowlevel.checkpoint()
            buffer = self._receive_buffer
            size = len(buffer) if max_bytes is None else min(max_bytes, len(buffer))
            if size == len(buffer):
                data = bytes(buffer)
                buffer.clear()
            else:
                data = bytes(buffer[:size])
                del buffer[:size]
            self._consumed += size
            self._connection._consumed(self)
            if self._receive_eof and not buffer:
                self._connection._forget_if_done(self)
            return data
        finally:
            self._receiving = False

    async def reset(self, code: int = STREAM_CANCELLED) -> None:
        """RESET_STREAM and STOP_SENDING (RFC 9000 §3.5): abort both directions."""
        self._abort_locally(code)
        await trio.lowlevel.checkpoint()

    def _abort_locally(self, code: int) -> None:
        connection = self._connection
        quic = connection._quic
        if connection._error is None and not self._reset_sent:
            self._reset_sent = True
            if not self._eof_sent or quic.send_buffered(self._stream_id):
                quic.reset_stream(self._stream_id, code)
            if not self._receive_eof and quic.has_stream(self._stream_id):
                quic.stop_stream(self._stream_id, code)
            connection._wake()
        error = StreamReset(f"stream {self._stream_id} was reset locally", code=code)
        self._send_error = self._send_error or error
        if self._receive_error is None and not (self._receive_eof and not self._receive_buffer):
            self._receive_error = error
        self._receive_buffer.clear()
        self._eof_sent = True
        self._receive_eof = True
        self._wake_all()
        connection._forget(self)

    async def aclose(self) -> None:
        """Finish sending (FIN) and stop receiving (STOP_SENDING) what we will not read."""
        connection = self._connection
        if connection._error is None and self._stream_id in connection._streams:
            quic = connection._quic
            if not self._eof_sent and self._send_error is None:
                self._send_fin()
            if not self._receive_eof and self._receive_error is None and quic.has_stream(self._stream_id):
                quic.stop_stream(self._stream_id, STREAM_CANCELLED)
            connection._wake()
        self._receive_buffer.clear()
        self._eof_sent = self._receive_eof = True
        self._send_error = self._send_error or trio.ClosedResourceError(f"stream {self._stream_id} is closed")
        self._receive_error = self._receive_error or trio.ClosedResourceError(f"stream {self._stream_id} is closed")
        self._wake_all()
        connection._forget(self)
        await trio.lowlevel.checkpoint()

    def _wake_all(self) -> None:
        self._receive_waiters.unpark_all()
        self._send_waiters.unpark_all()


class QuicPeerConnection:
    """A mutually authenticated QUIC connection; implements `cloudless.transport.base.Connection`."""

    def __init__(
        self,
        carrier: QuicCarrier,
        quic: _FlowControlledQuicConnection,
        remote_address: tuple[str, int],
        *,
        is_client: bool,
    ) -> None:
        self._carrier = carrier
        self._quic = quic
        self._remote_address = remote_address
        self._is_client = is_client
        self._streams: dict[int, QuicStream] = {}
        self._peer_streams_seen = RangeSet()  # stream index (id >> 2) of every peer stream ever accepted
        # Unbounded is safe: QUIC's MAX_STREAMS caps how many streams the peer can open (RFC 9000 §4.6).
        self._accept_send, self._accept_receive = trio.open_memory_channel[QuicStream](math.inf)
        self._settled = trio.Event()  # established or failed; what connect() waits for
        self._error: Exception | None = None
        self._peer: PeerIdentity | None = None
        self._needs_service = False
        self._service_waiters = trio.lowlevel.ParkingLot()
        self._blocked_writers: set[QuicStream] = set()
        self._connection_ids: set[bytes] = set()
        self._started_at = trio.current_time()
        self._handshake_deadline = self._started_at + carrier._handshake_timeout
        self._handshake_seconds: float | None = None
        self._next_ping_at = math.inf
        self._handler_pending = False
        self._counts = Counter()

    # -- Connection protocol --------------------------------------------------

    @property
    def peer(self) -> PeerIdentity:
        if self._peer is None:
            raise TransportError("QUIC handshake has not completed", remote=self._remote_address)
        return self._peer

    @property
    def remote_address(self) -> tuple[str, int]:
        return self._remote_address

    @property
    def is_closed(self) -> bool:
        return self._error is not None

    async def open_stream(self) -> QuicStream:
        if self._error is not None:
            raise _fresh(self._error)
        stream_id = self._quic.get_next_available_stream_id()
        # Writing nothing makes aioquic allocate the ID, so the next call gets a new one.
        self._quic.send_stream_data(stream_id, b"")
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        self._counts["streams_opened"] += 1
        await trio.lowlevel.checkpoint()
        return stream

    async def accept_stream(self) -> QuicStream:
        try:
            return await self._accept_receive.receive()
        except trio.EndOfChannel:
            raise _fresh(self._error or ConnectionLost("QUIC connection closed", remote=self._remote_address)) from None

    async def aclose(self) -> None:
        self._abort("closed")
        await trio.lowlevel.checkpoint()

    def _abort(self, reason: str) -> None:
        if self._error is None:
            self._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)
            self._fail(ConnectionLost(f"QUIC connection {reason} locally", remote=self._remote_address))
            self._wake()

    def statistics(self) -> QuicConnectionStatistics:
        return QuicConnectionStatistics(
            remote_address=self._remote_address,
            is_client=self._is_client,
            established=self._peer is not None,
            closed=self._error is not None,
            streams_open=len(self._streams),
            streams_opened=self._counts["streams_opened"],
            streams_accepted=self._counts["streams_accepted"],
            datagrams_sent=self._counts["datagrams_sent"],
            datagrams_received=self._counts["datagrams_received"],
            bytes_sent=sum(s._bytes_sent for s in self._streams.values()) + self._counts["bytes_sent_closed"],
            bytes_received=self._counts["bytes_received"],
            handshake_seconds=self._handshake_seconds,
        )

    # -- driver ---------------------------------------------------------------

    def _wake(self) -> None:
        # The driver clears the flag before each pass and checks it before parking.
        if not self._needs_service:
            self._needs_service = True
            self._service_waiters.unpark_all()

    def _datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._counts["datagrams_received"] += 1
        self._quic.receive_datagram(data, addr, trio.current_time())
        self._wake()

    async def _drive(self) -> None:
        quic = self._quic
        endpoint = self._carrier._endpoint
        try:
            while True:
                self._needs_service = False
                now = trio.current_time()
                timer = quic.get_timer()
                if timer is not None and now >= timer:
                    quic.handle_timer(now)
                if self._peer is None and self._error is None and now >= self._handshake_deadline:
                    self._carrier._counts["handshakes_timed_out"] += 1
                    quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED, reason_phrase="handshake timed out")
                    self._fail(ConnectionLost("QUIC handshake timed out", remote=self._remote_address))
                self._process_events()
                if now >= self._next_ping_at and self._error is None:
                    self._counts["pings_sent"] += 1
                    quic.send_ping(self._counts["pings_sent"])
                    self._next_ping_at = now + self._carrier._keepalive_interval
                datagrams = quic.datagrams_to_send(now)
                for data, addr in datagrams:
                    if not endpoint.send_nowait(data, addr):
                        await endpoint.send(data, addr)
                self._counts["datagrams_sent"] += len(datagrams)
                if self._handler_pending and quic.handshake_done_sent:
                    self._handler_pending = False
                    if self._error is None:
                        self._carrier._spawn_handler(self)
                self._release_writers()
                if quic.is_terminated:
                    self._process_events()
                    return
                if self._needs_service:
                    await trio.lowlevel.checkpoint()
                    continue
                wake_at = quic.get_timer()
                wake_at = math.inf if wake_at is None else wake_at
                if self._peer is None and self._error is None:
                    wake_at = min(wake_at, self._handshake_deadline)
                elif self._error is None:
                    wake_at = min(wake_at, self._next_ping_at)
                with trio.move_on_at(wake_at):
                    await self._service_waiters.park()
        except Exception as exc:
            # A bug: this connection's users see it as the cause; it propagates to the carrier.
            self._fail(ConnectionLost.from_crash("QUIC connection", exc, remote=self._remote_address))
            raise
        finally:
            self._fail(ConnectionLost("QUIC connection terminated", remote=self._remote_address))
            self._carrier._forget(self)

    def _process_events(self) -> None:
        quic = self._quic
        while (event := quic.next_event()) is not None:
            kind = type(event)
            if kind is events.StreamDataReceived:
                self._on_stream_data(event)
            elif kind is events.StreamReset:
                stream = self._stream_for_event(event.stream_id)
                if stream is not None:
                    stream._receive_error = StreamReset(f"peer reset stream {event.stream_id}", code=event.error_code)
                    stream._receive_buffer.clear()
                    stream._receive_waiters.unpark_all()
            elif kind is events.StopSendingReceived:
                stream = self._stream_for_event(event.stream_id)
                if stream is not None:
                    stream._send_error = StreamReset(
                        f"peer stopped reading stream {event.stream_id}", code=event.error_code
                    )
                    stream._send_waiters.unpark_all()
            elif kind is events.ConnectionIdIssued:
                self._connection_ids.add(event.connection_id)
                self._carrier._routes[event.connection_id] = self
            elif kind is events.ConnectionIdRetired:
                self._connection_ids.discard(event.connection_id)
                if self._carrier._routes.get(event.connection_id) is self:
                    del self._carrier._routes[event.connection_id]
            elif kind is events.HandshakeCompleted:
                if event.alpn_protocol != ALPN:
                    quic.close(
                        error_code=QuicErrorCode.CRYPTO_ERROR + 120,  # no_application_protocol
                        reason_phrase=f"ALPN {ALPN} required",
                    )
                    self._fail(ConnectionLost(f"peer did not negotiate ALPN {ALPN}", remote=self._remote_address))
                elif not self._is_client:
                    self._establish()
            elif kind is events.ConnectionTerminated:
                self._on_close(event)
        if self._error is None:
            # Confirmation first: HANDSHAKE_DONE and a CONNECTION_CLOSE may arrive in one batch.
            if self._is_client and self._peer is None and quic.handshake_confirmed:
                self._establish()
            close_event = quic.close_event
            if close_event is not None:
                self._on_close(close_event)

    def _establish(self) -> None:
        peer = self._quic.peer_identity
        if peer is None:  # unreachable while the TLS hook is installed; never trust an unverified peer
            self._quic.close(error_code=QuicErrorCode.CRYPTO_ERROR + 116, reason_phrase="peer not verified")
            self._fail(ConnectionLost("peer completed the handshake unverified", remote=self._remote_address))
            return
        self._peer = peer
        self._handshake_seconds = trio.current_time() - self._started_at
        if self._carrier._keepalive_interval is not None:
            # PINGs keep an idle but wanted connection from reaching the idle timeout (RFC 9000 §10.1.2).
            self._next_ping_at = trio.current_time() + self._carrier._keepalive_interval
        self._carrier._counts["handshakes_completed"] += 1
        self._settled.set()
        log.info(
            "quic.established",
            extra={"peer": peer.uri, "remote": self._remote_address, "handshake_s": self._handshake_seconds},
        )
        # The server hands the connection to its handler only once a flush has sent
        # HANDSHAKE_DONE: a handler that closes at once must not leave the client unconfirmed.
        self._handler_pending = not self._is_client

    def _on_close(self, event: events.ConnectionTerminated) -> None:
        if self._error is not None:
            return
        ours = self._quic.local_rejection
        if ours is not None:
            error: Exception = PeerRejected(
                ours.reason,  # type: ignore[arg-type]
                f"rejected the certificate of {self._remote_address[0]}:{self._remote_address[1]}: {ours.message}",
                rejected_by="us",
            )
            self._carrier._counts["rejected_by_us"][ours.reason] += 1
        else:
            theirs = rejection_from_close(event.error_code, event.reason_phrase)
            if theirs is not None:
                error = theirs
                self._carrier._counts["rejected_by_peer"][theirs.reason] += 1
            else:
                error = ConnectionLost(
                    f"QUIC connection to {self._remote_address[0]}:{self._remote_address[1]} closed: "
                    f"{event.reason_phrase or 'no reason'} (code 0x{event.error_code:x})",
                    remote=self._remote_address,
                    error_code=event.error_code,
                )
        if self._peer is None:
            self._carrier._counts["handshakes_failed"] += 1
        log.info("quic.closed", extra={"remote": self._remote_address, "error": str(error)})
        self._fail(error)

    def _fail(self, error: Exception) -> None:
        if self._error is not None:
            return
        self._error = error
        for stream in list(self._streams.values()):
            stream._wake_all()
        self._blocked_writers.clear()
        self._accept_send.close()
        self._settled.set()

    def _stream_for_event(self, stream_id: int) -> QuicStream | None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        if stream_id & 2:  # unidirectional: Cloudless does not use them
            return None
        if (stream_id & 1) == (0 if self._is_client else 1):  # ours, already forgotten
            return None
        index = stream_id >> 2
        if index in self._peer_streams_seen or self._error is not None:
            return None
        self._peer_streams_seen.add(index)
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        self._counts["streams_accepted"] += 1
        self._accept_send.send_nowait(stream)
        return stream

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        stream = self._stream_for_event(event.stream_id)
        if stream is None or stream._receive_eof:
            return
        if event.data:
            stream._receive_buffer += event.data
            self._counts["bytes_received"] += len(event.data)
        if event.end_stream:
            stream._receive_eof = True
        stream._receive_waiters.unpark_all()

    def _consumed(self, stream: QuicStream) -> None:
        quic = self._quic
        quic.consumed[stream.stream_id] = stream._consumed
        # Wake the driver only when a MAX_STREAM_DATA is due, not for every read.
        if quic.credit_due(stream.stream_id):
            self._wake()

    def _release_writers(self) -> None:
        if not self._blocked_writers:
            return
        bound = self._carrier._send_buffer
        for stream in list(self._blocked_writers):
            if (
                stream._send_error is not None
                or self._error is not None
                or (self._quic.send_buffered(stream.stream_id) < bound)
            ):
                self._blocked_writers.discard(stream)
                stream._send_waiters.unpark_all()

    def _forget_if_done(self, stream: QuicStream) -> None:
        if stream._eof_sent and stream._receive_eof and not stream._receive_buffer:
            self._forget(stream)

    def _forget(self, stream: QuicStream) -> None:
        if self._streams.pop(stream.stream_id, None) is not None:
            self._counts["bytes_sent_closed"] += stream._bytes_sent
            stream._bytes_sent = 0
        self._blocked_writers.discard(stream)
        self._quic.consumed.pop(stream.stream_id, None)


def _load_certificates(credentials: Any) -> tuple[x509.Certificate, list[x509.Certificate], Any]:
    try:
        chain = x509.load_pem_x509_certificates(credentials.cert_pem)
        key = serialization.load_pem_private_key(credentials.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidCredentials(f"QUIC carrier credentials do not parse: {exc}") from exc
    return chain[0], list(chain[1:]), key


async def _resolve(address: tuple[str, int]) -> tuple[str, int]:
    host, port = address
    try:
        ipaddress.ip_address(host)
        return host, int(port)
    except ValueError:
        pass
    with trio.fail_after(5.0):
        infos = await trio.socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    if not infos:
        raise ConnectionLost(f"cannot resolve {host}", address=address)
    return infos[0][4][0], infos[0][4][1]


class QuicCarrier:
    """Makes and accepts mutually authenticated QUIC connections (ALPN `cloudless/1`).

    Run it as a service: `await nursery.start(carrier.run)` (or
    `carrier.serve(handler)` to also accept connections, or
    `async with carrier:` for a client) before `connect`. With `endpoint`
    given, the carrier shares that already-running socket (gossip beside it);
    otherwise it binds its own on `bind`.

    `credentials` needs `cert_pem` and `key_pem` (a `pki.credentials.Credentials`);
    `verifier` needs `verify(chain) -> PeerIdentity` (a `pki.verify.PeerVerifier`).
    `stream_window` bounds what one stream buffers unread on the receiving side,
    `send_buffer` what it holds unacknowledged on the sending side.
    `max_datagram_size` defaults to aioquic's 1200 bytes, safe on any path
    (aioquic has no path-MTU discovery). `keepalive_interval` sends PINGs so
    an idle connection outlives `idle_timeout`.
    """

    def __init__(
        self,
        credentials: Any,
        verifier: Any,
        endpoint: UdpEndpoint | None = None,
        bind: tuple[str, int] = ("127.0.0.1", 0),
        handshake_timeout: float = 5.0,
        idle_timeout: float = 30.0,
        *,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        send_buffer: int = DEFAULT_SEND_BUFFER,
        max_datagram_size: int | None = None,
        max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES,
        keepalive_interval: float | None = None,
    ) -> None:
        self._certificate, self._certificate_chain, self._private_key = _load_certificates(credentials)
        self._verifier = verifier
        self._owns_endpoint = endpoint is None
        self._endpoint = endpoint if endpoint is not None else UdpEndpoint(*bind)
        self._handshake_timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self._stream_window = stream_window
        self._send_buffer = send_buffer
        self._max_datagram_size = max_datagram_size
        self._max_pending_handshakes = max_pending_handshakes
        if keepalive_interval is not None and not 0 < keepalive_interval < idle_timeout:
            raise ValueError("keepalive_interval must be between 0 and idle_timeout")
        self._keepalive_interval = keepalive_interval
        self._handler: ConnectionHandler | None = None
        self._nursery: trio.Nursery | None = None
        self._routes: dict[bytes, QuicPeerConnection] = {}
        self._connections: set[QuicPeerConnection] = set()
        self._counts: dict[str, Any] = Counter()
        self._counts["rejected_by_us"] = Counter()
        self._counts["rejected_by_peer"] = Counter()
        self._context_cm: Any = None
        self._detached_scope: trio.CancelScope | None = None

    @property
    def local_address(self) -> tuple[str, int]:
        return self._endpoint.local_address

    def update_credentials(self, credentials: Any) -> None:
        """Present renewed credentials on every connection made or accepted from now on."""
        self._certificate, self._certificate_chain, self._private_key = _load_certificates(credentials)

    @property
    def endpoint(self) -> UdpEndpoint:
        return self._endpoint

    def statistics(self) -> QuicCarrierStatistics:
        return QuicCarrierStatistics(
            local_address=self._endpoint.local_address if self._endpoint.is_bound else None,
            connections_open=sum(1 for c in self._connections if not c.is_closed),
            handshakes_completed=self._counts["handshakes_completed"],
            handshakes_failed=self._counts["handshakes_failed"],
            handshakes_timed_out=self._counts["handshakes_timed_out"],
            rejected_by_us=dict(self._counts["rejected_by_us"]),
            rejected_by_peer=dict(self._counts["rejected_by_peer"]),
            datagrams_unroutable=self._counts["datagrams_unroutable"],
            datagrams_malformed=self._counts["datagrams_malformed"],
            version_negotiations_sent=self._counts["version_negotiations_sent"],
            handler_errors=self._counts["handler_errors"],
        )

    # -- service --------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the carrier (and its socket, if it owns one) until cancelled."""
        if self._nursery is not None:
            raise TransportError("QuicCarrier is already running")
        async with trio.open_nursery() as nursery:
            if self._owns_endpoint:
                await nursery.start(self._endpoint.run)
            else:
                await self._endpoint.wait_bound()
            self._nursery = nursery
            self._endpoint.set_quic_handler(self._on_datagram)
            reason = ConnectionLost("QUIC carrier shut down")
            try:
                task_status.started(self._endpoint.local_address)
                await trio.sleep_forever()
            except BaseException as exc:
                if isinstance(exc, Exception):
                    # A connection's driver crashed (a bug): it propagates to our owner, and
                    # every connection fails with it as the cause, so their users see why.
                    reason = ConnectionLost.from_crash("QUIC carrier", exc)
                raise
            finally:
                self._endpoint.set_quic_handler(None)
                self._nursery = None
                await self._close_all(reason)
                nursery.cancel_scope.cancel()

    async def serve(self, handler: ConnectionHandler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections, running `handler(connection)` for each verified peer.

        Starts the carrier, or, if it already runs (`async with carrier`), starts accepting on it.
        """
        if self._handler is not None:
            raise TransportError("QuicCarrier is already serving")
        self._handler = handler
        try:
            if self._nursery is None:
                await self.run(task_status=task_status)
            else:
                task_status.started(self._endpoint.local_address)
                await trio.sleep_forever()
        finally:
            self._handler = None

    async def __aenter__(self) -> QuicCarrier:
        self._context_cm = trio.open_nursery()
        nursery = await self._context_cm.__aenter__()
        try:
            await nursery.start(self.run)
        except BaseException:
            nursery.cancel_scope.cancel()
            await self._context_cm.__aexit__(None, None, None)
            raise
        self._context_nursery = nursery
        return self

    async def _start_detached(self) -> None:
        """Run the carrier in the run's detached nursery, for connections made outside any nursery (as the TLS carrier allows).

        A node runs its carrier in its own nursery instead; `aclose()` stops a detached one.
        """
        if self._detached_scope is not None or not self._owns_endpoint:
            raise TransportError("QuicCarrier is not running: start it with nursery.start(carrier.run)")
        self._detached_scope = trio.CancelScope()
        await hosting.start_detached(self._run_detached, name="quic carrier (detached)")

    async def _run_detached(self, *, task_status: trio.TaskStatus[None]) -> None:
        assert self._detached_scope is not None
        with self._detached_scope:
            await self.run(task_status=task_status)

    async def aclose(self) -> None:
        """Stop a carrier that `connect` started detached; closes its connections."""
        if self._detached_scope is not None:
            self._detached_scope.cancel()
        await trio.lowlevel.checkpoint()

    async def __aexit__(self, *exc_info) -> bool | None:
        self._context_nursery.cancel_scope.cancel()
        return await self._context_cm.__aexit__(*exc_info)

    async def _close_all(self, reason: ConnectionLost) -> None:
        """Tell every peer we are going (CONNECTION_CLOSE), briefly, shielded from the cancellation."""
        with trio.CancelScope(shield=True), trio.move_on_after(0.5):
            now = trio.current_time()
            for connection in list(self._connections):
                if not connection._quic.is_terminated:
                    connection._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="carrier shutting down")
                    if self._endpoint.is_bound:
                        for data, addr in connection._quic.datagrams_to_send(now):
                            await self._endpoint.send(data, addr)
                error = ConnectionLost(reason.message, remote=connection.remote_address)
                error.__cause__ = reason.__cause__
                connection._fail(error)

    # -- connections ----------------------------------------------------------

    def _configuration(self, *, is_client: bool) -> QuicConfiguration:
        configuration = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            connection_id_length=CONNECTION_ID_LENGTH,
            idle_timeout=self._idle_timeout,
            max_stream_data=self._stream_window,
            max_data=self._stream_window * 4,
        )
        if self._max_datagram_size is not None:
            configuration.max_datagram_size = self._max_datagram_size
        configuration.certificate = self._certificate
        configuration.certificate_chain = self._certificate_chain
        configuration.private_key = self._private_key
        return configuration

    def _new_quic(self, *, is_client: bool, **kwargs: Any) -> _FlowControlledQuicConnection:
        return _FlowControlledQuicConnection(
            configuration=self._configuration(is_client=is_client),
            verify_peer=self._verify_server_chain if is_client else self._verify_chain,
            stream_window=self._stream_window,
            **kwargs,
        )

    def _verify_chain(self, chain: Sequence[x509.Certificate]) -> PeerIdentity:
        return self._verifier.verify(chain)

    def _verify_server_chain(self, chain: Sequence[x509.Certificate]) -> PeerIdentity:
        # In place of a hostname check: only nodes serve, so a client certificate
        # (a CLI user's) must not be able to pose as a server.
        peer = self._verifier.verify(chain)
        if peer.kind != "node":
            raise PeerRejected("bad_identity", f"server presented {peer.uri}, not a node identity")
        return peer

    def _register(self, connection: QuicPeerConnection, *connection_ids: bytes) -> None:
        assert self._nursery is not None
        for cid in connection_ids:
            connection._connection_ids.add(cid)
            self._routes[cid] = connection
        self._connections.add(connection)
        self._nursery.start_soon(connection._drive)

    def _forget(self, connection: QuicPeerConnection) -> None:
        self._connections.discard(connection)
        for cid in connection._connection_ids:
            if self._routes.get(cid) is connection:
                del self._routes[cid]
        connection._connection_ids.clear()

    async def connect(self, address: tuple[str, int]) -> QuicPeerConnection:
        """Connect and verify the server; raises PeerRejected or ConnectionLost within the handshake timeout."""
        if self._nursery is None:
            await self._start_detached()
        address = await _resolve(address)
        quic = self._new_quic(is_client=True)
        quic.connect(address, now=trio.current_time())
        connection = QuicPeerConnection(self, quic, address, is_client=True)
        self._register(connection, quic.host_cid)
        try:
            with trio.move_on_after(self._handshake_timeout + 0.5):
                await connection._settled.wait()
        except BaseException:
            connection._abort("connect() was cancelled")
            raise
        if connection._peer is not None:
            return connection  # established, even if the server has closed it since (its handler's choice)
        if connection._error is not None:
            raise connection._error
        if connection._peer is None:  # the driver enforces the deadline; this is the backstop
            connection._abort("handshake timed out")
            raise ConnectionLost("QUIC handshake timed out", remote=address)
        return connection

    def _spawn_handler(self, connection: QuicPeerConnection) -> None:
        if self._nursery is None or self._handler is None:
            connection._quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED, reason_phrase="not accepting")
            connection._fail(ConnectionLost("carrier is not accepting connections"))
            return
        self._nursery.start_soon(self._run_handler, self._handler, connection)

    async def _run_handler(self, handler: ConnectionHandler, connection: QuicPeerConnection) -> None:
        try:
            await handler(connection)
        except (ConnectionLost, PeerRejected, StreamReset) as exc:
            log.debug("quic.handler_ended", extra={"peer": connection.peer.uri, "error": str(exc)})
        except Exception:
            # One handler's bug must not take down the listener; it is logged and counted.
            self._counts["handler_errors"] += 1
            log.exception("quic.handler_failed", extra={"peer": connection._peer and connection._peer.uri})
        finally:
            await connection.aclose()

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data[0] & 0x80:  # short header (RFC 9000 §17.3): the DCID follows the first byte
            connection = self._routes.get(data[1 : 1 + CONNECTION_ID_LENGTH])
            if connection is not None:
                connection._datagram_received(data, addr)
            else:
                self._counts["datagrams_unroutable"] += 1
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except ValueError:
            self._counts["datagrams_malformed"] += 1
            return
        connection = self._routes.get(header.destination_cid)
        if connection is not None:
            connection._datagram_received(data, addr)
            return
        if header.packet_type is QuicPacketType.ONE_RTT or self._handler is None or len(data) < MIN_INITIAL_SIZE:
            self._counts["datagrams_unroutable"] += 1
            return
        supported = SUPPORTED_VERSIONS
        if header.version not in supported:
            if header.version:  # never answer a version negotiation with one (RFC 9000 §6.1)
                self._counts["version_negotiations_sent"] += 1
                packet = encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=supported,
                )
                self._nursery.start_soon(self._endpoint.send, packet, addr)
            return
        if header.packet_type is not QuicPacketType.INITIAL or len(header.destination_cid) < 8:
            self._counts["datagrams_unroutable"] += 1
            return
        pending = sum(1 for c in self._connections if c._peer is None and c._error is None)
        if pending >= self._max_pending_handshakes:
            self._counts["datagrams_unroutable"] += 1
            log.warning("quic.handshake_backlog_full", extra={"remote": addr, "pending": pending})
            return
        quic = self._new_quic(is_client=False, original_destination_connection_id=header.destination_cid)
        connection = QuicPeerConnection(self, quic, addr, is_client=False)
        self._register(connection, header.destination_cid, quic.host_cid)
        connection._datagram_received(data, addr)
