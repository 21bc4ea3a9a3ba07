"""Stream multiplexing over one reliable, ordered byte stream (yamux-like).

TLS/TCP (`tls.py`), its WebSocket variant (`websocket.py`) and the memory
twin (`memory.py`) each carry one `MuxSession`, which gives them the same
`Connection`/`Stream` behaviour QUIC has natively (see `base.py`).

Frame: a 10-byte header `type:u8 flags:u8 stream_id:u32 length:u32`
(big-endian), followed by `length` payload bytes for DATA frames only; for
the other types `length` carries the frame's value.

    DATA           payload; flags SYN (first frame of a stream), FIN (half-close)
    WINDOW_UPDATE  length = credit granted to the sender of the stream's data
    RESET          length = application code; aborts the stream both ways
    PING           length = opaque; flag ACK on the answer (stream 0)
    GOAWAY         length = code; the sender opens and accepts no more streams

Streams opened by the connecting side have odd ids, by the accepting side
even ids, so both can open streams without coordination. A stream becomes
visible to the peer with its first DATA frame (like QUIC).

Flow control is per stream and credit based: every stream starts with
`INITIAL_WINDOW` bytes of credit; the receiver grants more as the
application consumes data, so a slow reader holds back a fast writer and
at most `receive_window` bytes per stream are ever buffered. A peer that
sends beyond its credit, sends an oversize frame or breaks the framing is a
protocol error: the session sends GOAWAY and closes. Memory per session is
bounded by `max_streams * receive_window` plus one frame of reassembly and
`max_outbox_bytes` of outgoing data.

Liveness: when nothing has arrived for `keepalive_interval` the session
pings; if still nothing arrives within `keepalive_timeout` the peer is
declared gone and every stream fails with ConnectionLost. A write blocked for
`write_timeout` (the peer reads nothing, although flow control guarantees
its reader can always drain us) also ends the session.

Writing: a sender writes its own frames (and anything queued) straight to
the transport when no write is in progress, else leaves them to the task
that is writing, so concurrent senders share writes; the reader never
writes (it only queues WINDOW_UPDATE/PING answers for the writer task), so
two peers blocked on full socket buffers cannot deadlock each other. Writes
are shielded from cancellation (a half-written TLS record would break every
stream) and bounded by `write_timeout` instead.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from cloudless.transport import hosting
from cloudless.transport.base import ConnectionLost, PeerIdentity, StreamReset, TransportError

log = logging.getLogger(__name__)

HEADER = struct.Struct(">BBII")
HEADER_SIZE = HEADER.size

DATA, WINDOW_UPDATE, RESET, PING, GOAWAY = 0, 1, 2, 3, 4
SYN, FIN, ACK = 0x1, 0x2, 0x4

# Protocol constant: the credit every stream starts with, before any update.
INITIAL_WINDOW = 512 * 1024
MAX_STREAM_ID = 2**32 - 1

GOAWAY_NORMAL = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_UNRESPONSIVE = 2
RESET_CANCELLED = 0
RESET_REFUSED = 0xFFFF_FF00  # too many streams, or the session is going away


class MuxProtocolError(TransportError):
    """The peer broke the framing or flow-control rules; the session is closed."""

    code = "mux_protocol_error"


class ByteTransport(Protocol):
    """What a session rides on: trio.abc.Stream (SSLStream) fits as is."""

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class MuxConfig:
    max_frame_size: int = 256 * 1024  # DATA payload bytes per frame
    receive_window: int = INITIAL_WINDOW  # bytes buffered per stream at most
    max_streams: int = 256  # open streams (incl. not yet accepted) per session
    max_outbox_bytes: int = 1024 * 1024  # queued outgoing DATA before senders wait
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 10.0
    close_timeout: float = 1.0  # how long aclose waits to flush GOAWAY
    write_timeout: float = 20.0  # a write blocked this long means the peer is gone

    def __post_init__(self) -> None:
        if self.receive_window < INITIAL_WINDOW:
            raise ValueError(f"receive_window must be >= {INITIAL_WINDOW}")
        if not 0 < self.max_frame_size < 2**31:
            raise ValueError("max_frame_size out of range")


def encode_frame(kind: int, flags: int, stream_id: int, value: int) -> bytes:
    return HEADER.pack(kind, flags, stream_id, value)


class MuxStream:
    """One stream of a MuxSession; implements `base.Stream`."""

    def __init__(self, session: MuxSession, stream_id: int, *, local: bool) -> None:
        self._session = session
        self._id = stream_id
        self._syn_pending = local  # the peer learns of the stream with our first frame
        self._send_window = INITIAL_WINDOW
        self._fin_sent = False
        self._sending = False  # one sender at a time, as trio.abc.Stream requires
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        # Credit we have granted the peer and not yet seen used.
        self._recv_credit = INITIAL_WINDOW
        self._consumed = 0
        self._fin_received = False
        self._reset: StreamReset | None = None
        self._wakeup = trio.Event()
        self._abort_callback: Callable[[str], None] | None = None

    @property
    def stream_id(self) -> int:
        return self._id

    def __repr__(self) -> str:
        return f"<MuxStream {self._id} of {self._session.peer.uri}>"

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()

    def on_abort(self, callback: Callable[[str], None] | None) -> None:
        """Have `callback(why)` called once if the peer sends anything more
        (data, FIN) or resets the stream, or the connection dies; None removes it.

        Not part of `base.Stream`: the RPC server uses it, when a carrier has
        it, to learn that a client gave up without a watcher task per call.
        """
        self._abort_callback = callback
        if callback is not None:
            if self._reset is not None or self._session._error is not None:
                self._abort("stream reset or connection lost")
            elif self._chunks or self._fin_received:
                self._abort("peer sent more")

    def _abort(self, why: str) -> None:
        callback, self._abort_callback = self._abort_callback, None
        if callback is not None:
            callback(why)

    def _check_sendable(self) -> None:
        if self._reset is not None:
            raise self._reset
        if self._fin_sent:
            raise trio.ClosedResourceError("send_eof was already called on this stream")
        if self._session._error is not None:
            raise self._session._error

    async def send_all(self, data: bytes) -> None:
        await self._send(data, eof=False)

    async def send_last(self, data: bytes) -> None:
        """send_all(data) then send_eof(), with the FIN on the last data frame.

        Not part of `base.Stream`; the RPC layer uses it when a carrier has it
        (one write instead of two for every reply).
        """
        await self._send(data, eof=True)

    async def _send(self, data: bytes, *, eof: bool) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
        if eof and not data:
            await self.send_eof()
            return
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            view = memoryview(data)
            if not view:
                self._check_sendable()
                await trio.lowlevel.checkpoint()
                return
            max_frame = self._session.config.max_frame_size
            session = self._session
            while view:
                self._check_sendable()
                if self._send_window == 0:
                    await self._wakeup.wait()
                    continue
                if session._outbox_bytes >= session.config.max_outbox_bytes:
                    await session._wait_outbox_room()
                    continue  # state may have changed meanwhile
                # From here to the queued frame nothing yields: a cancellation
                # either happens before the frame exists or not at all.
                n = min(len(view), self._send_window, max_frame)
                chunk, view = view[:n], view[n:]
                self._send_window -= n
                flags = self._take_syn_flags()
                if eof and not view:
                    flags |= FIN
                    self._fin_sent = True
                    session._maybe_forget(self)
                session._queue_data(self, flags, chunk)
                await session._flush_from_caller()
        finally:
            self._sending = False

    def _take_syn_flags(self) -> int:
        if self._syn_pending:
            self._syn_pending = False
            return SYN
        return 0

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._fin_sent:
            await trio.lowlevel.checkpoint()
            return
        self._check_sendable()
        self._fin_sent = True
        flags = self._take_syn_flags() | FIN
        # Sent by the writer task, so a sender that follows at once (the
        # next RPC's request) shares the write with it.
        self._session._enqueue(encode_frame(DATA, flags, self._id, 0), control=False, wake=not (flags & SYN))
        if flags & SYN:
            self._session._grant_extra_window(self, ordered=True)
            self._session._outbox_ready.set()
        self._session._maybe_forget(self)
        await trio.lowlevel.checkpoint_if_cancelled()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        while True:
            if self._reset is not None:
                raise self._reset
            if self._chunks:
                chunk = self._chunks.popleft()
                if max_bytes is not None and len(chunk) > max_bytes:
                    self._chunks.appendleft(chunk[max_bytes:])
                    chunk = chunk[:max_bytes]
                self._buffered -= len(chunk)
                self._consumed += len(chunk)
                self._session._maybe_update_window(self)
                await trio.lowlevel.checkpoint_if_cancelled()
                return chunk
            if self._fin_received:
                await trio.lowlevel.checkpoint_if_cancelled()
                return b""
            if self._session._error is not None:
                raise self._session._error
            await self._wakeup.wait()

    async def reset(self, code: int = RESET_CANCELLED) -> None:
        self.reset_nowait(code)
        await trio.lowlevel.checkpoint()

    def reset_nowait(self, code: int = RESET_CANCELLED) -> None:
        """Abort the stream without waiting: safe inside cancelled scopes."""
        if self._reset is not None or (self._fin_sent and self._fin_received):
            return
        self._reset = StreamReset(f"stream {self._id} reset locally", code)
        if not self._syn_pending and self._session._error is None:
            self._session._enqueue(encode_frame(RESET, 0, self._id, code & 0xFFFF_FFFF), control=False)
        self._chunks.clear()
        self._buffered = 0
        self._session._forget(self)
        self._wake()

    async def aclose(self) -> None:
        """Graceful if the peer already finished sending (we send FIN); else reset."""
        if self._reset is None and self._session._error is None:
            if self._fin_received and not self._chunks:
                if not self._fin_sent:
                    await self.send_eof()
                    return
            elif not (self._fin_sent and self._fin_received):
                self.reset_nowait(RESET_CANCELLED)
        await trio.lowlevel.checkpoint_if_cancelled()

    # -- called by the session's reader --

    def _on_data(self, flags: int, payload: bytes) -> None:
        if self._reset is not None:
            return  # in flight when we reset it
        if self._fin_received:
            raise MuxProtocolError(f"data on stream {self._id} after FIN")
        if len(payload) > self._recv_credit:
            raise MuxProtocolError(
                f"stream {self._id} exceeded its flow-control window",
                sent=len(payload),
                credit=self._recv_credit,
            )
        if payload:
            self._recv_credit -= len(payload)
            self._chunks.append(payload)
            self._buffered += len(payload)
        if flags & FIN:
            self._fin_received = True
            self._session._maybe_forget(self)
        self._wake()
        if self._abort_callback is not None:
            self._abort("peer sent more" if payload else "peer closed its side")

    def _on_window_update(self, increment: int) -> None:
        self._send_window += increment
        if self._send_window > 2**31:
            raise MuxProtocolError(f"stream {self._id} window overflow")
        self._wake()

    def _on_reset(self, code: int) -> None:
        if self._reset is not None:
            return
        self._reset = StreamReset(f"stream {self._id} reset by {self._session.peer.uri}", code)
        self._chunks.clear()
        self._buffered = 0
        self._wake()
        self._abort(f"peer reset the stream (code {code})")


class MuxSession:
    """A multiplexed connection over one ByteTransport; implements `base.Connection`.

    The owner runs `await session.run()` (in a nursery, or via
    `start_detached`) for as long as the session lives.
    """

    def __init__(
        self,
        transport: ByteTransport,
        *,
        is_client: bool,
        peer: PeerIdentity,
        remote_address: tuple[str, int],
        config: MuxConfig | None = None,
        initial_bytes: bytes = b"",
    ) -> None:
        self._transport = transport
        self._is_client = is_client
        self._peer = peer
        self._remote_address = remote_address
        self.config = config or MuxConfig()
        self._initial = bytes(initial_bytes)
        self._next_id = 1 if is_client else 2
        self._last_remote_id = 0
        self._skipped_remote_ids: set[int] = set()
        self._streams: dict[int, MuxStream] = {}
        self._accept_queue: deque[MuxStream] = deque()
        self._accept_wakeup = trio.Event()
        self._slot_free = trio.lowlevel.ParkingLot()  # open_stream waiting at max_streams
        self._outbox: list[bytes | memoryview] = []
        self._outbox_bytes = 0
        self._control: list[bytes] = []
        self._outbox_ready = trio.Event()
        self._outbox_drained = trio.Event()
        self._writing = False
        self._error: ConnectionLost | None = None
        self._local_goaway = False
        self._remote_goaway = False
        self._cancel_scope = trio.CancelScope()
        self._finished = trio.Event()
        self._started = False
        self._last_received = trio.current_time()
        self._ping_seq = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._rx = bytearray()  # reassembly: at most one frame plus one read

    # -- Connection interface --

    @property
    def peer(self) -> PeerIdentity:
        return self._peer

    @property
    def remote_address(self) -> tuple[str, int]:
        return self._remote_address

    @property
    def is_closed(self) -> bool:
        return self._error is not None or self._local_goaway or self._remote_goaway

    def __repr__(self) -> str:
        return f"<MuxSession {self._peer.uri} at {self._remote_address}>"

    async def open_stream(self) -> MuxStream:
        await trio.lowlevel.checkpoint_if_cancelled()
        # At the stream limit, wait for a slot (as QUIC waits for stream
        # credit and HTTP/2 clients queue), bounded by the caller's deadline.
        while True:
            if self._error is not None:
                raise self._error
            if self._local_goaway or self._remote_goaway:
                raise ConnectionLost(f"connection to {self._peer.uri} is closing", peer=self._peer.uri)
            if len(self._streams) < self.config.max_streams:
                break
            await self._slot_free.park()
        if self._next_id > MAX_STREAM_ID:
            raise ConnectionLost(f"stream ids to {self._peer.uri} exhausted", peer=self._peer.uri)
        stream = MuxStream(self, self._next_id, local=True)
        self._next_id += 2
        self._streams[stream.stream_id] = stream
        return stream

    async def accept_stream(self) -> MuxStream:
        while True:
            if self._accept_queue:
                stream = self._accept_queue.popleft()
                await trio.lowlevel.checkpoint_if_cancelled()
                return stream
            if self._error is not None:
                raise self._error
            if self._remote_goaway or self._local_goaway:
                raise ConnectionLost(f"connection to {self._peer.uri} is closing", peer=self._peer.uri)
            await self._accept_wakeup.wait()

    async def aclose(self) -> None:
        """Send GOAWAY, give it `close_timeout` to leave, then close the transport."""
        if self._error is None and not self._local_goaway:
            self._local_goaway = True
            self._enqueue(encode_frame(GOAWAY, 0, 0, GOAWAY_NORMAL), control=False)
            self._wake_accept()
            with trio.move_on_after(self.config.close_timeout):
                await self._wait_drained()
        self._fail(ConnectionLost(f"connection to {self._peer.uri} closed locally", peer=self._peer.uri))
        if not self._started:
            await trio.aclose_forcefully(self._transport)  # type: ignore[arg-type]
            return
        with trio.move_on_after(self.config.close_timeout):
            await self._finished.wait()

    def statistics(self) -> dict[str, int]:
        return {
            "open_streams": len(self._streams),
            "pending_accept": len(self._accept_queue),
            "outbox_bytes": self._outbox_bytes,
            "buffered_bytes": sum(s._buffered for s in self._streams.values()),
            "reassembly_bytes": len(self._rx),
            "bytes_sent": self._bytes_sent,
            "bytes_received": self._bytes_received,
        }

    # -- lifecycle --

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the reader, writer and keepalive until the session ends.

        Expected ends (peer gone, protocol error, keepalive timeout) close the
        session quietly. Anything else is a bug: it fails every stream with
        a ConnectionLost caused by it, so the owner sees why, and propagates
        to whoever runs the session.
        """
        self._started = True
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._read_loop)
                    nursery.start_soon(self._guard, self._write_loop)
                    nursery.start_soon(self._guard, self._keepalive_loop)
                    task_status.started()
        except Exception as exc:
            self._fail(ConnectionLost.from_crash(f"connection to {self._peer.uri}", exc, peer=self._peer.uri))
            raise
        finally:
            self._fail(ConnectionLost(f"connection to {self._peer.uri} closed", peer=self._peer.uri))
            await trio.aclose_forcefully(self._transport)  # type: ignore[arg-type]
            self._finished.set()

    async def start_detached(self) -> None:
        """Run the session in the run's detached nursery: for connections made outside any nursery."""
        await hosting.start_detached(self.run, name=f"mux session {self._peer.uri}")

    async def _guard(self, loop) -> None:  # type: ignore[no-untyped-def]
        try:
            await loop()
        except MuxProtocolError as exc:
            log.warning("mux.protocol_error", extra={"peer": self._peer.uri, "error": str(exc)})
            self._enqueue(encode_frame(GOAWAY, 0, 0, GOAWAY_PROTOCOL_ERROR), control=True)
            self._local_goaway = True
            with trio.move_on_after(self.config.close_timeout):
                await self._wait_drained()
            self._fail(ConnectionLost(f"protocol error from {self._peer.uri}: {exc}", peer=self._peer.uri))
        except ConnectionLost as exc:
            self._fail(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(ConnectionLost(f"connection to {self._peer.uri} lost: {exc!r}", peer=self._peer.uri))

    def _fail(self, error: ConnectionLost) -> None:
        if self._error is None:
            self._error = error
            log.debug("mux.session_closed", extra={"peer": self._peer.uri, "reason": error.message})
        for stream in list(self._streams.values()):
            stream._wake()
            stream._abort("connection lost")
        self._streams.clear()
        self._wake_accept()
        self._outbox_ready.set()
        self._outbox_drained.set()
        self._cancel_scope.cancel()

    def _wake_accept(self) -> None:
        # Everything that wakes acceptors (GOAWAY either way, failure) also
        # ends the wait for a stream slot.
        self._accept_wakeup.set()
        self._accept_wakeup = trio.Event()
        self._slot_free.unpark_all()

    # -- sending --

    def _enqueue(self, frame: bytes, *, control: bool, wake: bool = True) -> None:
        """Queue a frame without waiting. Control frames (PING, WINDOW_UPDATE)
        jump the queue; everything stream-ordered goes to the outbox. With
        `wake`, the writer task sends it; else the caller flushes itself."""
        if self._error is not None:
            return
        if control:
            self._control.append(frame)
        else:
            self._outbox.append(frame)
            self._outbox_bytes += len(frame)
        if wake:
            self._outbox_ready.set()

    async def _wait_outbox_room(self) -> None:
        while self._outbox_bytes >= self.config.max_outbox_bytes and self._error is None:
            await self._wait_drained()
        if self._error is not None:
            raise self._error

    def _queue_data(self, stream: MuxStream, flags: int, payload: memoryview) -> None:
        self._outbox.append(encode_frame(DATA, flags, stream.stream_id, len(payload)))
        self._outbox.append(payload)
        self._outbox_bytes += HEADER_SIZE + len(payload)
        if flags & SYN:
            self._grant_extra_window(stream, ordered=True)

    async def _flush_from_caller(self) -> None:
        # Writing from the sending task saves a hop through the writer task;
        # if a write is already in progress, that writer takes our frames.
        if self._writing:
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        await self._flush()
        if self._error is not None:
            raise self._error
        await trio.lowlevel.checkpoint_if_cancelled()

    async def _flush(self) -> None:
        """Write everything queued, in batches. Shielded: a write cut short
        would break the TLS stream for every other stream; bounded by
        `write_timeout` instead (a peer that reads nothing for that long is gone)."""
        self._writing = True
        try:
            while (self._outbox or self._control) and self._error is None:
                parts = self._control + self._outbox
                self._control = []
                self._outbox = []
                self._outbox_bytes = 0
                drained, self._outbox_drained = self._outbox_drained, trio.Event()
                drained.set()  # senders waiting for outbox room may queue more now
                data = b"".join(parts)
                self._bytes_sent += len(data)
                with trio.CancelScope(shield=True, deadline=trio.current_time() + self.config.write_timeout) as scope:
                    try:
                        await self._transport.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        self._fail(ConnectionLost(f"connection to {self._peer.uri} lost: {exc!r}", peer=self._peer.uri))
                        return
                if scope.cancelled_caught:
                    self._fail(
                        ConnectionLost(
                            f"{self._peer.uri} read nothing for {self.config.write_timeout} s", peer=self._peer.uri
                        )
                    )
                    return
        finally:
            self._writing = False
            if not (self._outbox or self._control):
                drained, self._outbox_drained = self._outbox_drained, trio.Event()
                drained.set()

    async def _wait_drained(self) -> None:
        if (self._outbox or self._control) and self._error is None:
            await self._outbox_drained.wait()

    async def _write_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            if self._error is not None:
                return
            if not self._writing:
                await self._flush()

    def _grant_extra_window(self, stream: MuxStream, *, ordered: bool = False) -> None:
        # For a stream we open, the grant must follow its SYN (`ordered`):
        # a peer ignores updates for streams it has not seen.
        extra = self.config.receive_window - INITIAL_WINDOW
        if extra > 0:
            stream._recv_credit += extra
            frame = encode_frame(WINDOW_UPDATE, 0, stream.stream_id, extra)
            self._enqueue(frame, control=not ordered, wake=not ordered)

    def _maybe_update_window(self, stream: MuxStream) -> None:
        # Grant back consumed bytes once half a window's worth accumulates:
        # few updates, yet the sender never stalls for a full round trip.
        if stream._fin_received or stream._consumed < self.config.receive_window // 2:
            return
        increment, stream._consumed = stream._consumed, 0
        stream._recv_credit += increment
        self._enqueue(encode_frame(WINDOW_UPDATE, 0, stream.stream_id, increment), control=True)

    def _maybe_forget(self, stream: MuxStream) -> None:
        if stream._fin_sent and stream._fin_received:
            self._forget(stream)

    def _forget(self, stream: MuxStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self._slot_free.unpark()

    # -- receiving --

    async def _read_loop(self) -> None:
        buf = self._rx = bytearray(self._initial)
        self._initial = b""
        max_frame = self.config.max_frame_size
        while True:
            if buf:
                consumed = self._parse(buf, max_frame)
                if consumed:
                    del buf[:consumed]
            data = await self._transport.receive_some()
            if not data:
                raise ConnectionLost(f"{self._peer.uri} closed the connection", peer=self._peer.uri)
            self._last_received = trio.current_time()
            self._bytes_received += len(data)
            buf += data

    def _parse(self, buf: bytearray, max_frame: int) -> int:
        view = memoryview(buf)  # slices copy once, straight into the payload
        try:
            return self._parse_view(view, max_frame)
        finally:
            view.release()

    def _parse_view(self, buf: memoryview, max_frame: int) -> int:
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            kind, flags, stream_id, value = HEADER.unpack_from(buf, pos)
            if kind == DATA:
                if value > max_frame:
                    raise MuxProtocolError(f"frame of {value} bytes exceeds the {max_frame}-byte limit")
                if end - pos - HEADER_SIZE < value:
                    break
                payload = bytes(buf[pos + HEADER_SIZE : pos + HEADER_SIZE + value])
                pos += HEADER_SIZE + value
                self._on_data(flags, stream_id, payload)
            else:
                pos += HEADER_SIZE
                self._on_control(kind, flags, stream_id, value)
        return pos

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise MuxProtocolError("DATA frame on stream 0")
        if flags & ~(SYN | FIN):
            raise MuxProtocolError(f"unknown DATA flags {flags:#x}")
        stream = self._streams.get(stream_id)
        if stream is None:
            if not flags & SYN:
                return  # a stream we already reset or finished; its data is moot
            self._check_new_remote_id(stream_id)
            stream = MuxStream(self, stream_id, local=False)
            if self._local_goaway or len(self._streams) >= self.config.max_streams:
                self._enqueue(encode_frame(RESET, 0, stream_id, RESET_REFUSED), control=False)
                return
            self._streams[stream_id] = stream
            self._grant_extra_window(stream)
            self._accept_queue.append(stream)
            self._wake_accept()
        elif flags & SYN:
            raise MuxProtocolError(f"SYN on already open stream {stream_id}")
        stream._on_data(flags, payload)

    def _check_new_remote_id(self, stream_id: int) -> None:
        # Streams open lazily (with their first frame), so ids may arrive out
        # of order, as in QUIC; skipped lower ids stay claimable, boundedly.
        if stream_id % 2 != (0 if self._is_client else 1):
            raise MuxProtocolError(f"peer opened stream {stream_id}, which has our parity")
        if stream_id > self._last_remote_id:
            first_skipped = self._last_remote_id + 2 if self._last_remote_id else (2 if self._is_client else 1)
            skipped = range(first_skipped, stream_id, 2)
            if len(skipped) + len(self._skipped_remote_ids) > 2 * self.config.max_streams:
                raise MuxProtocolError(f"peer skipped too many stream ids (jumped to {stream_id})")
            self._skipped_remote_ids.update(skipped)
            self._last_remote_id = stream_id
        elif stream_id in self._skipped_remote_ids:
            self._skipped_remote_ids.discard(stream_id)
        else:
            raise MuxProtocolError(f"peer reused stream id {stream_id}")

    def _on_control(self, kind: int, flags: int, stream_id: int, value: int) -> None:
        if kind == WINDOW_UPDATE:
            if flags:
                raise MuxProtocolError(f"unknown WINDOW_UPDATE flags {flags:#x}")
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream._on_window_update(value)
        elif kind == RESET:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream._on_reset(value)
                self._forget(stream)
        elif kind == PING:
            if stream_id != 0 or flags & ~ACK:
                raise MuxProtocolError("malformed PING")
            if not flags & ACK:
                self._enqueue(encode_frame(PING, ACK, 0, value), control=True)
        elif kind == GOAWAY:
            if stream_id != 0:
                raise MuxProtocolError("GOAWAY on a stream")
            self._remote_goaway = True
            log.debug("mux.goaway_received", extra={"peer": self._peer.uri, "code": value})
            self._wake_accept()
        else:
            raise MuxProtocolError(f"unknown frame type {kind}")

    # -- liveness --

    async def _keepalive_loop(self) -> None:
        interval = self.config.keepalive_interval
        timeout = self.config.keepalive_timeout
        step = min(interval, timeout) / 2
        pinged_at: float | None = None
        while True:
            await trio.sleep(step)
            now = trio.current_time()
            idle = now - self._last_received
            if pinged_at is not None and self._last_received < pinged_at and now - pinged_at >= timeout:
                self._enqueue(encode_frame(GOAWAY, 0, 0, GOAWAY_UNRESPONSIVE), control=True)
                raise ConnectionLost(
                    f"{self._peer.uri} did not answer a keepalive ping within {timeout} s",
                    peer=self._peer.uri,
                )
            if idle >= interval and (pinged_at is None or self._last_received >= pinged_at):
                self._ping_seq = (self._ping_seq + 1) & 0xFFFF_FFFF
                pinged_at = now
                self._enqueue(encode_frame(PING, 0, 0, self._ping_seq), control=True)


async def run_session(session: MuxSession, handler: Callable[[MuxSession], Awaitable[None]]) -> None:
    """Run `handler` on an accepted session; close the session when it returns.

    A handler ending in ConnectionLost is the normal end of a connection.
    Any other error, the handler's or the session's own, is logged with its
    traceback and ends only this connection: one peer's connection must not
    take down the listener that serves every other peer.
    """
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            try:
                await handler(session)
            finally:
                await session.aclose()
    except Exception as exc:
        if not _only_connection_lost(exc):
            log.exception("mux.connection_failed", extra={"peer": session.peer.uri})


def _only_connection_lost(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_connection_lost(inner) for inner in exc.exceptions)
    return isinstance(exc, ConnectionLost)
