"""Background work does not swallow errors: a crash in a session's or a
carrier's background task reaches its owner (the caller of `run`, the
users of its streams, with the crash as the cause) or, where nothing can
take it (connections made outside any nursery, one accepted connection of
a listener), is logged with its traceback and closes only that session."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from cloudless.transport import hosting
from cloudless.transport.base import ConnectionLost, PeerIdentity
from cloudless.transport.memory import MemoryCarrier, MemoryNetwork, memory_pipe
from cloudless.transport.mux import MuxSession, run_session

CLIENT = PeerIdentity("mux", "node", "client", 1)
SERVER = PeerIdentity("mux", "node", "server", 2)


class Bug(RuntimeError):
    """Stands for a programming error inside a background loop."""


class TrippingTransport:
    """A pipe end whose reads raise `Bug` once `trip` is set: a fault inside the session's reader."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.trip = trio.Event()

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes=None):
        async with trio.open_nursery() as nursery:
            result: list = []

            async def read() -> None:
                result.append(await self.inner.receive_some(max_bytes))
                nursery.cancel_scope.cancel()

            async def tripped() -> None:
                await self.trip.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            nursery.start_soon(tripped)
        if self.trip.is_set():
            raise Bug("reader bug")
        return result[0]

    async def aclose(self) -> None:
        await self.inner.aclose()


def sessions() -> tuple[MuxSession, MuxSession, TrippingTransport]:
    a, b, _ = memory_pipe()
    faulty = TrippingTransport(a)
    client = MuxSession(faulty, is_client=True, peer=SERVER, remote_address=("server", 1))
    server = MuxSession(b, is_client=False, peer=CLIENT, remote_address=("client", 1))
    return client, server, faulty


def caused_by_bug(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionLost) and isinstance(exc.__cause__, Bug)


async def test_a_session_crash_propagates_to_run_and_fails_streams_with_its_cause():
    client, server, faulty = sessions()
    stream_errors: list[BaseException] = []
    with pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await nursery.start(client.run)
            stream = await client.open_stream()
            await stream.send_all(b"hello")

            async def reader() -> None:
                try:
                    await stream.receive_some()
                except ConnectionLost as exc:
                    stream_errors.append(exc)

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            faulty.trip.set()
    assert raised.group_contains(Bug)
    assert [caused_by_bug(e) for e in stream_errors] == [True]
    with pytest.raises(ConnectionLost) as later:
        await client.open_stream()
    assert caused_by_bug(later.value)


async def test_a_detached_session_crash_is_logged_with_traceback_and_its_owner_sees_the_cause(caplog):
    client, server, faulty = sessions()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await client.start_detached()
        stream = await client.open_stream()
        await stream.send_all(b"x")
        with caplog.at_level(logging.ERROR, logger="cloudless.transport.hosting"):
            faulty.trip.set()
            with pytest.raises(ConnectionLost) as raised:
                await stream.receive_some()
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert caused_by_bug(raised.value)
    [record] = [r for r in caplog.records if r.getMessage() == "transport.detached_task_failed"]
    assert record.exc_info is not None and record.exc_info[0] is not None
    assert "Bug: reader bug" in caplog.text
    assert hosting.statistics()["failed"] == 1


async def test_an_accepted_session_crash_is_logged_and_ends_only_that_connection(caplog):
    client, server, faulty = sessions()
    handler_saw: list[BaseException] = []

    async def handler(session: MuxSession) -> None:
        stream = await session.accept_stream()
        try:
            await stream.receive_some()
            await stream.receive_some()
        except ConnectionLost as exc:
            handler_saw.append(exc)
            raise

    # The faulty end is the accepted one here, as a listener would host it.
    client, server = server, client
    with caplog.at_level(logging.ERROR, logger="cloudless.transport.mux"):
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            nursery.start_soon(run_session, server, handler)
            stream = await client.open_stream()
            await stream.send_all(b"x")
            await trio.testing.wait_all_tasks_blocked()
            faulty.trip.set()
        # run_session returned normally: a listener's nursery would go on serving others.
    assert [caused_by_bug(e) for e in handler_saw] == [True]
    [record] = [r for r in caplog.records if r.getMessage() == "mux.connection_failed"]
    assert record.exc_info is not None
    assert "Bug: reader bug" in caplog.text


async def test_detached_setup_errors_reach_the_caller_unwrapped():
    async def failing_setup(*, task_status) -> None:
        raise ConnectionLost("handshake refused")

    with pytest.raises(ConnectionLost, match="handshake refused"):
        await hosting.start_detached(failing_setup, name="setup")
    assert hosting.statistics()["failed"] == 0  # the caller got it; nothing to log


async def test_a_detached_task_that_fails_after_starting_is_logged_and_others_keep_running(caplog):
    release = trio.Event()
    survivor_done = trio.Event()

    async def fails_later(*, task_status) -> None:
        task_status.started("up")
        await release.wait()
        raise Bug("after start")

    async def survivor(*, task_status) -> None:
        task_status.started()
        await release.wait()
        await trio.lowlevel.checkpoint()
        survivor_done.set()

    with caplog.at_level(logging.ERROR, logger="cloudless.transport.hosting"):
        assert await hosting.start_detached(fails_later, name="fails later") == "up"
        await hosting.start_detached(survivor, name="survivor")
        release.set()
        await survivor_done.wait()
    [record] = [r for r in caplog.records if r.getMessage() == "transport.detached_task_failed"]
    assert record.fields == {"task": "fails later"}
    assert "Bug: after start" in caplog.text
    assert hosting.statistics() == {"started": 2, "failed": 1, "running": 0}


async def test_memory_carrier_connections_are_hosted_detached():
    network = MemoryNetwork()
    server = MemoryCarrier(network, SERVER, ("s", 1))
    client = MemoryCarrier(network, CLIENT, ("c", 1))

    async def echo(connection) -> None:
        stream = await connection.accept_stream()
        await stream.send_all(await stream.receive_some())
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, echo)
        connection = await client.connect(("s", 1))
        assert hosting.statistics()["running"] == 1
        stream = await connection.open_stream()
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
        await connection.aclose()
        nursery.cancel_scope.cancel()
