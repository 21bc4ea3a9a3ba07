"""QUIC carrier over real UDP on 127.0.0.1 with real cluster certificates."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import types
from datetime import UTC, datetime, timedelta

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials
from cloudless.pki.errors import PeerRejected
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import ConnectionLost, StreamReset
from cloudless.transport.quic import QuicCarrier
from cloudless.transport.udp import UdpEndpoint
from tests.harness.waiting import wait_until

NOW = datetime.now(UTC)


class Pki:
    def __init__(self) -> None:
        self.ca = ClusterCA.create("c1", NOW)
        self.revocations = RevocationList()
        self.verifier = PeerVerifier(self.ca.certificate, self.revocations, "c1")
        self.server = issue_credentials(self.ca, Identity.node("c1", "server"), NOW)
        self.client = issue_credentials(self.ca, Identity.client("c1", "alice"), NOW)

    def forge(self, san: x509.GeneralName, *, signer: ClusterCA | None = None):
        """A certificate our CA signed whose SAN is whatever the test wants (Credentials would refuse it)."""
        signer = signer or self.ca
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
            .issuer_name(signer.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(minutes=1))
            .not_valid_after(NOW + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.private_key.public_key()), critical=False
            )
            .sign(signer.private_key, hashes.SHA256())
        )
        return types.SimpleNamespace(
            cert_pem=certificate.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


async def echo_stream(stream) -> None:
    try:
        while data := await stream.receive_some():
            await stream.send_all(data)
        await stream.send_eof()
    except (StreamReset, ConnectionLost):
        pass


async def echo_handler(connection) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await connection.accept_stream()
            except ConnectionLost:
                return
            nursery.start_soon(echo_stream, stream)


async def start_server(nursery, pki: Pki, handler=echo_handler, credentials=None, **kwargs):
    server = QuicCarrier(credentials or pki.server, pki.verifier, **kwargs)
    address = await nursery.start(server.serve, handler)
    return server, address


async def echo_once(connection, payload: bytes) -> bytes:
    stream = await connection.open_stream()
    received = bytearray()
    async with trio.open_nursery() as nursery:

        async def write():
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(write)
        while data := await stream.receive_some():
            received += data
    return bytes(received)


async def test_stream_echo_with_verified_identities_on_both_sides(nursery, pki):
    seen = []

    async def handler(connection):
        seen.append(connection.peer)
        await echo_handler(connection)

    server, address = await start_server(nursery, pki, handler)
    async with QuicCarrier(pki.client, pki.verifier) as client:
        connection = await client.connect(address)
        assert connection.peer.uri == "spiffe://c1/node/server"
        assert await echo_once(connection, b"hello over quic") == b"hello over quic"
        assert seen[0].uri == "spiffe://c1/client/alice"
        assert seen[0].serial == pki.client.serial
        stats = connection.statistics()
        assert stats.established and stats.handshake_seconds is not None
        await connection.aclose()
        assert connection.is_closed
    assert server.statistics().handshakes_completed == 1


async def test_many_concurrent_streams_keep_their_bytes_apart(nursery, pki):
    _, address = await start_server(nursery, pki)
    async with QuicCarrier(pki.client, pki.verifier) as client:
        connection = await client.connect(address)
        results = {}

        async def one(i: int) -> None:
            payload = hashlib.sha256(str(i).encode()).digest() * (200 + 37 * i)
            results[i] = (await echo_once(connection, payload)) == payload

        with trio.fail_after(20):
            async with trio.open_nursery() as streams:
                for i in range(60):
                    streams.start_soon(one, i)
        assert results == {i: True for i in range(60)}
        assert connection.statistics().streams_opened == 60


async def test_slow_reader_bounds_writer_buffer_and_receive_buffer(nursery, pki):
    """Backpressure end to end: unacked send data <= send_buffer, unread data <= stream window (RFC 9000 §4.1)."""
    window = bound = 128 * 1024
    total = 3 * 1024 * 1024
    peaks = {"receive_buffered": 0}
    digests = {}
    reader_progress = {"read": 0}

    async def slow_reader(connection):
        stream = await connection.accept_stream()
        digest = hashlib.sha256()
        while data := await stream.receive_some(16 * 1024):
            digest.update(data)
            reader_progress["read"] += len(data)
            peaks["receive_buffered"] = max(peaks["receive_buffered"], stream.statistics().receive_buffered)
            await trio.sleep(0.001)
        digests["server"] = digest.hexdigest()
        await stream.send_all(b"done")
        await stream.send_eof()

    _, address = await start_server(nursery, pki, slow_reader, stream_window=window, send_buffer=bound)
    async with QuicCarrier(pki.client, pki.verifier, stream_window=window, send_buffer=bound) as client:
        connection = await client.connect(address)
        stream = await connection.open_stream()
        payload = os.urandom(total)
        digests["client"] = hashlib.sha256(payload).hexdigest()
        peak_send = 0
        lag_at_finish = None
        with trio.fail_after(30):
            for offset in range(0, total, 64 * 1024):
                await stream.send_all(payload[offset : offset + 64 * 1024])
                peak_send = max(peak_send, stream.statistics().send_buffered)
            lag_at_finish = total - reader_progress["read"]
            await stream.send_eof()
            assert await stream.receive_some() == b"done"
    assert digests["client"] == digests["server"]
    assert 0 < peak_send <= bound
    assert peaks["receive_buffered"] <= window
    # The writer was held back: when it finished, at most what the buffers hold was unread.
    assert lag_at_finish <= bound + window + 64 * 1024


async def test_client_reset_reaches_server_reader_and_writer(nursery, pki):
    outcome = {}
    got_data = trio.Event()

    async def handler(connection):
        stream = await connection.accept_stream()
        assert await stream.receive_some() == b"first"
        got_data.set()
        with pytest.raises(StreamReset) as reader_error:
            await stream.receive_some()
        outcome["reader"] = reader_error.value.code
        with pytest.raises(StreamReset) as writer_error:
            for _ in range(1000):  # STOP_SENDING makes the send side fail too
                await stream.send_all(b"x" * 1024)
                await trio.sleep(0.001)
        outcome["writer"] = writer_error.value.code

    _server, address = await start_server(nursery, pki, handler)
    async with QuicCarrier(pki.client, pki.verifier) as client:
        connection = await client.connect(address)
        stream = await connection.open_stream()
        await stream.send_all(b"first")
        await got_data.wait()
        await stream.reset(42)
        with pytest.raises(StreamReset):
            await stream.send_all(b"after reset")
        with trio.fail_after(5):
            await wait_until(lambda: "writer" in outcome, interval=0.01)
    assert outcome == {"reader": 42, "writer": 42}


async def test_server_reset_reaches_client(nursery, pki):
    async def handler(connection):
        stream = await connection.accept_stream()
        await stream.receive_some()
        await stream.reset(7)
        await echo_handler(connection)

    _, address = await start_server(nursery, pki, handler)
    async with QuicCarrier(pki.client, pki.verifier) as client:
        connection = await client.connect(address)
        stream = await connection.open_stream()
        await stream.send_all(b"please reset")
        with trio.fail_after(5), pytest.raises(StreamReset) as caught:
            await stream.receive_some()
        assert caught.value.code == 7
        # The connection itself is unaffected.
        assert await echo_once(connection, b"still fine") == b"still fine"


async def test_cancelled_receive_then_reset_cancels_on_the_server(nursery, pki):
    seen = []

    async def handler(connection):
        stream = await connection.accept_stream()
        try:
            while await stream.receive_some():
                pass
        except StreamReset as exc:
            seen.append(exc.code)

    _, address = await start_server(nursery, pki, handler)
    async with QuicCarrier(pki.client, pki.verifier) as client:
        connection = await client.connect(address)
        stream = await connection.open_stream()
        await stream.send_all(b"request")
        with trio.move_on_after(0.05) as scope:
            await stream.receive_some()  # the server never answers
        assert scope.cancelled_caught
        await stream.reset(9)
        with trio.fail_after(5):
            await wait_until(lambda: seen, interval=0.01)
    assert seen == [9]


async def test_connect_to_silent_address_times_out_with_connection_lost(pki):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        async with QuicCarrier(pki.client, pki.verifier, handshake_timeout=0.5) as client:
            start = trio.current_time()
            with pytest.raises(ConnectionLost, match="timed out"):
                await client.connect(silent.getsockname())
            assert trio.current_time() - start < 2.0
            assert client.statistics().handshakes_timed_out == 1


async def test_gossip_datagrams_share_the_socket_with_quic(nursery, pki):
    """RFC 9443-style demultiplexing: first byte < 0x40 goes to gossip, QUIC keeps working."""
    endpoint = UdpEndpoint("127.0.0.1", 0)
    address = await nursery.start(endpoint.run)
    gossip = []
    endpoint.set_datagram_handler(lambda data, addr: gossip.append(data))
    server = QuicCarrier(pki.server, pki.verifier, endpoint=endpoint)
    assert await nursery.start(server.serve, echo_handler) == address
    async with QuicCarrier(pki.client, pki.verifier) as client:
        connection = await client.connect(address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            for i in range(20):
                peer.sendto(bytes([i % 0x40]) + b"gossip", address)
                assert await echo_once(connection, b"quic %d" % i) == b"quic %d" % i
        with trio.fail_after(2):
            await wait_until(lambda: len(gossip) >= 20, interval=0.01)
    assert all(packet.endswith(b"gossip") for packet in gossip)
    stats = endpoint.statistics()
    assert stats.other_datagrams == 20
    assert stats.quic_datagrams > 20


# -- rejection matrix ---------------------------------------------------------


class CertificatelessCarrier(QuicCarrier):
    """A client that presents no certificate at all (answers CertificateRequest with an empty one)."""

    def _configuration(self, *, is_client: bool):
        configuration = super()._configuration(is_client=is_client)
        configuration.certificate = None
        configuration.private_key = None
        return configuration


def bad_client(pki: Pki, case: str):
    if case == "no_certificate":
        return CertificatelessCarrier(pki.client, pki.verifier)
    if case == "unknown_ca":
        other = ClusterCA.create("c1", NOW)  # same cluster id, different key: still another CA
        return QuicCarrier(issue_credentials(other, Identity.client("c1", "alice"), NOW), pki.verifier)
    if case == "expired":
        old = issue_credentials(pki.ca, Identity.client("c1", "old"), NOW - timedelta(days=3), timedelta(hours=1))
        return QuicCarrier(old, pki.verifier)
    if case == "revoked":
        credentials = issue_credentials(pki.ca, Identity.client("c1", "mallory"), NOW)
        pki.revocations.add(credentials.serial, credentials.not_after)
        return QuicCarrier(credentials, pki.verifier)
    if case == "bad_identity":
        return QuicCarrier(pki.forge(x509.DNSName("evil.example")), pki.verifier)
    if case == "wrong_cluster":
        return QuicCarrier(pki.forge(x509.UniformResourceIdentifier("spiffe://c2/node/n1")), pki.verifier)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["no_certificate", "unknown_ca", "expired", "revoked", "bad_identity", "wrong_cluster"]
)
async def test_rejection_matrix_refuses_bad_client_and_keeps_serving(nursery, pki, case):
    server, address = await start_server(nursery, pki)
    async with bad_client(pki, case) as intruder:
        with trio.fail_after(5), pytest.raises(PeerRejected) as caught:
            await intruder.connect(address)
    assert caught.value.reason == case
    assert caught.value.context["rejected_by"] == "peer"
    assert "refused our certificate" in caught.value.message
    # The server names the same reason, and never handed the intruder to its handler.
    with trio.fail_after(2):
        await wait_until(lambda: server.statistics().rejected_by_us.get(case) == 1, interval=0.01)
    assert server.statistics().handshakes_completed == 0
    # ... and a good client is served right after.
    async with QuicCarrier(pki.client, pki.verifier) as client:
        connection = await client.connect(address)
        assert await echo_once(connection, b"good client") == b"good client"


async def test_client_refuses_server_from_another_ca(nursery, pki):
    other = ClusterCA.create("c1", NOW)
    impostor = issue_credentials(other, Identity.node("c1", "server"), NOW)
    server, address = await start_server(nursery, pki, credentials=impostor)
    async with QuicCarrier(pki.client, pki.verifier) as client:
        with trio.fail_after(5), pytest.raises(PeerRejected) as caught:
            await client.connect(address)
        assert caught.value.reason == "unknown_ca"
        assert caught.value.context["rejected_by"] == "us"
        assert client.statistics().rejected_by_us == {"unknown_ca": 1}
    with trio.fail_after(2):
        await wait_until(lambda: server.statistics().rejected_by_peer.get("unknown_ca") == 1, interval=0.01)


# -- garbage on the wire ------------------------------------------------------

INITIAL_V1 = b"\xc0\x00\x00\x00\x01"  # long header, Initial, version 1 (RFC 9000 §17.2.2)

datagrams = st.one_of(
    st.binary(min_size=1, max_size=1500),
    # Long headers that parse as Initials of version 1 and are big enough to start a handshake.
    st.builds(lambda body: INITIAL_V1 + body, st.binary(min_size=1200, max_size=1400)),
    # Long headers with an unknown version: the server answers with version negotiation.
    st.builds(lambda body: b"\xc0\x1a\x2a\x3a\x4a\x08" + body, st.binary(min_size=1200, max_size=1300)),
    # Short headers: random connection IDs.
    st.builds(lambda body: b"\x40" + body, st.binary(min_size=8, max_size=1400)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(datagrams, min_size=1, max_size=30))
async def test_random_datagrams_never_crash_the_server(pki, batch):
    async with trio.open_nursery() as nursery:
        server, address = await start_server(nursery, pki, handshake_timeout=1.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            for datagram in batch:
                attacker.sendto(datagram, address)
        with trio.fail_after(2):
            await wait_until(lambda: server.endpoint.statistics().datagrams_received >= len(batch), interval=0.005)
        assert server.endpoint.statistics().handler_errors == 0
        async with QuicCarrier(pki.client, pki.verifier) as client:
            connection = await client.connect(address)
            assert await echo_once(connection, b"still serving") == b"still serving"
        nursery.cancel_scope.cancel()


# -- a peer process that vanishes ---------------------------------------------

SERVER_SCRIPT = textwrap.dedent(
    """
    import sys, trio
    from cloudless.pki.credentials import Credentials
    from cloudless.pki.revocation import RevocationList
    from cloudless.pki.verify import PeerVerifier
    from cloudless.transport.quic import QuicCarrier

    directory = sys.argv[1]
    def read(name):
        with open(f"{directory}/{name}", "rb") as f:
            return f.read()
    credentials = Credentials(read("ca.pem"), read("cert.pem"), read("key.pem"))
    verifier = PeerVerifier(credentials.ca_certificate, RevocationList(), "c1")

    async def handler(connection):
        async with trio.open_nursery() as nursery:
            while True:
                stream = await connection.accept_stream()
                nursery.start_soon(sink, stream)

    async def sink(stream):
        # Read slowly and never answer: the client ends up blocked both ways.
        while await stream.receive_some(1024):
            await trio.sleep(0.05)

    async def main():
        carrier = QuicCarrier(credentials, verifier, idle_timeout=60.0)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(carrier.serve, handler)
            print(port, flush=True)

    trio.run(main)
    """
)


async def test_peer_process_killed_mid_stream_fails_pending_operations(pki, tmp_path):
    for name, data in (
        ("ca.pem", pki.server.ca_pem),
        ("cert.pem", pki.server.cert_pem),
        ("key.pem", pki.server.key_pem),
    ):
        (tmp_path / name).write_bytes(data)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", SERVER_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        line = bytearray()
        with trio.fail_after(20):
            while not line.endswith(b"\n") and (chunk := await process.stdout.receive_some(1)):
                line += chunk
        port = int(line)
        async with QuicCarrier(pki.client, pki.verifier, idle_timeout=1.0, send_buffer=64 * 1024) as client:
            connection = await client.connect(("127.0.0.1", port))
            reading = await connection.open_stream()
            writing = await connection.open_stream()
            await reading.send_all(b"hello")
            errors = {}

            async def blocked_reader():
                with pytest.raises(ConnectionLost) as caught:
                    await reading.receive_some()
                errors["reader"] = caught.value

            async def blocked_writer():
                with pytest.raises(ConnectionLost) as caught:
                    while True:
                        await writing.send_all(b"w" * 65536)
                errors["writer"] = caught.value

            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked_reader)
                nursery.start_soon(blocked_writer)
                await trio.sleep(0.3)
                process.kill()  # SIGKILL: no CONNECTION_CLOSE ever comes
                killed_at = trio.current_time()
                with trio.fail_after(10):
                    await wait_until(lambda: len(errors) >= 2, interval=0.05)
            # Idle timeout is max(1 s, 3 PTO) on loopback (RFC 9000 §10.1).
            assert trio.current_time() - killed_at < 5.0
            assert connection.is_closed
            with pytest.raises(ConnectionLost):
                await connection.open_stream()
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def test_server_shutdown_fails_client_operations_promptly(pki):
    async with trio.open_nursery() as server_scope:
        _, address = await start_server(server_scope, pki)
        async with QuicCarrier(pki.client, pki.verifier) as client:
            connection = await client.connect(address)
            stream = await connection.open_stream()
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            server_scope.cancel_scope.cancel()  # the server sends CONNECTION_CLOSE on its way out
            with trio.fail_after(2), pytest.raises(ConnectionLost, match="shutting down"):
                await stream.receive_some()
            with pytest.raises(ConnectionLost):
                await connection.accept_stream()


async def test_serve_on_a_running_carrier_accepts_both_ways(pki):
    async with QuicCarrier(pki.server, pki.verifier) as first, QuicCarrier(pki.client, pki.verifier) as second:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(first.serve, echo_handler)
            assert address == first.local_address
            connection = await second.connect(address)
            assert await echo_once(connection, b"both ways") == b"both ways"
            nursery.cancel_scope.cancel()


async def test_half_open_handshake_is_dropped_after_handshake_timeout(nursery, pki):
    server, address = await start_server(nursery, pki, handshake_timeout=0.3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        attacker.sendto(INITIAL_V1 + b"\x08" + b"d" * 8 + b"\x08" + b"s" * 8 + b"\x00" * 1200, address)
        with trio.fail_after(2):
            await wait_until(lambda: server.statistics().handshakes_timed_out >= 1, interval=0.02)
    assert server.statistics().connections_open == 0
    assert server.statistics().handshakes_completed == 0
    with trio.fail_after(3):  # ... and its state is gone once the closing period ends, not kept forever
        await wait_until(lambda: not (server._connections or server._routes), interval=0.05)


async def test_renewed_credentials_are_presented_on_new_connections(nursery, pki):
    seen = []

    async def handler(connection):
        seen.append(connection.peer.serial)
        await echo_handler(connection)  # until the client closes

    _, address = await start_server(nursery, pki, handler)
    async with QuicCarrier(pki.client, pki.verifier) as client:
        await (await client.connect(address)).aclose()
        renewed = issue_credentials(pki.ca, Identity.client("c1", "alice"), NOW)
        client.update_credentials(renewed)
        await (await client.connect(address)).aclose()
    assert seen == [pki.client.serial, renewed.serial]


async def test_send_eof_twice_is_a_no_op_and_send_after_eof_fails(nursery, pki):
    _, address = await start_server(nursery, pki)
    async with QuicCarrier(pki.client, pki.verifier) as client:
        connection = await client.connect(address)
        stream = await connection.open_stream()
        await stream.send_all(b"once")
        await stream.send_eof()
        await stream.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"more")
        assert await stream.receive_some() == b"once"
        assert await stream.receive_some() == b""


async def test_idle_connection_closes_at_idle_timeout_unless_kept_alive_rfc9000_10_1(nursery, pki):
    _, address = await start_server(nursery, pki, idle_timeout=1.0)
    async with (
        QuicCarrier(pki.client, pki.verifier, idle_timeout=1.0) as idle,
        QuicCarrier(pki.client, pki.verifier, idle_timeout=1.0, keepalive_interval=0.2) as kept,
    ):
        idle_connection = await idle.connect(address)
        kept_connection = await kept.connect(address)
        await trio.sleep(2.5)
        assert idle_connection.is_closed
        with pytest.raises(ConnectionLost, match="Idle timeout"):
            await idle_connection.open_stream()
        assert not kept_connection.is_closed
        assert await echo_once(kept_connection, b"still here") == b"still here"


async def test_connect_outside_any_nursery_runs_the_carrier_detached(nursery, pki):
    _, address = await start_server(nursery, pki)
    client = QuicCarrier(pki.client, pki.verifier)
    connection = await client.connect(address)
    assert await echo_once(connection, b"detached") == b"detached"
    await client.aclose()
    with trio.fail_after(2):
        await wait_until(lambda: connection.is_closed, interval=0.01)
    with pytest.raises(ConnectionLost):
        await connection.open_stream()


async def lossy_relay(nursery, target: tuple[str, int], rng, loss: float, task_status=trio.TASK_STATUS_IGNORED):
    """A UDP relay that drops `loss` of the datagrams each way (a seeded random.Random decides)."""
    front = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    back = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await front.bind(("127.0.0.1", 0))
    await back.bind(("127.0.0.1", 0))
    client: list[tuple[str, int]] = []
    dropped = {"count": 0}

    async def forward(source, sink, destination):
        while True:
            data, address = await source.recvfrom(65535)
            if source is front:
                client[:] = [address]
            if rng.random() < loss:
                dropped["count"] += 1
                continue
            target_address = destination() if callable(destination) else destination
            if target_address is not None:
                await sink.sendto(data, target_address)

    nursery.start_soon(forward, front, back, target)
    nursery.start_soon(forward, back, front, lambda: client[0] if client else None)
    return front.getsockname(), dropped


async def test_bulk_echo_survives_packet_loss_rfc9002(nursery, pki):
    """Loss detection and retransmission run off the driver's timers (RFC 9002 §6)."""
    import random

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    _, server_address = await start_server(nursery, pki)
    relay_address, dropped = await lossy_relay(nursery, server_address, rng, loss=0.05)
    payload = random.Random(seed).randbytes(384 * 1024)
    try:
        async with QuicCarrier(pki.client, pki.verifier, handshake_timeout=10.0) as client:
            with trio.fail_after(30):
                connection = await client.connect(relay_address)
                echoed = await echo_once(connection, payload)
        assert echoed == payload
        assert dropped["count"] > 0
    except BaseException as exc:
        exc.add_note(f"lossy relay seed={seed}")
        raise


async def test_handler_that_closes_at_once_still_lets_the_client_connect(nursery, pki):
    """The server sends HANDSHAKE_DONE (RFC 9001 §4.1.2) before its handler can close the connection."""

    async def handler(connection):
        return

    _, address = await start_server(nursery, pki, handler)
    async with QuicCarrier(pki.client, pki.verifier) as client:
        for _ in range(20):
            connection = await client.connect(address)
            assert connection.peer.uri == "spiffe://c1/node/server"
            with trio.fail_after(2), pytest.raises(ConnectionLost):
                await connection.accept_stream()


def test_unparseable_credentials_are_refused_at_construction(pki):
    from cloudless.pki.errors import InvalidCredentials

    garbage = types.SimpleNamespace(cert_pem=b"not a certificate", key_pem=pki.client.key_pem)
    with pytest.raises(InvalidCredentials, match="do not parse"):
        QuicCarrier(garbage, pki.verifier)


async def test_client_refuses_a_server_holding_a_client_identity(nursery, pki):
    """Identity checking replaces hostname checking: only node identities may serve."""
    posing = issue_credentials(pki.ca, Identity.client("c1", "mallory"), NOW)
    _, address = await start_server(nursery, pki, credentials=posing)
    async with QuicCarrier(pki.client, pki.verifier) as client:
        with trio.fail_after(5), pytest.raises(PeerRejected) as caught:
            await client.connect(address)
    assert caught.value.reason == "bad_identity"
    assert "not a node identity" in caught.value.message


class DriverBug(RuntimeError):
    """Stands for a programming error in a connection's driver."""


def break_driver(connection) -> None:
    """Make the connection's next driver pass raise DriverBug (fault injection into the real driver)."""

    def process_events() -> None:
        raise DriverBug("driver bug")

    connection._process_events = process_events


async def test_a_driver_crash_propagates_to_the_carrier_owner_and_fails_connections_with_its_cause(nursery, pki):
    _, address = await start_server(nursery, pki)
    with pytest.raises(ExceptionGroup) as raised:
        async with QuicCarrier(pki.client, pki.verifier) as client:
            connection = await client.connect(address)
            stream = await connection.open_stream()
            break_driver(connection)
            with trio.fail_after(5):
                await stream.send_all(b"wakes the driver")
                await stream.receive_some()
    assert raised.group_contains(DriverBug)
    with pytest.raises(ConnectionLost) as later:
        await connection.open_stream()
    assert isinstance(later.value.__cause__, DriverBug)


async def test_a_detached_carrier_crash_is_logged_and_its_connections_see_the_cause(nursery, pki, caplog):
    _, address = await start_server(nursery, pki)
    client = QuicCarrier(pki.client, pki.verifier)
    connection = await client.connect(address)  # outside any nursery: runs detached
    stream = await connection.open_stream()
    break_driver(connection)
    with caplog.at_level("ERROR", logger="cloudless.transport.hosting"), trio.fail_after(5):
        with pytest.raises(ConnectionLost) as raised:
            await stream.send_all(b"wakes the driver")
            await stream.receive_some()
        await trio.testing.wait_all_tasks_blocked()
    assert isinstance(raised.value.__cause__, DriverBug)
    assert "transport.detached_task_failed" in [r.getMessage() for r in caplog.records]
    assert "DriverBug: driver bug" in caplog.text
    await client.aclose()
