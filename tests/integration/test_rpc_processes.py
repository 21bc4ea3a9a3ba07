"""RPC between two processes over real sockets and certificates: many
concurrent calls and streams, cancellation crossing the process boundary,
and a server that vanishes (kill -9) mid-stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import pytest
import trio

from cloudless.errors import Unavailable
from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import ConnectionLost
from cloudless.transport.rpc import DeadlineExceeded, RpcCancelled, RpcClient
from cloudless.transport.tls import TlsCarrier
from tests.harness.waiting import wait_until

SERVER_SCRIPT = textwrap.dedent(
    """
    import json, sys, trio, logging
    logging.basicConfig(level=logging.WARNING)
    from cloudless.pki.credentials import Credentials
    from cloudless.pki.revocation import RevocationList
    from cloudless.pki.verify import PeerVerifier
    from cloudless.transport.rpc import RpcServer
    from cloudless.transport.tls import TlsCarrier
    from cloudless.transport.quic import QuicCarrier

    directory = sys.argv[1]
    read = lambda name: open(f"{directory}/{name}", "rb").read()
    creds = Credentials(read("ca.pem"), read("cert.pem"), read("key.pem"))
    verifier = PeerVerifier(creds.ca_certificate, RevocationList(), "proc-test")
    server = RpcServer()
    stats = {"cancelled": 0}

    @server.unary("echo")
    async def echo(ctx, body):
        return body

    @server.unary("stats")
    async def get_stats(ctx, body):
        return stats

    @server.unary("hang")
    async def hang(ctx, body):
        try:
            await trio.sleep_forever()
        finally:
            stats["cancelled"] += 1

    @server.stream("count")
    async def count(ctx, body):
        for n in range(int(body)):
            await ctx.send(n)
        if int(body) < 0:
            await trio.sleep_forever()

    @server.stream("endless")
    async def endless(ctx, body):
        n = 0
        while True:
            await ctx.send(n)
            n += 1
            await trio.sleep(0.01)

    async def main():
        async with trio.open_nursery() as nursery:
            tls = await nursery.start(server.serve, TlsCarrier(creds, verifier))
            quic = await nursery.start(server.serve, QuicCarrier(creds, verifier))
            print(json.dumps({"tls": tls[1], "quic": quic[1]}), flush=True)

    trio.run(main)
    """
)

NOW = datetime.now(UTC)


@pytest.fixture
def pki(tmp_path):
    ca = ClusterCA.create("proc-test", NOW)
    server = issue_credentials(ca, Identity("proc-test", "node", "server"), NOW)
    for name, data in (("ca.pem", server.ca_pem), ("cert.pem", server.cert_pem), ("key.pem", server.key_pem)):
        (tmp_path / name).write_bytes(data)
    client = issue_credentials(ca, Identity("proc-test", "node", "client"), NOW)
    return tmp_path, client, PeerVerifier(ca.certificate, RevocationList(), "proc-test")


@pytest.fixture
def server_process(pki):
    directory, _, _ = pki
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    assert line, "server process did not start"
    ports = json.loads(line)
    yield process, ports
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


def client_carrier(kind, pki):
    _, creds, verifier = pki
    if kind == "tls":
        return TlsCarrier(creds, verifier)
    from cloudless.transport.quic import QuicCarrier

    return QuicCarrier(creds, verifier, idle_timeout=3.0)


@pytest.mark.parametrize("kind", ["tls", "quic"])
async def test_many_concurrent_calls_and_streams_between_processes(kind, pki, server_process):
    _, ports = server_process
    address = ("127.0.0.1", ports[kind])
    client = RpcClient(client_carrier(kind, pki))
    echoed: dict[int, bytes] = {}
    counted: dict[int, list[int]] = {}

    async def call(i: int) -> None:
        echoed[i] = await client.call(address, "echo", os.urandom(1 + i * 37), timeout=30)

    async def stream(i: int) -> None:
        async with client.stream(address, "count", str(i * 10).encode(), item=int, timeout=30) as items:
            counted[i] = [n async for n in items]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(call, i)
            for i in range(30):
                nursery.start_soon(stream, i)
    assert all(len(echoed[i]) == 1 + i * 37 for i in range(300))
    assert all(counted[i] == list(range(i * 10)) for i in range(30))
    assert client.pool.connects == 1
    await client.aclose()


@pytest.mark.parametrize("kind", ["tls", "quic"])
async def test_cancellation_crosses_the_process_boundary(kind, pki, server_process):
    _, ports = server_process
    address = ("127.0.0.1", ports[kind])
    client = RpcClient(client_carrier(kind, pki))
    with trio.move_on_after(0.3):
        await client.call(address, "hang", b"", timeout=None)  # cancelled by our scope, not a deadline
    with pytest.raises(DeadlineExceeded):
        await client.call(address, "hang", b"", timeout=0.2)  # and by a propagated deadline

    async def both_cancelled() -> bool:
        return (await client.call(address, "stats", b"", response=dict, timeout=5))["cancelled"] >= 2

    with trio.fail_after(10):
        await wait_until(both_cancelled, interval=0.05)
    await client.aclose()


@pytest.mark.parametrize("kind", ["tls", "quic"])
async def test_server_vanishing_mid_stream_fails_the_stream_and_later_calls(kind, pki, server_process):
    process, ports = server_process
    address = ("127.0.0.1", ports[kind])
    client = RpcClient(client_carrier(kind, pki))
    received = []
    with trio.fail_after(15):
        with pytest.raises((ConnectionLost, RpcCancelled)):
            async with client.stream(address, "endless", item=int) as items:
                async for n in items:
                    received.append(n)
                    if n == 5:
                        os.kill(process.pid, signal.SIGKILL)
    assert received[:6] == list(range(6))
    # TCP refuses at once (ConnectionLost); QUIC just hears nothing (DeadlineExceeded): both Unavailable.
    with pytest.raises(Unavailable):
        await client.call(address, "echo", b"x", timeout=3)
    await client.aclose()
