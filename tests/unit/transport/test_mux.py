"""The stream multiplexer under TLS/TCP and WebSocket, tested over the
in-memory pipe: stream semantics, credit-based flow control, resets,
keepalive, GOAWAY, and hostile input (hypothesis)."""

from __future__ import annotations

import random

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudless.transport.base import ConnectionLost, PeerIdentity, StreamReset
from cloudless.transport.memory import memory_pipe
from cloudless.transport.mux import (
    DATA,
    FIN,
    GOAWAY,
    GOAWAY_PROTOCOL_ERROR,
    HEADER,
    INITIAL_WINDOW,
    PING,
    RESET,
    RESET_REFUSED,
    SYN,
    WINDOW_UPDATE,
    MuxConfig,
    MuxSession,
    encode_frame,
)
from tests.harness.waiting import wait_until

CLIENT = PeerIdentity("mux", "node", "client", 1)
SERVER = PeerIdentity("mux", "node", "server", 2)


async def session_pair(nursery, config: MuxConfig | None = None):
    a, b, directions = memory_pipe()
    client = MuxSession(a, is_client=True, peer=SERVER, remote_address=("server", 1), config=config)
    server = MuxSession(b, is_client=False, peer=CLIENT, remote_address=("client", 1), config=config)
    await nursery.start(client.run)
    await nursery.start(server.run)
    return client, server, directions


async def read_all(stream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some():
        out += chunk
    return bytes(out)


async def test_streams_are_independent_ordered_and_half_closable():
    async with trio.open_nursery() as nursery:
        client, server, _ = await session_pair(nursery)
        s1 = await client.open_stream()
        s2 = await client.open_stream()
        assert (s1.stream_id, s2.stream_id) == (1, 3)  # client-opened ids are odd
        await s2.send_all(b"second")
        await s1.send_all(b"first")
        await s1.send_eof()
        # A stream appears to the peer with its first frame.
        r2 = await server.accept_stream()
        r1 = await server.accept_stream()
        assert (r2.stream_id, r1.stream_id) == (3, 1)
        assert await read_all(r1) == b"first"
        # Half-closed: r1 can still answer.
        await r1.send_all(b"reply")
        await r1.send_eof()
        assert await read_all(s1) == b"reply"
        assert await r2.receive_some() == b"second"
        r3 = await server.open_stream()
        assert r3.stream_id % 2 == 0  # server-opened ids are even
        await r3.send_all(b"from server")
        assert await (await client.accept_stream()).receive_some() == b"from server"
        nursery.cancel_scope.cancel()


async def test_slow_reader_bounds_what_a_fast_writer_can_queue():
    config = MuxConfig(receive_window=INITIAL_WINDOW, max_outbox_bytes=64 * 1024)
    async with trio.open_nursery() as nursery:
        client, server, _ = await session_pair(nursery, config)
        stream = await client.open_stream()
        accepted = 0

        async def writer():
            nonlocal accepted
            chunk = b"z" * 16384
            while True:
                await stream.send_all(chunk)
                accepted += len(chunk)

        nursery.start_soon(writer)
        with trio.fail_after(20):  # the writer must stall (however loaded the machine)
            while True:
                first = accepted
                await trio.sleep(0.3)
                if accepted == first:
                    break
        receiver = await server.accept_stream()
        # Nothing read yet: the receiver holds at most one window.
        assert server.statistics()["buffered_bytes"] <= config.receive_window
        assert client.statistics()["outbox_bytes"] <= config.max_outbox_bytes + config.max_frame_size
        # Sent but unread is bounded by window + outbox + the pipe's buffer (a socket's, in TLS).
        assert accepted <= config.receive_window + config.max_outbox_bytes + 256 * 1024 + 16384
        # Reading releases the writer.
        got = 0
        while got < 4 * config.receive_window:
            got += len(await receiver.receive_some())
        assert accepted > first
        nursery.cancel_scope.cancel()


async def test_reset_aborts_both_directions_with_the_code():
    async with trio.open_nursery() as nursery:
        client, server, _ = await session_pair(nursery)
        stream = await client.open_stream()
        await stream.send_all(b"x")
        remote = await server.accept_stream()
        await remote.reset(7)
        with trio.fail_after(2):
            with pytest.raises(StreamReset) as info:
                while True:
                    await stream.receive_some()
        assert info.value.code == 7
        with pytest.raises(StreamReset):
            await stream.send_all(b"more")
        with pytest.raises(StreamReset):
            await remote.receive_some()
        # The session is unharmed.
        other = await client.open_stream()
        await other.send_all(b"fine")
        assert await (await server.accept_stream()).receive_some() == b"fine"
        assert server.statistics()["open_streams"] == 1
        nursery.cancel_scope.cancel()


async def test_aclose_sends_goaway_and_the_peer_stops_accepting():
    async with trio.open_nursery() as nursery:
        client, server, _ = await session_pair(nursery)
        await client.aclose()
        assert client.is_closed
        with trio.fail_after(2):
            with pytest.raises(ConnectionLost):
                await server.accept_stream()
        with pytest.raises(ConnectionLost):
            await server.open_stream()
        with pytest.raises(ConnectionLost):
            await client.open_stream()
        nursery.cancel_scope.cancel()


async def test_vanished_peer_is_detected_by_keepalive():
    config = MuxConfig(keepalive_interval=0.2, keepalive_timeout=0.3)
    async with trio.open_nursery() as nursery:
        client, server, directions = await session_pair(nursery, config)
        stream = await client.open_stream()
        await stream.send_all(b"hello")
        remote = await server.accept_stream()
        assert await remote.receive_some() == b"hello"
        # The peer vanishes: nothing flows any more, but nobody closes anything.
        for direction in directions:
            direction.held = True
        start = trio.current_time()
        with trio.fail_after(3):
            with pytest.raises(ConnectionLost, match="keepalive"):
                await stream.receive_some()
        assert trio.current_time() - start < 2.0  # interval + timeout (0.5 s) plus scheduling slack
        with trio.fail_after(3):
            with pytest.raises(ConnectionLost):
                await remote.receive_some()
        assert client.is_closed and server.is_closed
        nursery.cancel_scope.cancel()


async def test_idle_but_live_connection_survives_keepalive():
    config = MuxConfig(keepalive_interval=0.1, keepalive_timeout=0.5)
    async with trio.open_nursery() as nursery:
        client, server, _ = await session_pair(nursery, config)
        await trio.sleep(1.0)  # several ping rounds
        assert not client.is_closed and not server.is_closed
        stream = await client.open_stream()
        await stream.send_all(b"still here")
        assert await (await server.accept_stream()).receive_some() == b"still here"
        nursery.cancel_scope.cancel()


async def test_too_many_streams_are_refused_with_reset():
    config = MuxConfig(max_streams=2)
    async with trio.open_nursery() as nursery:
        client = None
        a, b, _ = memory_pipe()
        server = MuxSession(b, is_client=False, peer=CLIENT, remote_address=("c", 1), config=config)
        client = MuxSession(a, is_client=True, peer=SERVER, remote_address=("s", 1))  # no local limit
        await nursery.start(client.run)
        await nursery.start(server.run)
        streams = [await client.open_stream() for _ in range(3)]
        for stream in streams:
            await stream.send_all(b"hi")
        with trio.fail_after(2):
            with pytest.raises(StreamReset) as info:
                await streams[2].receive_some()
        assert info.value.code == RESET_REFUSED
        assert server.statistics()["open_streams"] == 2
        nursery.cancel_scope.cancel()


async def test_opening_past_the_local_limit_waits_for_a_free_slot():
    async with trio.open_nursery() as nursery:
        client, server, _ = await session_pair(nursery, MuxConfig(max_streams=2))
        first, second = await client.open_stream(), await client.open_stream()
        with trio.move_on_after(0.2) as waited:
            await client.open_stream()  # both slots taken: this waits, it does not fail
        assert waited.cancelled_caught
        opened = []

        async def open_third():
            opened.append(await client.open_stream())

        nursery.start_soon(open_third)
        await trio.sleep(0.05)
        assert not opened
        await first.send_all(b"done")
        await first.send_eof()
        accepted = await server.accept_stream()
        assert await read_all(accepted) == b"done"
        await accepted.send_eof()  # both FINs: the slot frees and the waiter proceeds
        with trio.fail_after(2):
            await wait_until(lambda: opened, interval=0.01)
        assert opened[0].stream_id == 5
        await second.reset()
        nursery.cancel_scope.cancel()


async def test_a_waiter_for_a_stream_slot_fails_when_the_session_ends():
    async with trio.open_nursery() as nursery:
        client, _, _ = await session_pair(nursery, MuxConfig(max_streams=1))
        await client.open_stream()
        failed = []

        async def open_second():
            with pytest.raises(ConnectionLost) as info:
                await client.open_stream()
            failed.append(info.value)

        nursery.start_soon(open_second)
        await trio.sleep(0.05)
        await client.aclose()
        with trio.fail_after(2):
            await wait_until(lambda: failed, interval=0.01)
        nursery.cancel_scope.cancel()


# -- hostile input, straight onto the wire --


async def raw_server(nursery, config: MuxConfig):
    ours, theirs, _ = memory_pipe()
    server = MuxSession(theirs, is_client=False, peer=CLIENT, remote_address=("raw", 1), config=config)
    return ours, server


async def wire_frames(end, deadline: float = 2.0) -> list[tuple[int, int, int, int]]:
    data = bytearray()
    with trio.move_on_after(deadline):
        while chunk := await end.receive_some():
            data += chunk
    frames, pos = [], 0
    while len(data) - pos >= HEADER.size:
        frame = HEADER.unpack_from(data, pos)
        frames.append(frame)
        pos += HEADER.size + (frame[3] if frame[0] == DATA else 0)
    return frames


async def test_oversize_frame_is_refused_with_goaway():
    config = MuxConfig(max_frame_size=1024)
    async with trio.open_nursery() as nursery:
        wire, server = await raw_server(nursery, config)
        await nursery.start(server.run)
        await wire.send_all(encode_frame(DATA, SYN, 1, 1025))  # header alone is enough to refuse
        frames = await wire_frames(wire)
        assert (GOAWAY, 0, 0, GOAWAY_PROTOCOL_ERROR) in frames
        assert server.is_closed
        with pytest.raises(ConnectionLost, match="exceeds"):
            await server.accept_stream()
        nursery.cancel_scope.cancel()


async def test_sending_beyond_the_window_is_a_protocol_error():
    config = MuxConfig(max_frame_size=INITIAL_WINDOW, receive_window=INITIAL_WINDOW)
    async with trio.open_nursery() as nursery:
        wire, server = await raw_server(nursery, config)
        await nursery.start(server.run)

        async def flood():
            payload = b"a" * 65536
            # Three more bytes than the window allows: a window of 64 KiB frames, then 3 bytes.
            await wire.send_all(encode_frame(DATA, SYN, 1, len(payload)) + payload)
            for _ in range(INITIAL_WINDOW // len(payload) - 1):
                await wire.send_all(encode_frame(DATA, 0, 1, len(payload)) + payload)
            await wire.send_all(encode_frame(DATA, 0, 1, 3) + b"bcd")

        nursery.start_soon(flood)
        frames = await wire_frames(wire)
        assert (GOAWAY, 0, 0, GOAWAY_PROTOCOL_ERROR) in frames
        assert server.is_closed
        with pytest.raises(ConnectionLost, match="window"):
            await server.open_stream()
        nursery.cancel_scope.cancel()


async def test_ping_is_answered_and_unknown_frame_type_closes():
    async with trio.open_nursery() as nursery:
        wire, server = await raw_server(nursery, MuxConfig())
        await nursery.start(server.run)
        await wire.send_all(encode_frame(PING, 0, 0, 12345))
        await wire.send_all(encode_frame(99, 0, 0, 0))
        frames = await wire_frames(wire)
        assert (PING, 4, 0, 12345) in frames
        assert frames[-1] == (GOAWAY, 0, 0, GOAWAY_PROTOCOL_ERROR)
        nursery.cancel_scope.cancel()


FUZZ_CONFIG = MuxConfig(max_frame_size=4096, max_streams=4, max_outbox_bytes=64 * 1024)


def valid_frames(rng: random.Random, count: int) -> list[bytes]:
    frames, next_id = [], 1
    for _ in range(count):
        kind = rng.choice([DATA, DATA, DATA, WINDOW_UPDATE, RESET, PING])
        stream_id = rng.choice([next_id, max(1, next_id - 2), rng.randrange(0, 20)])
        if kind == DATA:
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            flags = rng.choice([0, SYN, FIN, SYN | FIN])
            if flags & SYN and stream_id == next_id:
                next_id += 2
            frames.append(encode_frame(DATA, flags, stream_id, len(payload)) + payload)
        else:
            frames.append(encode_frame(kind, 0, 0 if kind == PING else stream_id, rng.randrange(2**32)))
    return frames


async def feed_and_check(data: bytes) -> None:
    ours, theirs, _ = memory_pipe()
    server = MuxSession(theirs, is_client=False, peer=CLIENT, remote_address=("fuzz", 1), config=FUZZ_CONFIG)
    peak = {"buffered": 0, "reassembly": 0}

    async def consume():
        # Accept streams but read slowly, so buffers are exercised.
        try:
            while True:
                stream = await server.accept_stream()
                peak["buffered"] = max(peak["buffered"], server.statistics()["buffered_bytes"])
                with trio.move_on_after(0.001):
                    try:
                        await stream.receive_some(10)
                    except StreamReset:
                        pass
        except ConnectionLost:
            pass

    async def drain():  # whatever the server answers
        try:
            while await ours.receive_some():
                pass
        except trio.BrokenResourceError:
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)  # must not raise, whatever arrives
            nursery.start_soon(consume)
            nursery.start_soon(drain)
            view = memoryview(data)
            for start in range(0, len(view), 777):
                try:
                    await ours.send_all(view[start : start + 777])
                except trio.BrokenResourceError:
                    break
                stats = server.statistics()
                peak["buffered"] = max(peak["buffered"], stats["buffered_bytes"])
                peak["reassembly"] = max(peak["reassembly"], stats["reassembly_bytes"])
            await ours.aclose()
            with trio.fail_after(5):
                await wait_until(lambda: server.is_closed, interval=0.001)
            nursery.cancel_scope.cancel()
    assert peak["buffered"] <= FUZZ_CONFIG.max_streams * FUZZ_CONFIG.receive_window
    assert peak["reassembly"] <= FUZZ_CONFIG.max_frame_size + 2 * HEADER.size + 777


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_random_bytes_never_crash_the_session_or_grow_memory(data):
    trio.run(feed_and_check, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 40),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
)
def test_mutated_valid_frames_never_crash_the_session_or_grow_memory(seed, count, mutations):
    rng = random.Random(seed)
    data = bytearray(b"".join(valid_frames(rng, count)))
    for position, value in mutations:
        if data:
            data[position % len(data)] = value
    try:
        trio.run(feed_and_check, bytes(data))
    except BaseException:
        print(f"mux fuzz seed={seed} count={count} mutations={mutations}")
        raise
