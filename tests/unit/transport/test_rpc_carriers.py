"""The RPC layer's contract, run over every carrier: memory twin, TLS/TCP,
WebSocket and QUIC (real sockets on 127.0.0.1, real certificates)."""

from __future__ import annotations

import importlib.util
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import msgspec
import pytest
import trio

from cloudless.errors import CloudlessError, Conflict, InvalidInput, NotFound, Unavailable
from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import ConnectionLost, PeerIdentity
from cloudless.transport.memory import MemoryCarrier, MemoryNetwork
from cloudless.transport.rpc import DeadlineExceeded, RpcClient, RpcContext, RpcServer, UnknownMethod
from cloudless.transport.tls import TlsCarrier
from cloudless.transport.websocket import WebSocketCarrier

HAVE_QUIC = importlib.util.find_spec("cloudless.transport.quic") is not None
CARRIERS = ["memory", "tls", "websocket"] + (["quic"] if HAVE_QUIC else [])


class GetVar(msgspec.Struct, frozen=True):
    key: str


class VarValue(msgspec.Struct, frozen=True):
    key: str
    value: str
    caller: str


class Follow(msgspec.Struct, frozen=True):
    count: int


class Line(msgspec.Struct, frozen=True):
    n: int
    text: str


NOW = datetime.now(UTC)
CA = ClusterCA.create("rpc-test", NOW)
SERVER_CREDS = issue_credentials(CA, Identity("rpc-test", "node", "server"), NOW)
CLIENT_CREDS = issue_credentials(CA, Identity("rpc-test", "client", "alice"), NOW)
VERIFIER = PeerVerifier(CA.certificate, RevocationList(), "rpc-test")


@asynccontextmanager
async def serving(kind: str, server: RpcServer):
    """Yield (client carrier, server address) with `server` served over `kind`."""
    async with trio.open_nursery() as nursery:
        if kind == "memory":
            network = MemoryNetwork()
            srv = MemoryCarrier(network, PeerIdentity("rpc-test", "node", "server", 1), ("server", 1))
            cli = MemoryCarrier(network, PeerIdentity("rpc-test", "client", "alice", 2), ("alice", 1))
            address = await nursery.start(server.serve, srv)
            yield cli, address
        elif kind in ("tls", "websocket"):
            cls = TlsCarrier if kind == "tls" else WebSocketCarrier
            srv, cli = cls(SERVER_CREDS, VERIFIER), cls(CLIENT_CREDS, VERIFIER)
            address = await nursery.start(server.serve, srv)
            yield cli, address
        else:
            from cloudless.transport.quic import QuicCarrier

            srv, cli = QuicCarrier(SERVER_CREDS, VERIFIER), QuicCarrier(CLIENT_CREDS, VERIFIER)
            address = await nursery.start(server.serve, srv)
            async with cli:
                yield cli, address
        nursery.cancel_scope.cancel()


def make_server(events: dict) -> RpcServer:
    server = RpcServer()

    @server.unary("vars.get", request=GetVar)
    async def get_var(ctx: RpcContext, req: GetVar) -> VarValue:
        if req.key == "missing":
            raise NotFound(f"no variable {req.key}", key=req.key)
        if req.key == "stale":
            raise Conflict("modify index moved", expected=3, actual=4)
        if req.key == "bad":
            raise InvalidInput("bad key")
        if req.key == "down":
            raise Unavailable("no leader")
        if req.key == "bug":
            raise RuntimeError("boom")
        return VarValue(req.key, f"value-of-{req.key}", ctx.peer.uri)

    @server.unary("echo")
    async def echo(ctx: RpcContext, body: bytes) -> bytes:
        return body

    @server.unary("sleep")
    async def sleep(ctx: RpcContext, body: bytes) -> bytes:
        events["deadline_seen"] = ctx.deadline - trio.current_time()
        events["started"].set()
        try:
            await trio.sleep_forever()
        finally:
            events["handler_cancelled"].set()

    @server.stream("logs.follow", request=Follow)
    async def follow(ctx: RpcContext, req: Follow) -> None:
        for n in range(req.count):
            await ctx.send(Line(n, "x" * 100))
            events["sent"] = ctx.items_sent
        if req.count == 3:
            raise NotFound("log rotated away")

    @server.stream("logs.forever")
    async def forever(ctx: RpcContext, body: bytes) -> None:
        events["started"].set()
        try:
            n = 0
            while True:
                await ctx.send(Line(n, "y" * 1000))
                n += 1
                events["sent"] = n
        finally:
            events["handler_cancelled"].set()

    @server.duplex("upper", request=Follow, input=Line)
    async def upper(ctx: RpcContext, req: Follow) -> None:
        # Echoes each input item upper-cased, then a count; req.count > 0 stops after that many.
        n = 0
        events["started"].set()
        try:
            while (line := await ctx.receive()) is not None:
                await ctx.send(Line(line.n, line.text.upper()))
                n += 1
                events["received"] = n
                if req.count and n >= req.count:
                    break
            await ctx.send(Line(-1, f"{n} items"))
        finally:
            events["handler_cancelled"].set()

    return server


def fresh_events() -> dict:
    return {"started": trio.Event(), "handler_cancelled": trio.Event(), "sent": 0}


@pytest.fixture(params=CARRIERS)
def kind(request):
    return request.param


async def test_unary_call_decodes_typed_reply_and_handler_sees_verified_peer(kind):
    async with serving(kind, make_server(fresh_events())) as (carrier, address):
        client = RpcClient(carrier)
        value = await client.call(address, "vars.get", GetVar("a"), response=VarValue, timeout=5)
        assert value == VarValue("a", "value-of-a", "spiffe://rpc-test/client/alice")
        raw = await client.call(address, "echo", b"\x00\x01raw", timeout=5)
        assert raw == b"\x00\x01raw"
        await client.aclose()


@pytest.mark.parametrize(
    "key,cls,code,exit_code",
    [
        ("missing", NotFound, "not_found", 3),
        ("stale", Conflict, "conflict", 4),
        ("bad", InvalidInput, "invalid", 2),
        ("down", Unavailable, "unavailable", 5),
        ("bug", CloudlessError, "internal", 1),
    ],
)
async def test_remote_errors_come_back_with_the_same_exit_code_class(kind, key, cls, code, exit_code):
    async with serving(kind, make_server(fresh_events())) as (carrier, address):
        client = RpcClient(carrier)
        with pytest.raises(cls) as info:
            await client.call(address, "vars.get", GetVar(key), response=VarValue, timeout=5)
        assert info.value.exit_code == exit_code
        assert info.value.code == code
        if key == "stale":
            assert info.value.context["expected"] == "3"
        # the connection survives a failed call
        assert (await client.call(address, "echo", b"ok", timeout=5)) == b"ok"
        await client.aclose()


async def test_unknown_method_and_undecodable_request_are_invalid_input(kind):
    async with serving(kind, make_server(fresh_events())) as (carrier, address):
        client = RpcClient(carrier)
        with pytest.raises(UnknownMethod):
            await client.call(address, "no.such.method", b"", timeout=5)
        with pytest.raises(InvalidInput, match="does not decode"):
            await client.call(address, "vars.get", {"key": 42}, timeout=5)
        await client.aclose()


async def test_server_stream_delivers_items_in_order_then_typed_error(kind):
    async with serving(kind, make_server(fresh_events())) as (carrier, address):
        client = RpcClient(carrier)
        async with client.stream(address, "logs.follow", Follow(50), item=Line) as items:
            got = [line.n async for line in items]
        assert got == list(range(50))
        seen = []
        with pytest.raises(NotFound, match="rotated"):
            async with client.stream(address, "logs.follow", Follow(3), item=Line) as items:
                async for line in items:
                    seen.append(line.n)
        assert seen == [0, 1, 2]
        await client.aclose()


async def test_slow_stream_reader_holds_back_the_server_with_bounded_buffering(kind):
    events = fresh_events()
    async with serving(kind, make_server(events)) as (carrier, address):
        client = RpcClient(carrier)
        async with client.stream(address, "logs.forever", item=Line) as items:
            first = await items.__anext__()
            assert first.n == 0
            # We read nothing more: the handler must stall (wait until it does,
            # however loaded the machine is).
            with trio.fail_after(20):
                while True:
                    stalled_at = events["sent"]
                    await trio.sleep(0.3)
                    if events["sent"] == stalled_at:
                        break
            # each item is ~1 KB on the wire: a few MB at most may sit in windows and buffers
            assert stalled_at < 8_000
        with trio.fail_after(5):
            await events["handler_cancelled"].wait()  # leaving the block early cancels the server side
        await client.aclose()


async def test_duplex_call_streams_both_ways_and_end_reaches_the_handler(kind):
    async with serving(kind, make_server(fresh_events())) as (carrier, address):
        client = RpcClient(carrier)
        async with client.duplex(address, "upper", Follow(0), item=Line, timeout=10) as call:
            for i in range(3):
                await call.send(Line(i, f"line {i}"))
                assert await call.__anext__() == Line(i, f"LINE {i}")  # each answer before the next input
            await call.end()
            rest = [line async for line in call]
        assert rest == [Line(-1, "3 items")]
        # the handler may stop reading first: the client's later items are dropped, the call ends cleanly
        async with client.duplex(address, "upper", Follow(1), item=Line, timeout=10) as call:
            await call.send(Line(0, "a"))
            await call.send(Line(1, "b"))
            got = [line async for line in call]
        assert got == [Line(0, "A"), Line(-1, "1 items")]
        assert await client.call(address, "echo", b"after", timeout=5) == b"after"
        await client.aclose()


async def test_duplex_input_that_does_not_decode_fails_the_call(kind):
    async with serving(kind, make_server(fresh_events())) as (carrier, address):
        client = RpcClient(carrier)
        with pytest.raises(InvalidInput, match="does not decode"):
            async with client.duplex(address, "upper", Follow(0), item=Line, timeout=10) as call:
                await call.send({"n": "not a number"})
                async for _ in call:
                    pass
        await client.aclose()


async def test_duplex_server_pulls_input_only_as_the_handler_reads_it(kind):
    events = fresh_events()
    server = RpcServer()
    release = trio.Event()

    @server.duplex("slow", input=Line)
    async def slow(ctx: RpcContext, body: bytes) -> None:
        await release.wait()
        while await ctx.receive() is not None:
            pass

    async with serving(kind, server) as (carrier, address):
        client = RpcClient(carrier)
        async with client.duplex(address, "slow", b"", timeout=30) as call:
            sent = 0

            async def writer():
                nonlocal sent
                while True:
                    await call.send(Line(sent, "z" * 1000))
                    sent += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                with trio.fail_after(20):
                    while True:  # the writer must stall while the handler reads nothing
                        before = sent
                        await trio.sleep(0.3)
                        if sent == before:
                            break
                assert sent < 8_000  # ~1 KB items: a few MB at most in windows and buffers
                nursery.cancel_scope.cancel()
            release.set()
        events["done"] = True
        await client.aclose()


async def test_deadline_propagates_and_the_server_cancels_the_handler(kind):
    events = fresh_events()
    async with serving(kind, make_server(events)) as (carrier, address):
        client = RpcClient(carrier)
        start = trio.current_time()
        with pytest.raises(DeadlineExceeded):
            await client.call(address, "sleep", b"", timeout=0.5)
        assert trio.current_time() - start < 3
        assert 0 < events["deadline_seen"] <= 0.5
        with trio.fail_after(3):
            await events["handler_cancelled"].wait()
        await client.aclose()


async def test_client_cancellation_resets_the_stream_and_cancels_the_handler(kind):
    events = fresh_events()
    async with serving(kind, make_server(events)) as (carrier, address):
        client = RpcClient(carrier)
        async with trio.open_nursery() as nursery:

            async def caller():
                await client.call(address, "sleep", b"", timeout=30)

            nursery.start_soon(caller)
            with trio.fail_after(5):
                await events["started"].wait()
            nursery.cancel_scope.cancel()
        with trio.fail_after(5):
            await events["handler_cancelled"].wait()
        # connection still usable afterwards
        assert await client.call(address, "echo", b"after", timeout=5) == b"after"
        await client.aclose()


async def test_many_concurrent_calls_and_streams_share_one_pooled_connection(kind):
    async with serving(kind, make_server(fresh_events())) as (carrier, address):
        client = RpcClient(carrier)
        results: dict[int, bytes] = {}
        streamed: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await client.call(address, "echo", i.to_bytes(4, "big") * 100, timeout=20)

        async def follow(i: int) -> None:
            async with client.stream(address, "logs.follow", Follow(20), item=Line, timeout=20) as items:
                streamed[i] = len([line async for line in items])

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
                for i in range(20):
                    nursery.start_soon(follow, i)
        assert all(results[i] == i.to_bytes(4, "big") * 100 for i in range(200))
        assert streamed == {i: 20 for i in range(20)}
        assert client.pool.connects == 1
        await client.aclose()


async def test_pool_reconnects_after_the_connection_is_lost(kind):
    async with serving(kind, make_server(fresh_events())) as (carrier, address):
        client = RpcClient(carrier)
        assert await client.call(address, "echo", b"1", timeout=5) == b"1"
        conn = await client.pool.get(address)
        await conn.aclose()
        assert conn.is_closed
        assert await client.call(address, "echo", b"2", timeout=5) == b"2"
        assert client.pool.connects == 2
        await client.aclose()


async def test_call_on_a_connection_object_directly(kind):
    async with serving(kind, make_server(fresh_events())) as (carrier, address):
        conn = await carrier.connect(address)
        assert conn.peer.uri == "spiffe://rpc-test/node/server"
        client = RpcClient(carrier)
        assert await client.call(conn, "echo", b"direct", timeout=5) == b"direct"
        await conn.aclose()
        with pytest.raises((ConnectionLost, Unavailable)):
            await client.call(conn, "echo", b"closed", timeout=5)


async def test_racing_deadlines_and_resets_never_take_the_connection_down(kind):
    # Regression: a handler answering "deadline exceeded" just as the client
    # reset the stream used to escape as an ExceptionGroup and close the connection.
    events = fresh_events()
    async with serving(kind, make_server(events)) as (carrier, address):
        client = RpcClient(carrier)
        await client.call(address, "echo", b"warm", timeout=5)

        async def doomed(i: int) -> None:
            with pytest.raises(DeadlineExceeded):
                await client.call(address, "sleep", b"", timeout=0.01 + (i % 10) * 0.005)

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(doomed, i)
        assert await client.call(address, "echo", b"alive", timeout=5) == b"alive"
        assert client.pool.connects == 1
        await client.aclose()
