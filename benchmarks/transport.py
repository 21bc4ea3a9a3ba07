"""Transport benchmark: QUIC, TLS/TCP and WebSocket side by side.

For each carrier: mutual-TLS handshake latency (p50/p95 over sequential
connects), small-RPC round trips per second over one connection (sequential
and with concurrency), and one-stream bulk throughput (client → server
sink, and server → client as an RPC server stream of 256 KiB items).

The server runs in a separate process (started by this script with
`--serve`), so client and server each get a core, as between two machines.
Prints exactly one JSON object.

    .venv/bin/python benchmarks/transport.py [--quick]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import trio

from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import Credentials, issue_credentials
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import ConnectionLost
from cloudless.transport.rpc import RpcClient, RpcContext, RpcServer
from cloudless.transport.tls import TlsCarrier
from cloudless.transport.websocket import WebSocketCarrier

CLUSTER = "bench"
ITEM = 256 * 1024


def carrier_class(kind: str):
    if kind == "tls":
        return TlsCarrier
    if kind == "websocket":
        return WebSocketCarrier
    from cloudless.transport.quic import QuicCarrier

    return QuicCarrier


def make_server() -> RpcServer:
    server = RpcServer()

    @server.unary("echo")
    async def echo(ctx: RpcContext, body: bytes) -> bytes:
        return body

    @server.unary("cpu")
    async def cpu(ctx: RpcContext, body: bytes) -> float:
        return time.process_time()

    @server.stream("bulk.download")
    async def download(ctx: RpcContext, body: bytes) -> None:
        total = int(body)
        chunk = b"d" * ITEM
        for _ in range(total // ITEM):
            await ctx.send(chunk)

    return server


async def sink_or_rpc(conn) -> None:
    """First byte of each stream says what it is: b"S" raw sink, else RPC."""
    rpc = make_server()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await conn.accept_stream()
                nursery.start_soon(_dispatch, rpc, conn, stream)
    except Exception as exc:  # the client leaving ends the connection; anything else is a failure
        if not _only_connection_lost(exc):
            raise


def _only_connection_lost(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_connection_lost(inner) for inner in exc.exceptions)
    return isinstance(exc, ConnectionLost)


async def _dispatch(rpc: RpcServer, conn, stream) -> None:
    first = await stream.receive_some(1)
    if first == b"S":
        total = 0
        while chunk := await stream.receive_some():
            total += len(chunk)
        await stream.send_all(str(total).encode())
        await stream.send_eof()
        return
    await rpc.serve_stream(conn, _Prefixed(stream, first))


class _Prefixed:
    """A stream with bytes pushed back in front (the dispatch byte we peeked)."""

    def __init__(self, stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self.stream_id = stream.stream_id

    async def receive_some(self, max_bytes=None):
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return await self._stream.receive_some(max_bytes)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def load_pki(path: str):
    with open(path, "rb") as handle:
        ca_pem, cert_pem, key_pem = handle.read().split(b"\n--\n")
    creds = Credentials(ca_pem, cert_pem, key_pem)
    return creds, PeerVerifier(creds.ca_certificate, RevocationList(), CLUSTER)


async def serve_main(pki_path: str) -> None:
    creds, verifier = load_pki(pki_path)
    async with trio.open_nursery() as nursery:
        ports = {}
        for kind in ("tls", "websocket", "quic"):
            try:
                carrier = carrier_class(kind)(creds, verifier)
            except ImportError as exc:
                ports[kind] = f"missing: {exc}"
                continue
            address = await nursery.start(carrier.serve, sink_or_rpc)
            ports[kind] = address[1]
        print(json.dumps(ports), flush=True)
        await trio.sleep_forever()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def bench_carrier(kind: str, carrier, address, quick: bool) -> dict:
    out: dict = {}
    # Handshakes: sequential connects, each closed at once.
    samples = []
    for _ in range(10 if quick else 60):
        start = time.perf_counter()
        conn = await carrier.connect(address)
        samples.append((time.perf_counter() - start) * 1000)
        await conn.aclose()
    out["handshake_ms"] = {
        "p50": round(statistics.median(samples), 3),
        "p95": round(percentile(samples, 95), 3),
        "n": len(samples),
    }
    client = RpcClient(carrier)
    conn = await client.pool.get(address)
    payload = b"p" * 64
    # Sequential small RPCs over one connection.
    n = 300 if quick else 3000
    for _ in range(50):
        await client.call(conn, "echo", payload, timeout=10)
    server_cpu = await client.call(conn, "cpu", b"", response=float)
    cpu = time.process_time()
    start = time.perf_counter()
    for _ in range(n):
        await client.call(conn, "echo", payload, timeout=10)
    out["rpc_sequential_per_s"] = round(n / (time.perf_counter() - start), 1)
    # CPU per call on each side: what the rate would be bounded by on idle cores,
    # and a figure that stays meaningful when the machine is shared.
    out["rpc_client_cpu_us_per_call"] = round((time.process_time() - cpu) / n * 1e6, 1)
    out["rpc_server_cpu_us_per_call"] = round(
        ((await client.call(conn, "cpu", b"", response=float)) - server_cpu) / n * 1e6, 1
    )
    # Concurrent small RPCs over the same connection.
    workers, per_worker = 32, (20 if quick else 200)

    async def worker():
        for _ in range(per_worker):
            await client.call(conn, "echo", payload, timeout=30)

    server_cpu = await client.call(conn, "cpu", b"", response=float)
    cpu = time.process_time()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    calls = workers * per_worker
    out["rpc_concurrent_per_s"] = round(calls / (time.perf_counter() - start), 1)
    out["rpc_concurrent_client_cpu_us_per_call"] = round((time.process_time() - cpu) / calls * 1e6, 1)
    out["rpc_concurrent_server_cpu_us_per_call"] = round(
        ((await client.call(conn, "cpu", b"", response=float)) - server_cpu) / calls * 1e6, 1
    )
    out["rpc_concurrency"] = workers
    # One-stream bulk upload into a raw sink.
    megabytes = (16 if kind == "quic" else 64) if quick else (64 if kind == "quic" else 512)
    chunk = b"u" * (1024 * 1024)
    stream = await conn.open_stream()
    server_cpu = await client.call(conn, "cpu", b"", response=float)
    cpu = time.process_time()
    start = time.perf_counter()
    await stream.send_all(b"S")
    for _ in range(megabytes):
        await stream.send_all(chunk)
    await stream.send_eof()
    received = b""
    while part := await stream.receive_some():
        received += part
    elapsed = time.perf_counter() - start
    assert int(received) == megabytes * len(chunk), received
    out["bulk_upload_MB_per_s"] = round(megabytes * len(chunk) / elapsed / 1e6, 1)
    out["bulk_upload_MB"] = megabytes
    out["bulk_upload_client_cpu_s_per_GB"] = round((time.process_time() - cpu) / (megabytes / 1024), 2)
    out["bulk_upload_server_cpu_s_per_GB"] = round(
        ((await client.call(conn, "cpu", b"", response=float)) - server_cpu) / (megabytes / 1024), 2
    )
    # One-stream bulk download as an RPC server stream.
    total = megabytes * 1024 * 1024
    start = time.perf_counter()
    got = 0
    async with client.stream(conn, "bulk.download", str(total).encode(), timeout=300) as items:
        async for item in items:
            got += len(item)
    elapsed = time.perf_counter() - start
    assert got == total
    out["bulk_rpc_stream_MB_per_s"] = round(total / elapsed / 1e6, 1)
    await client.aclose()
    # What the figures would be with a free core per side: the wall-clock
    # rates above depend on what else the machine runs (see load_average).
    out["cpu_bound_estimate"] = {
        "rpc_concurrent_per_s": round(
            1e6 / max(out["rpc_concurrent_client_cpu_us_per_call"], out["rpc_concurrent_server_cpu_us_per_call"])
        ),
        "rpc_sequential_per_s": round(1e6 / (out["rpc_client_cpu_us_per_call"] + out["rpc_server_cpu_us_per_call"])),
        "bulk_upload_MB_per_s": round(
            1000 / max(out["bulk_upload_client_cpu_s_per_GB"], out["bulk_upload_server_cpu_s_per_GB"])
        ),
    }
    return out


async def client_main(quick: bool) -> dict:
    now = datetime.now(UTC)
    ca = ClusterCA.create(CLUSTER, now)
    server_creds = issue_credentials(ca, Identity(CLUSTER, "node", "bench-server"), now, timedelta(hours=2))
    client_creds = issue_credentials(ca, Identity(CLUSTER, "node", "bench-client"), now, timedelta(hours=2))
    verifier = PeerVerifier(ca.certificate, RevocationList(), CLUSTER)
    pki_path = f"/tmp/cloudless-bench-{os.getpid()}.pem"
    fd = os.open(pki_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(b"\n--\n".join([server_creds.ca_pem, server_creds.cert_pem, server_creds.key_pem]))
    process = subprocess.Popen([sys.executable, __file__, "--serve", pki_path], stdout=subprocess.PIPE, text=True)
    results: dict = {}
    try:
        ports = json.loads(process.stdout.readline())
        os.unlink(pki_path)
        for kind in ("quic", "tls", "websocket"):
            port = ports.get(kind)
            if not isinstance(port, int):
                results[kind] = {"missing": port or "not available"}
                continue
            try:
                cls = carrier_class(kind)
                carrier = cls(client_creds, verifier)
                if kind == "quic":
                    async with carrier:
                        results[kind] = await bench_carrier(kind, carrier, ("127.0.0.1", port), quick)
                else:
                    results[kind] = await bench_carrier(kind, carrier, ("127.0.0.1", port), quick)
            except Exception as exc:  # report, do not fake
                results[kind] = {"missing": f"benchmark failed: {exc!r}"}
    finally:
        process.kill()
        process.wait()
        if os.path.exists(pki_path):
            os.unlink(pki_path)
    return results


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        trio.run(serve_main, sys.argv[2])
        return
    quick = "--quick" in sys.argv
    started = time.time()
    load_before = os.getloadavg()[0]
    results = trio.run(client_main, quick)
    document = {
        "benchmark": "transport",
        "carriers": results,
        "targets": {
            "tls_bulk_MB_per_s": 200,
            "rpc_round_trips_per_s_one_connection": 5000,
            "quic_bulk_MB_per_s": 10,
        },
        "workload": {
            "rpc_payload_bytes": 64,
            "rpc_concurrency": 32,
            "bulk_chunk_bytes": 1024 * 1024,
            "rpc_stream_item_bytes": ITEM,
            "server": "separate process on 127.0.0.1",
            "quick": quick,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "trio": trio.__version__,
            "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        },
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(document, sort_keys=True))


if __name__ == "__main__":
    main()
