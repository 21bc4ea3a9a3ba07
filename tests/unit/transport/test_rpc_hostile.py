"""An RPC server fed random, mutated and oversize frames (hypothesis): it
answers with a typed error or resets the stream, never crashes, never keeps
more than one bounded frame per stream, and goes on serving good calls."""

from __future__ import annotations

import struct

import msgspec
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudless.transport.base import PeerIdentity, StreamReset
from cloudless.transport.memory import MemoryCarrier, MemoryNetwork
from cloudless.transport.rpc import (
    Failure,
    FrameReader,
    Reply,
    Request,
    RpcClient,
    RpcServer,
    encode_frame,
)
from tests.harness.waiting import wait_until

MAX_FRAME = 4096


def make_server() -> RpcServer:
    server = RpcServer(max_frame_size=MAX_FRAME, request_timeout=0.2)

    @server.unary("echo")
    async def echo(ctx, body: bytes) -> bytes:
        return body

    return server


async def send_raw(data: bytes, *, eof: bool = True):
    """Send `data` on a fresh stream to a fresh server; return (first answer frame or error, server, client, address, carrier)."""
    network = MemoryNetwork()
    server = make_server()
    server_carrier = MemoryCarrier(network, PeerIdentity("fuzz", "node", "server", 1), ("server", 1))
    client_carrier = MemoryCarrier(network, PeerIdentity("fuzz", "node", "client", 2), ("client", 1))
    outcome: object = None
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, server_carrier)
            conn = await client_carrier.connect(address)
            stream = await conn.open_stream()
            await stream.send_all(data)
            if eof:
                await stream.send_eof()
            if data or eof:  # else nothing went on the wire: streams open with their first frame
                try:
                    outcome = await FrameReader(stream, 1 << 20).read()
                except StreamReset as exc:
                    outcome = exc
            await stream.aclose()
            # The server still serves a good call on the same connection.
            client = RpcClient(client_carrier)
            assert await client.call(conn, "echo", b"still fine", timeout=5) == b"still fine"
            assert server.calls_active <= 1
            await conn.aclose()
            nursery.cancel_scope.cancel()
    return outcome


async def test_oversize_frame_is_refused_with_a_typed_error():
    outcome = await send_raw(struct.pack(">I", MAX_FRAME + 1) + b"x" * 10)
    assert isinstance(outcome, Failure)
    assert outcome.code == "rpc_protocol_error"
    assert "exceeds" in outcome.message


async def test_first_frame_that_is_not_a_request_is_refused():
    outcome = await send_raw(encode_frame(Failure("x", 1, "y")))
    assert isinstance(outcome, Failure) and outcome.code == "rpc_protocol_error"


async def test_truncated_request_then_eof_is_refused():
    frame = encode_frame(Request("echo", 1.0, b"abc"))
    outcome = await send_raw(frame[:-2])
    assert isinstance(outcome, Failure) and "inside an RPC frame" in outcome.message


async def test_negative_or_nan_timeout_is_refused():
    for timeout in (-1.0, float("nan"), float("inf")):
        outcome = await send_raw(encode_frame(Request("echo", timeout, b"")), eof=False)
        assert isinstance(outcome, Failure) and outcome.code == "rpc_protocol_error", timeout


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.booleans())
def test_random_bytes_never_crash_the_rpc_server(data, eof):
    outcome = trio.run(lambda: send_raw(data, eof=eof))
    assert outcome is None or isinstance(outcome, (Failure, StreamReset, Reply))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.text(max_size=40),
    st.one_of(st.none(), st.floats(allow_nan=True)),
    st.binary(max_size=100),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
)
def test_mutated_requests_never_crash_the_rpc_server(method, timeout, body, mutations):
    payload = bytearray(msgspec.msgpack.encode(Request(method, timeout, body)))
    for position, value in mutations:
        payload[position % len(payload)] = value
    data = struct.pack(">I", len(payload)) + bytes(payload)
    trio.run(lambda: send_raw(data))


async def test_one_identity_cannot_hold_more_than_its_share_of_calls():
    """Calls held open by one identity across two connections hit the cap; another identity is unaffected."""
    from cloudless.errors import Unavailable

    network = MemoryNetwork()
    server = RpcServer(max_calls_per_peer=3)
    release = trio.Event()

    @server.unary("hold")
    async def hold(ctx, body: bytes) -> bytes:
        await release.wait()
        return b"done"

    mallory = MemoryCarrier(network, PeerIdentity("c", "client", "mallory", 7, "viewer"), ("m", 1))
    alice = MemoryCarrier(network, PeerIdentity("c", "client", "alice", 8, "viewer"), ("a", 1))
    server_carrier = MemoryCarrier(network, PeerIdentity("c", "node", "server", 1), ("server", 1))
    results: list[object] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, server_carrier)
            conns = [await mallory.connect(address), await mallory.connect(address)]
            client = RpcClient(mallory)

            async def call(conn) -> None:
                try:
                    results.append(await client.call(conn, "hold", b"", timeout=10))
                except Unavailable as exc:
                    results.append(exc)

            for i in range(3):
                nursery.start_soon(call, conns[i % 2])
            await wait_until(lambda: server.calls_active >= 3, interval=0.01)
            await call(conns[1])  # the fourth, on either connection, is refused at once
            assert isinstance(results[-1], Unavailable) and "most one identity may hold" in results[-1].message
            other = RpcClient(alice)
            other_conn = await alice.connect(address)

            async def alice_call() -> None:
                results.append(await other.call(other_conn, "hold", b"", timeout=10))

            nursery.start_soon(alice_call)
            # alice's call is held, not refused
            await wait_until(lambda: server.calls_active >= 4, interval=0.01)
            release.set()
            await wait_until(lambda: len(results) >= 5, interval=0.01)
            nursery.cancel_scope.cancel()
    assert results.count(b"done") == 4
