"""RPC over any carrier's Connection: request/response and server streams.

Server:

    server = RpcServer()

    @server.unary("vars.get", request=GetVar)          # request type optional
    async def get_var(ctx: RpcContext, req: GetVar) -> VarValue:
        if ...: raise NotFound(f"no variable {req.key}")
        return VarValue(...)                            # Struct, msgspec-encodable or bytes

    @server.stream("logs.follow", request=Follow)
    async def follow(ctx: RpcContext, req: Follow) -> None:
        async for line in ...:
            await ctx.send(LogLine(...))                # blocks while the client is slow

    @server.duplex("exec", request=Start, input=Input)  # both sides stream
    async def exec_(ctx: RpcContext, req: Start) -> None:
        while (msg := await ctx.receive()) is not None:  # None: the client sent its End
            await ctx.send(Output(...))

    await server.serve(carrier, task_status=...)        # or: carrier.serve(server.serve_connection)

Client:

    client = RpcClient(carrier)                         # one pooled connection per address
    value = await client.call(address_or_conn, "vars.get", GetVar(key="a"), response=VarValue, timeout=5)
    async with client.stream(address, "logs.follow", Follow(...), item=LogLine) as items:
        async for line in items:
            ...
    async with client.duplex(address, "exec", Start(...), item=Output) as call:
        await call.send(Input(...)); await call.end()   # from one task...
        async for out in call: ...                      # ...while another reads

Bodies: bytes travel as they are; anything else is msgspec-msgpack encoded.
With `request=`/`response=`/`item=` types the receiving side decodes and
validates (a body that does not decode is InvalidInput); without, it gets the
raw bytes.

Semantics:

- Each RPC uses its own stream. Wire: length-prefixed (u32, at most
  `max_frame_size`) msgpack frames; the client sends one `Request` and keeps
  its side open; the server answers `Reply` or `Failure` (unary), or
  `Item`s then `End` or `Failure` (stream), then EOF; the client then sends
  EOF. Keeping the client's side open is what lets the server notice a
  cancelled client on any carrier: a reset (or early EOF) cancels the handler.
- Duplex calls: after its `Request` the client sends `Item`s and one `End`
  while the server streams its own; the server pulls the client's items only
  as the handler asks for them (`ctx.receive()`), so carrier flow control is
  the backpressure both ways. An EOF or reset from the client before the
  server's answer cancels the handler, as for the other kinds.
- Deadlines propagate: the request carries the time left; the server runs
  the handler under that deadline (so it is cancelled when the client would
  give up anyway). The client raises `DeadlineExceeded` (exit code 5).
- Cancelling the caller resets the stream; the server cancels the handler.
- Errors come back typed: a handler's CloudlessError is re-raised on the
  client as the class of the same exit code (InvalidInput, NotFound,
  Conflict, Unavailable, CloudlessError) with the remote `code`, message and
  context. Other exceptions become a generic "internal" error (logged on the
  server with its traceback).
- `ctx.peer` is the caller's verified identity; `ctx.deadline`/`ctx.time_left`
  the call's deadline (trio clock); `ctx.cancel_scope` the scope the handler
  runs in.
- A call's failure never takes its connection down; a server reads each
  request within `request_timeout` and each frame is at most `max_frame_size`.
- Carrier fast paths, used when the stream has them (mux streams do; QUIC
  streams use the generic path): `send_last(data)` (data and FIN in one
  write) and `on_abort(callback)` (learn of a client giving up without a
  watcher task per call).
"""

from __future__ import annotations

import inspect
import logging
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec
import trio

from cloudless.errors import CloudlessError, Conflict, InvalidInput, NotFound, Unavailable
from cloudless.transport.base import Carrier, Connection, ConnectionLost, PeerIdentity, Stream, StreamReset

log = logging.getLogger(__name__)

T = TypeVar("T")
Address = tuple[str, int]

DEFAULT_TIMEOUT = 10.0
MAX_FRAME_SIZE = 16 * 1024 * 1024
MAX_METHOD_LENGTH = 128
REQUEST_READ_TIMEOUT = 10.0  # a client must deliver its request this fast
CLOSE_TIMEOUT = 5.0  # how long a server waits for the client's EOF after answering
RESET_PROTOCOL_ERROR = 2
_LENGTH = struct.Struct(">I")


# -- wire --


class Request(msgspec.Struct, tag="req", array_like=True, frozen=True):
    method: str
    timeout: float | None  # seconds left at the caller; None: no deadline
    body: bytes
    # The caller's signature over (method, body), passed on when a node
    # forwards the call (cloudless.authz.proof); empty from nodes.
    proof: bytes = b""


class Reply(msgspec.Struct, tag="rep", array_like=True, frozen=True):
    body: bytes


class Item(msgspec.Struct, tag="item", array_like=True, frozen=True):
    body: bytes


class End(msgspec.Struct, tag="end", array_like=True, frozen=True):
    pass


class Failure(msgspec.Struct, tag="fail", array_like=True, frozen=True):
    code: str
    exit_code: int
    message: str
    context: dict[str, str] = {}


Frame = Request | Reply | Item | End | Failure

_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(Frame)


# -- errors --


class RpcError(CloudlessError):
    code = "rpc_error"


class RpcProtocolError(RpcError, InvalidInput):
    """The other side broke the RPC framing (bad frame, oversize, wrong order)."""

    code = "rpc_protocol_error"


class UnknownMethod(InvalidInput):
    code = "unknown_method"


class DeadlineExceeded(Unavailable):
    code = "deadline_exceeded"


class RpcCancelled(Unavailable):
    """The server gave up on the call: the client reset the stream or the server is closing."""

    code = "cancelled"


_BY_CODE: dict[str, type[CloudlessError]] = {
    cls.code: cls for cls in (UnknownMethod, DeadlineExceeded, RpcCancelled, RpcProtocolError)
}
_BY_EXIT_CODE: dict[int, type[CloudlessError]] = {
    1: CloudlessError,
    2: InvalidInput,
    3: NotFound,
    4: Conflict,
    5: Unavailable,
}


def failure_of(error: CloudlessError) -> Failure:
    return Failure(
        code=str(error.code),
        exit_code=int(error.exit_code),
        message=error.message,
        context={str(k): str(v) for k, v in error.context.items()},
    )


def error_of(failure: Failure, method: str, peer: str) -> CloudlessError:
    """Rebuild a remote error as the local class with the same exit code."""
    cls = _BY_CODE.get(failure.code) or _BY_EXIT_CODE.get(failure.exit_code, CloudlessError)
    error = cls(failure.message, **failure.context)
    error.code = failure.code  # keep the remote's precise code (e.g. "peer_rejected")
    error.context.setdefault("method", method)
    error.context.setdefault("peer", peer)
    return error


def encode_body(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return _encoder.encode(value)


def decode_body(body: bytes, kind: Any, what: str) -> Any:
    if kind is None or kind is bytes:
        return body
    try:
        return msgspec.msgpack.decode(body, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidInput(f"{what} does not decode: {exc}") from exc


def encode_frame(frame: Frame, max_size: int = MAX_FRAME_SIZE) -> bytes:
    payload = _encoder.encode(frame)
    if len(payload) > max_size:
        raise InvalidInput(f"RPC message of {len(payload)} bytes exceeds the {max_size}-byte limit")
    return _LENGTH.pack(len(payload)) + payload


class FrameReader:
    """Length-prefixed frames off a Stream, each at most `max_size` bytes."""

    def __init__(self, stream: Stream, max_size: int = MAX_FRAME_SIZE) -> None:
        self._stream = stream
        self._max = max_size
        self._buffer = bytearray()
        self.eof = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def read(self) -> Frame | None:
        """Next frame, or None at a clean EOF between frames."""
        while True:
            if len(self._buffer) >= 4:
                (length,) = _LENGTH.unpack_from(self._buffer)
                if length > self._max:
                    raise RpcProtocolError(f"RPC frame of {length} bytes exceeds the {self._max}-byte limit")
                if len(self._buffer) >= 4 + length:
                    view = memoryview(self._buffer)
                    payload = view[4 : 4 + length]  # decoded in place; bytes fields are copied out
                    try:
                        return _frame_decoder.decode(payload)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        raise RpcProtocolError(f"malformed RPC frame: {exc}") from None
                    finally:
                        payload.release()
                        view.release()
                        del self._buffer[: 4 + length]
            if self.eof:
                if self._buffer:
                    raise RpcProtocolError("stream ended inside an RPC frame")
                return None
            data = await self._stream.receive_some()
            if not data:
                self.eof = True
            else:
                self._buffer += data


_STREAM_GONE = (ConnectionLost, StreamReset, trio.BrokenResourceError, trio.ClosedResourceError)


def _only(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """True if `exc`, or every leaf of an exception group, is one of `types`."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(inner, types) for inner in exc.exceptions)
    return isinstance(exc, types)


async def send_last(stream: Stream, data: bytes) -> None:
    """Data then EOF; one write on carriers whose streams offer `send_last`."""
    fast = getattr(stream, "send_last", None)
    if fast is not None:
        await fast(data)
    else:
        await stream.send_all(data)
        await stream.send_eof()


async def _reset_quietly(stream: Stream, code: int = 0) -> None:
    with trio.CancelScope(shield=True):
        with trio.move_on_after(1.0):
            try:
                await stream.reset(code)
            except (CloudlessError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass


# -- server --


@dataclass
class RpcContext:
    """What a handler knows about its call."""

    peer: PeerIdentity
    method: str
    deadline: float  # trio.current_time() by which the handler is cancelled; inf: none
    cancel_scope: trio.CancelScope = field(repr=False)
    _stream: Stream = field(repr=False)
    _max_frame: int = field(repr=False, default=MAX_FRAME_SIZE)
    items_sent: int = 0
    # Who the call acts for, as the server's `authorize` hook decided (None without one).
    principal: Any = None
    # The request as sent and its caller proof: what a forwarder passes on unchanged.
    raw_body: bytes = field(repr=False, default=b"")
    proof: bytes = field(repr=False, default=b"")
    _inputs: trio.MemoryReceiveChannel | None = field(repr=False, default=None)
    _input_type: Any = field(repr=False, default=None)

    @property
    def time_left(self) -> float:
        return self.deadline - trio.current_time()

    async def send(self, item: Any) -> None:
        """Send one item of a streamed response (flow-controlled)."""
        await self._stream.send_all(encode_frame(Item(encode_body(item)), self._max_frame))
        self.items_sent += 1

    async def receive(self) -> Any:
        """The client's next item in a duplex call (decoded, validated); None after its End."""
        if self._inputs is None:
            raise InvalidInput(f"{self.method} is not a duplex method")
        try:
            body = await self._inputs.receive()
        except trio.EndOfChannel:
            return None
        return decode_body(body, self._input_type, f"item to {self.method}")


Handler = Callable[..., Awaitable[Any]]
# (peer, method, body, proof) -> the principal the call acts for; raises a
# CloudlessError (e.g. authz.PermissionDenied) to refuse it.
Authorize = Callable[[PeerIdentity, str, bytes, bytes], Any]


@dataclass(frozen=True)
class _Method:
    name: str
    handler: Handler
    request_type: Any
    streaming: bool
    input_type: Any = None
    duplex: bool = False


class RpcServer:
    def __init__(
        self,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_timeout: float | None = None,
        request_timeout: float = REQUEST_READ_TIMEOUT,
        authorize: Authorize | None = None,
        listed: Callable[[str], bool] | None = None,
        max_calls_per_peer: int | None = None,
    ) -> None:
        self._methods: dict[str, _Method] = {}
        # Every call passes this before its body is decoded; a node's servers
        # use cloudless.authz (default deny), bare test servers none.
        self.authorize = authorize
        # Registering a method the permission table does not list fails at
        # start-up, so no RPC can exist without a declared policy.
        self.listed = listed
        # One identity (across all its connections) may hold this many calls
        # open at once; more are refused, so a stolen certificate cannot
        # take every task and buffer a node has.
        self.max_calls_per_peer = max_calls_per_peer
        self._calls_by_peer: dict[str, int] = {}
        self.max_frame_size = max_frame_size
        self.request_timeout = request_timeout  # a client must deliver its request this fast
        self.max_timeout = max_timeout  # caps what clients may ask for
        self.calls_active = 0
        self.calls_total = 0

    def unary(self, name: str, *, request: Any = None) -> Callable[[Handler], Handler]:
        """Register `async def h(ctx, request) -> response`."""
        return self._register(name, request, streaming=False)

    def stream(self, name: str, *, request: Any = None) -> Callable[[Handler], Handler]:
        """Register `async def h(ctx, request) -> None` that calls `await ctx.send(item)`."""
        return self._register(name, request, streaming=True)

    def duplex(self, name: str, *, request: Any = None, input: Any = None) -> Callable[[Handler], Handler]:
        """Register `async def h(ctx, request) -> None` that reads `await ctx.receive()` and calls `ctx.send`."""

        def decorate(handler: Handler) -> Handler:
            self.add(name, handler, request=request, streaming=True, duplex=True, input=input)
            return handler

        return decorate

    def add(
        self,
        name: str,
        handler: Handler,
        *,
        request: Any = None,
        streaming: bool = False,
        duplex: bool = False,
        input: Any = None,
    ) -> None:
        if not name or len(name) > MAX_METHOD_LENGTH:
            raise ValueError(f"method name must be 1..{MAX_METHOD_LENGTH} characters")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        if self.listed is not None and not self.listed(name):
            raise ValueError(f"method {name!r} has no entry in the permission table (cloudless/authz/table.py)")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"handler for {name!r} must be an async function")
        self._methods[name] = _Method(name, handler, request, streaming or duplex, input, duplex)

    def _register(self, name: str, request: Any, *, streaming: bool) -> Callable[[Handler], Handler]:
        def decorate(handler: Handler) -> Handler:
            self.add(name, handler, request=request, streaming=streaming)
            return handler

        return decorate

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    async def serve(self, carrier: Carrier, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await carrier.serve(self.serve_connection, task_status=task_status)

    async def serve_connection(self, conn: Connection) -> None:
        """A carrier ConnectionHandler: serve every stream the peer opens until it goes."""
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    stream = await conn.accept_stream()
                    nursery.start_soon(self.serve_stream, conn, stream)
        except Exception as exc:
            if not _only(exc, (ConnectionLost,)):
                raise

    async def serve_stream(self, conn: Connection, stream: Stream) -> None:
        """Serve one call; whatever happens stays with this stream (never the connection)."""
        self.calls_total += 1
        self.calls_active += 1
        peer = conn.peer.uri
        held = self._calls_by_peer.get(peer, 0)
        self._calls_by_peer[peer] = held + 1
        try:
            if self.max_calls_per_peer is not None and held >= self.max_calls_per_peer:
                await self._refuse(
                    stream,
                    conn,
                    Unavailable(f"{peer} has {held} calls open here, the most one identity may hold; retry later"),
                )
                return
            await self._serve_stream(conn, stream)
        except Exception as exc:  # incl. ExceptionGroups; Cancelled is a BaseException and goes on
            if _only(exc, _STREAM_GONE):
                log.debug("rpc.stream_aborted", extra={"peer": conn.peer.uri, "error": repr(exc)})
            else:
                log.exception("rpc.stream_failed", extra={"peer": conn.peer.uri})
            await _reset_quietly(stream)
        finally:
            self.calls_active -= 1
            left = self._calls_by_peer[peer] - 1
            if left:
                self._calls_by_peer[peer] = left
            else:
                del self._calls_by_peer[peer]

    async def _serve_stream(self, conn: Connection, stream: Stream) -> None:
        reader = FrameReader(stream, self.max_frame_size)
        frame = None
        try:
            with trio.CancelScope(deadline=trio.current_time() + self.request_timeout) as scope:
                frame = await reader.read()
        except RpcProtocolError as exc:
            await self._refuse(stream, conn, exc)
            return
        if scope.cancelled_caught:
            log.info("rpc.request_timeout", extra={"peer": conn.peer.uri})
            await _reset_quietly(stream, RESET_PROTOCOL_ERROR)
            return
        if not isinstance(frame, Request):
            await self._refuse(stream, conn, RpcProtocolError("first RPC frame must be a request"))
            return
        principal = None
        if self.authorize is not None:
            try:
                principal = self.authorize(conn.peer, frame.method, frame.body, frame.proof)
            except CloudlessError as exc:
                await self._refuse(stream, conn, exc)
                return
        method = self._methods.get(frame.method)
        if method is None:
            await self._refuse(stream, conn, UnknownMethod(f"no RPC method {frame.method[:MAX_METHOD_LENGTH]!r}"))
            return
        if frame.timeout is not None and not (frame.timeout >= 0 and math.isfinite(frame.timeout)):
            await self._refuse(stream, conn, RpcProtocolError(f"bad RPC timeout {frame.timeout!r}"))
            return
        timeout = frame.timeout
        if self.max_timeout is not None:
            timeout = self.max_timeout if timeout is None else min(timeout, self.max_timeout)
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        try:
            request = decode_body(frame.body, method.request_type, f"request to {method.name}")
        except InvalidInput as exc:
            await self._refuse(stream, conn, exc)
            return
        await self._run_handler(conn, stream, reader, method, request, deadline, principal, frame)

    async def _refuse(self, stream: Stream, conn: Connection, error: CloudlessError) -> None:
        log.info("rpc.refused", extra={"peer": conn.peer.uri, "error": error.message})
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            await stream.send_all(encode_frame(failure_of(error), self.max_frame_size))
            await stream.send_eof()
            while await stream.receive_some():  # until the client's EOF
                pass
        if scope.cancelled_caught:
            await _reset_quietly(stream, RESET_PROTOCOL_ERROR)
        else:
            await stream.aclose()

    async def _run_handler(
        self,
        conn: Connection,
        stream: Stream,
        reader: FrameReader,
        method: _Method,
        request: Any,
        deadline: float,
        principal: Any,
        frame: Request,
    ) -> None:
        client_gone: list[str] = []
        ctx_scope = trio.CancelScope(deadline=deadline)
        ctx = RpcContext(
            conn.peer,
            method.name,
            deadline,
            ctx_scope,
            stream,
            self.max_frame_size,
            principal=principal,
            raw_body=frame.body,
            proof=frame.proof,
        )
        on_abort = getattr(stream, "on_abort", None)
        if method.duplex:
            await self._answer_duplex(conn, stream, reader, method, ctx, request, client_gone)
        elif reader.buffered:
            client_gone.append("sent data after its request")
        elif on_abort is not None:
            # The carrier tells us when the client gives up: no watcher task needed.
            def aborted(why: str) -> None:
                client_gone.append(why)
                ctx_scope.cancel()

            on_abort(aborted)
            try:
                await self._answer(conn, stream, method, ctx, request, client_gone)
            finally:
                on_abort(None)
            if not client_gone:
                await self._await_client_eof(stream, client_gone)
        else:
            await self._answer_watched(conn, stream, method, ctx, request, client_gone)
        if client_gone:
            log.debug("rpc.client_gone", extra={"method": method.name, "peer": conn.peer.uri, "why": client_gone[0]})
            await _reset_quietly(stream)
        else:
            await stream.aclose()

    async def _answer_watched(
        self, conn: Connection, stream: Stream, method: _Method, ctx: RpcContext, request: Any, client_gone: list[str]
    ) -> None:
        """Run the handler with a task watching the stream for the client giving up."""
        finished = False

        async def watch_client(scope: trio.CancelScope) -> None:
            # The client sends nothing after its request until it has our answer:
            # EOF before then, a reset or a lost connection all mean "give up".
            try:
                data = await stream.receive_some()
                if data:
                    client_gone.append("sent data after its request")
                elif not finished:
                    client_gone.append("closed its side before the answer")
            except _STREAM_GONE as exc:
                client_gone.append(f"went away ({exc.__class__.__name__})")
            if not finished or client_gone:
                scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_client, nursery.cancel_scope)
            await self._answer(conn, stream, method, ctx, request, client_gone)
            finished = True
            # Leaving the nursery waits for the watcher to see the client's EOF,
            # so the stream ends cleanly on both sides; bounded by CLOSE_TIMEOUT.
            nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT

    async def _answer_duplex(
        self,
        conn: Connection,
        stream: Stream,
        reader: FrameReader,
        method: _Method,
        ctx: RpcContext,
        request: Any,
        client_gone: list[str],
    ) -> None:
        """Run a duplex handler with a task feeding it the client's items, one at a time."""
        finished = False
        send, receive = trio.open_memory_channel(0)  # the handler pulls: no buffering here
        ctx._inputs, ctx._input_type = receive, method.input_type

        async def read_client(scope: trio.CancelScope) -> None:
            ended = False
            try:
                async with send:
                    while True:
                        frame = await reader.read()
                        if frame is None:
                            if not finished:
                                client_gone.append("closed its side before the answer")
                            break
                        if ended or not isinstance(frame, (Item, End)):
                            client_gone.append(f"sent {type(frame).__name__} out of turn")
                            break
                        if isinstance(frame, End):
                            ended = True
                            await send.aclose()
                            continue
                        try:
                            await send.send(frame.body)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass  # the handler is done reading: drop the rest
            except (*_STREAM_GONE, RpcProtocolError) as exc:
                client_gone.append(f"went away ({exc.__class__.__name__})")
            if not finished or client_gone:
                scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_client, nursery.cancel_scope)
            await self._answer(conn, stream, method, ctx, request, client_gone)
            finished = True
            receive.close()
            nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT

    async def _await_client_eof(self, stream: Stream, client_gone: list[str]) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            try:
                if await stream.receive_some():
                    client_gone.append("sent data after its request")
            except _STREAM_GONE as exc:
                client_gone.append(f"went away ({exc.__class__.__name__})")
        if scope.cancelled_caught:
            client_gone.append("never closed its side")

    async def _answer(
        self, conn: Connection, stream: Stream, method: _Method, ctx: RpcContext, request: Any, client_gone: list[str]
    ) -> None:
        """Run the handler under the call's deadline and send its answer (unless the client is gone)."""
        answer: Frame | None = None
        with ctx.cancel_scope:
            try:
                result = await method.handler(ctx, request)
                answer = End() if method.streaming else Reply(encode_body(result))
            except CloudlessError as exc:
                answer = failure_of(exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                answer = failure_of(RpcCancelled(f"{method.name} lost its stream: {exc!r}"))
            except Exception as exc:
                log.exception("rpc.handler_crashed", extra={"method": method.name, "peer": conn.peer.uri})
                answer = Failure("internal", 1, f"internal error in {method.name}: {exc.__class__.__name__}")
        if client_gone:
            return
        if answer is None:  # cancelled, and not by the client: the deadline passed
            answer = failure_of(DeadlineExceeded(f"{method.name} ran past its deadline"))
        try:
            data = encode_frame(answer, self.max_frame_size)
        except InvalidInput as exc:  # the answer itself was too large
            data = encode_frame(failure_of(exc), self.max_frame_size)
        try:
            await send_last(stream, data)
        except _STREAM_GONE as exc:
            client_gone.append(f"went away before the answer ({exc.__class__.__name__})")


# -- client --


class PeerPool:
    """One connection per peer address, made on first use and remade once lost."""

    def __init__(self, carrier: Carrier) -> None:
        self.carrier = carrier
        self._connections: dict[Address, Connection] = {}
        self._locks: dict[Address, trio.Lock] = {}
        self.connects = 0

    def connections(self) -> list[Connection]:
        return [c for c in self._connections.values() if not c.is_closed]

    async def get(self, address: Address) -> Connection:
        address = (address[0], int(address[1]))
        conn = self._connections.get(address)
        if conn is not None and not conn.is_closed:
            return conn
        lock = self._locks.setdefault(address, trio.Lock())
        async with lock:
            conn = self._connections.get(address)
            if conn is not None and not conn.is_closed:
                return conn
            conn = await self.carrier.connect(address)
            self.connects += 1
            self._connections[address] = conn
            return conn

    def discard(self, address: Address, conn: Connection | None = None) -> None:
        address = (address[0], int(address[1]))
        if conn is None or self._connections.get(address) is conn:
            self._connections.pop(address, None)

    async def aclose(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        for conn in connections:
            with trio.move_on_after(1.0):
                await conn.aclose()


class RpcClient:
    def __init__(
        self,
        carrier_or_pool: Carrier | PeerPool,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        signer: Callable[[str, bytes], bytes] | None = None,
    ) -> None:
        self.pool = carrier_or_pool if isinstance(carrier_or_pool, PeerPool) else PeerPool(carrier_or_pool)
        self.max_frame_size = max_frame_size
        # A client signs every call (authz.proof.ProofSigner) so a node that
        # forwards it can prove to the leader who asked; nodes sign nothing.
        self.signer = signer

    def _proof(self, method: str, body: bytes, proof: bytes | None) -> bytes:
        if proof is not None:
            return proof
        return self.signer(method, body) if self.signer is not None else b""

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def _connection(self, target: Address | Connection) -> Connection:
        if isinstance(target, tuple):
            return await self.pool.get(target)
        return target

    def _lost(self, target: Address | Connection, conn: Connection) -> None:
        if isinstance(target, tuple) and conn.is_closed:
            self.pool.discard(target, conn)

    async def call(
        self,
        target: Address | Connection,
        method: str,
        request: Any = b"",
        *,
        response: type[T] | Any = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        proof: bytes | None = None,
    ) -> Any:
        """One request, one response. Raises the remote error re-typed, DeadlineExceeded, or ConnectionLost.

        `proof`: a caller proof to pass on (a node forwarding a client's call); else the signer's, if any.
        """
        body = encode_body(request)
        proof = self._proof(method, body, proof)
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        conn: Connection | None = None
        frame: Frame | None = None
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                conn = await self._connection(target)
                stream = await conn.open_stream()
                try:
                    frame = await self._exchange(stream, method, body, deadline, proof)
                except BaseException:
                    await _reset_quietly(stream)
                    raise
            if scope.cancelled_caught:
                raise DeadlineExceeded(f"{method} did not answer within {timeout} s", method=method)
        except (ConnectionLost, StreamReset) as exc:
            if conn is not None:
                self._lost(target, conn)
            if isinstance(exc, StreamReset):
                raise RpcCancelled(f"{method}: the server reset the call ({exc.message})", method=method) from exc
            raise
        peer = conn.peer.uri
        if isinstance(frame, Failure):
            raise error_of(frame, method, peer)
        if not isinstance(frame, Reply):
            raise RpcProtocolError(f"{method}: expected a reply, got {type(frame).__name__}", peer=peer)
        return decode_body(frame.body, response, f"reply from {method}")

    async def _exchange(self, stream: Stream, method: str, body: bytes, deadline: float, proof: bytes) -> Frame:
        left = None if deadline == math.inf else max(0.0, deadline - trio.current_time())
        await stream.send_all(encode_frame(Request(method, left, body, proof), self.max_frame_size))
        reader = FrameReader(stream, self.max_frame_size)
        frame = await reader.read()
        if frame is None:
            raise ConnectionLost(f"{method}: the server closed the call without answering")
        try:
            extra = await reader.read()
        except (StreamReset, RpcProtocolError):
            extra = None  # we have the answer; how the server's side ended does not change it
        if extra is not None:
            raise RpcProtocolError(f"{method}: the server sent more than one answer")
        await stream.send_eof()
        await stream.aclose()
        return frame

    @asynccontextmanager
    async def stream(
        self,
        target: Address | Connection,
        method: str,
        request: Any = b"",
        *,
        item: type[T] | Any = None,
        timeout: float | None = None,
        proof: bytes | None = None,
    ) -> AsyncIterator[ItemStream[Any]]:
        """A server-streamed call: `async for x in items`; leaving the block early cancels the call."""
        async with self._open(target, method, request, item, timeout, proof, ItemStream) as items:
            yield items

    @asynccontextmanager
    async def duplex(
        self,
        target: Address | Connection,
        method: str,
        request: Any = b"",
        *,
        item: type[T] | Any = None,
        timeout: float | None = None,
        proof: bytes | None = None,
    ) -> AsyncIterator[DuplexStream[Any]]:
        """A duplex call: `await call.send(x)`, `await call.end()`, and `async for y in call`."""
        async with self._open(target, method, request, item, timeout, proof, DuplexStream) as call:
            yield call

    @asynccontextmanager
    async def _open(
        self,
        target: Address | Connection,
        method: str,
        request: Any,
        item: Any,
        timeout: float | None,
        proof: bytes | None,
        kind: type,
    ) -> AsyncIterator[Any]:
        body = encode_body(request)
        proof = self._proof(method, body, proof)
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        try:
            with trio.fail_at(deadline):
                conn = await self._connection(target)
                stream = await conn.open_stream()
                left = None if timeout is None else max(0.0, deadline - trio.current_time())
                try:
                    await stream.send_all(encode_frame(Request(method, left, body, proof), self.max_frame_size))
                except BaseException:
                    await _reset_quietly(stream)
                    raise
        except trio.TooSlowError:
            raise DeadlineExceeded(f"{method} did not start within {timeout} s", method=method) from None
        except ConnectionLost:
            if isinstance(target, tuple):
                self.pool.discard(target)
            raise
        items = kind(self, target, conn, stream, method, item, deadline)
        try:
            yield items
        finally:
            await items._finish()


class ItemStream(Generic[T]):
    """The items of a server-streamed call, as an async iterator."""

    def __init__(
        self,
        client: RpcClient,
        target: Address | Connection,
        conn: Connection,
        stream: Stream,
        method: str,
        item_type: Any,
        deadline: float,
    ) -> None:
        self._client = client
        self._target = target
        self._conn = conn
        self._stream = stream
        self._method = method
        self._type = item_type
        self._deadline = deadline
        self._reader = FrameReader(stream, client.max_frame_size)
        self.done = False
        self.received = 0

    def __aiter__(self) -> ItemStream[T]:
        return self

    async def __anext__(self) -> T:
        if self.done:
            raise StopAsyncIteration
        try:
            with trio.fail_at(self._deadline):
                frame = await self._reader.read()
        except trio.TooSlowError:
            raise DeadlineExceeded(f"{self._method} ran past its deadline", method=self._method) from None
        except StreamReset as exc:
            raise RpcCancelled(f"{self._method}: the server reset the call ({exc.message})") from exc
        except ConnectionLost:
            self._client._lost(self._target, self._conn)
            raise
        if isinstance(frame, Item):
            self.received += 1
            return decode_body(frame.body, self._type, f"item from {self._method}")
        self.done = True
        if isinstance(frame, End):
            raise StopAsyncIteration
        if isinstance(frame, Failure):
            raise error_of(frame, self._method, self._conn.peer.uri)
        if frame is None:
            raise ConnectionLost(f"{self._method}: the server closed the stream without ending it")
        raise RpcProtocolError(f"{self._method}: unexpected {type(frame).__name__} in a stream")

    async def _finish(self) -> None:
        if self.done:
            try:
                with trio.move_on_after(1.0):
                    await self._stream.send_eof()
                    await self._stream.aclose()
            except (CloudlessError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        else:
            await _reset_quietly(self._stream)


class DuplexStream(ItemStream[T]):
    """A duplex call: the server's items as an async iterator, plus sending the client's own.

    Several tasks may send (one at a time on the wire); reading may go on in another task.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._send_lock = trio.StrictFIFOLock()
        self.ended = False

    async def send(self, value: Any) -> None:
        frame = encode_frame(Item(encode_body(value)), self._client.max_frame_size)
        async with self._send_lock:
            if self.ended:
                raise trio.ClosedResourceError(f"{self._method}: input already ended")
            await self._stream.send_all(frame)

    async def end(self) -> None:
        """No more input (the server's `ctx.receive()` returns None)."""
        async with self._send_lock:
            if not self.ended:
                self.ended = True
                await self._stream.send_all(encode_frame(End(), self._client.max_frame_size))
